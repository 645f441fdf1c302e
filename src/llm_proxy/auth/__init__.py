"""Authentication (who is calling) and policy (what they may use)."""
