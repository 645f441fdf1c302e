"""Use cases: routing a request, calling the provider, recording usage."""
