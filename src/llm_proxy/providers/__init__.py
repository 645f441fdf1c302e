"""Upstream providers: one translator per wire format, one signer per credential scheme."""
