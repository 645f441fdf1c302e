"""Authentication tests: OIDC against a real OpenID provider, attacks, JWKS handling, trusted headers."""
