"""Adapters for the places session artifacts live: Valkey, PostgreSQL, BullMQ, temp files."""
