"""The volume layer's errors, one per SCSI outcome the target must tell apart.

The iSCSI target (iscsi/) maps each to a sense code; blockdev never imports
iscsi, so the mapping lives there.
"""

from __future__ import annotations


class VolumeError(Exception):
    """Base of the volume layer's errors."""


class OutOfRange(VolumeError):
    """LBA (or LBA + count) beyond the capacity: LOGICAL BLOCK ADDRESS OUT OF RANGE."""


class InvalidRequest(VolumeError):
    """A malformed request (misaligned length, bad block size): INVALID FIELD IN CDB."""


class SpaceExhausted(VolumeError):
    """The pool's hard limit: SPACE ALLOCATION FAILED WRITE PROTECT."""


class Fenced(VolumeError):
    """This node no longer owns the volume (its lease was taken over); nothing
    it buffered was or will be committed."""


class Unavailable(VolumeError):
    """The KV or the object tier cannot serve now (no quorum); the data stays
    buffered and the operation may be retried."""


class Miscompare(VolumeError):
    """COMPARE AND WRITE found different data; `offset` is the first differing byte."""

    def __init__(self, offset: int) -> None:
        super().__init__(f"miscompare at byte {offset}")
        self.offset = offset


class NoSuchVolume(VolumeError):
    """No volume (or snapshot) by that name."""


class VolumeExists(VolumeError):
    """A volume by that name already exists."""
