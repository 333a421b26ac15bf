"""Checking and decoding media that clients upload, before any model sees it."""
