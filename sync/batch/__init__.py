"""Batch CEP Profile API: the client and a local simulator of the API."""
