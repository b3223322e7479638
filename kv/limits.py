"""Named bounds on everything a KV client controls.

Every number here is enforced twice: by the gRPC server before a command is
proposed (so the client gets INVALID_ARGUMENT with a clear message) and by the
state machine on apply (so a command that somehow reaches the log cannot break
an invariant). The README's "Limits" table lists them.
"""

from __future__ import annotations

# Store and keyspace names: short, printable identifiers (like bucket names).
NAME_BYTES_MAX = 128

# Keys are small: segment ids, volume names. etcd allows 1.5 MiB requests in all;
# we keep every Raft entry well under pysyncobj's 64 KiB chunking threshold.
KEY_BYTES_MAX = 1024

# A value must fit in one Raft entry with room for the envelope. Segment
# records of a fragmented 1 MiB segment stay far below this.
VALUE_BYTES_MAX = 16 * 1024

# A serialized command (one Raft log entry). pysyncobj sends entries of
# appendEntriesBatchSizeBytes (64 KiB) or more through a chunked path that broke
# under load in our trial, so we reject anything near it.
COMMAND_BYTES_MAX = 48 * 1024

# Conditions plus mutations in one atomic batch.
BATCH_OPS_MAX = 256

# Keys returned by one scan page.
SCAN_LIMIT_MAX = 1000

# Keyspaces per store, stores per tenant.
KEYSPACES_PER_STORE_MAX = 64
STORES_PER_TENANT_MAX = 10_000

# Keys a store may hold when it is dropped: dropping deletes every key in one
# deterministic apply step, which must stay short enough not to stall Raft.
DROP_STORE_KEYS_MAX = 200_000

# Idempotency records are kept for this many Raft entries after they were
# written; a client retrying later than that may apply twice. At 10k commits/s
# this is over 10 s of retry window; clients retry for at most a few seconds.
IDEMPOTENCY_WINDOW_ENTRIES = 200_000

# request_id (idempotency key) length.
REQUEST_ID_BYTES_MAX = 32
