"""Client APIs the proxy serves: their request schemas and the OpenAPI document built from them."""
