"""Batch CEP Profile API: the client, its endpoints and their client-side rate limits."""
