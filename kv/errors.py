"""Typed KV errors: each says whose fault it is and what happened to the request.

`NotLeader` and `Unavailable` mean the request was definitely not applied and
may be retried anywhere. `Indeterminate` means it may or may not have applied
(a timeout after the command was sent); retrying a write with the same
request_id is safe, because the state machine deduplicates it.
"""

from __future__ import annotations


class KVError(Exception):
    """Base of every error the KV client raises."""


class NotLeader(KVError):
    """This node is not the Raft leader; the request was not applied."""

    def __init__(self, message: str, leader: str = "") -> None:
        super().__init__(message)
        self.leader = leader


class Unavailable(KVError):
    """No quorum or no reachable node; the request was definitely not applied."""


class Indeterminate(KVError):
    """The outcome is unknown: the command may or may not have been applied."""


class NotFound(KVError):
    """The store or keyspace does not exist (for this tenant)."""


class AlreadyExists(KVError):
    """The store or keyspace exists already."""


class ConditionFailed(KVError):
    """A batch condition did not hold; nothing was applied."""

    def __init__(self, message: str, index: int = 0) -> None:
        super().__init__(message)
        self.index = index


class InvalidArgument(KVError):
    """The request breaks a limit or is malformed (the caller's fault)."""


class PermissionDenied(KVError):
    """The tenant token is missing or unknown."""
