"""Audit: spans from the durable outbox, OTLP export, the hash chain and use ingestion."""
