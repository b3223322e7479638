"""What the target needs of a volume: the BlockDevice protocol (DESIGN.md §1, §7).

iscsi/ never imports blockdev/, kv/ or objstore/. A volume is served through
this small interface, which blockdev's Volume satisfies through an adapter in
cluster/ (translating its errors into the ones below), and which an in-memory
device (iscsi/memdev.py) satisfies for tests.

Every method may block (a flush waits for blob puts and a Raft commit); the
server calls them from worker threads, never from the event loop. Errors are
typed so the SCSI layer can answer each with the sense the standard names.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol


class DeviceError(Exception):
    """Base of what a BlockDevice raises; anything else is a target failure (LOGICAL UNIT FAILURE sense)."""


class OutOfRange(DeviceError):
    """An LBA range past the capacity: ILLEGAL REQUEST, LOGICAL BLOCK ADDRESS OUT OF RANGE (21h/00h)."""


class InvalidField(DeviceError):
    """A request the device cannot take as given: ILLEGAL REQUEST, INVALID FIELD IN CDB (24h/00h)."""


class SpaceExhausted(DeviceError):
    """Thin provisioning hard limit: DATA PROTECT, SPACE ALLOCATION FAILED WRITE PROTECT (27h/07h)."""


class Miscompare(DeviceError):
    """COMPARE AND WRITE found different data: MISCOMPARE, MISCOMPARE DURING VERIFY OPERATION (1Dh/00h),
    with the byte offset of the first difference in the sense INFORMATION field."""

    def __init__(self, offset: int) -> None:
        super().__init__(f"miscompare at byte {offset}")
        self.offset = offset


class Unavailable(DeviceError):
    """The cluster cannot complete the request now (no quorum, blob tier unreachable); the data is
    kept buffered. NOT READY, LOGICAL UNIT NOT READY, ... (04h/xx) or a retryable error."""


class Fenced(DeviceError):
    """This node no longer owns the volume (another node took it over): the connection must be
    dropped so the initiator logs in again and is redirected to the new owner."""


class BlockDevice(Protocol):
    """A volume as the target sees it, in logical blocks."""

    @property
    def block_size(self) -> int:
        """Logical block size in bytes: 512 or 4096."""
        ...

    @property
    def capacity_blocks(self) -> int:
        """Number of logical blocks (may grow while served: a resize)."""
        ...

    def read(self, lba: int, count: int) -> bytes: ...

    def write(self, lba: int, data: bytes, *, fua: bool = False) -> None:
        """Whole blocks. Without fua: into the write-back cache. With fua: durable before return."""
        ...

    def flush(self) -> None:
        """Every write that completed before this call is durable when it returns (DESIGN.md §2)."""
        ...

    def unmap(self, ranges: Sequence[tuple[int, int]]) -> None:
        """Punch holes: (lba, count) ranges read as zeros afterwards."""
        ...

    def write_same(self, lba: int, count: int, block: bytes, *, unmap: bool = False) -> None:
        """Write one block's content to `count` blocks; with unmap and a zero block, punch holes."""
        ...

    def compare_and_write(self, lba: int, compare: bytes, data: bytes) -> None:
        """Atomic against every other write: raises Miscompare(offset) when the blocks differ from `compare`."""
        ...

    def lba_status(self, lba: int) -> tuple[int, int, bool]:
        """(lba, blocks, mapped) for the run of blocks from `lba` that share one provisioning state."""
        ...

    def soft_threshold_event(self) -> bool:
        """True once each time mapped bytes cross the thin-provisioning soft threshold."""
        ...

    @property
    def writes_lost(self) -> bool:
        """True when this device took the volume over from an owner that died holding
        acknowledged writes no flush had made durable (blockdev/volume.py): the target
        must not answer the next SYNCHRONIZE CACHE of any I_T nexus with GOOD."""
        ...
