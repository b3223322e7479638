"""The object tier: immutable content-hashed blobs (DESIGN.md §4)."""
