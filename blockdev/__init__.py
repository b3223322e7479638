"""Volumes: segment records, the write-back buffer, flush, snapshots and clones (DESIGN.md §5)."""
