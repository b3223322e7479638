"""floe's multi-tenant, Raft-replicated key-value service (DESIGN.md §3)."""
