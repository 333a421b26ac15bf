"""Saved conversations for the web UI: a per-owner SQLite store with copied image files."""
