"""Segment sources: read a warehouse query or table as Arrow record batches."""
