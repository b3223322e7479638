"""An in-memory BlockDevice (iscsi/device.py) for tests and demos.

Theory of operation. The device is thin, like a floe volume: a block is *mapped*
exactly when it holds non-zero data, and unmapped blocks read as zeros (the same rule
blockdev/ applies: all-zero runs are stored as holes, DESIGN.md §5). Mapped blocks live
in a dict keyed by LBA, so a large virtual capacity costs nothing until written.

Thin provisioning limits are counted in mapped blocks: writing non-zero data that
would map more than ``hard_limit_blocks`` raises SpaceExhausted and changes nothing
(overwriting blocks that are already mapped always succeeds, as on a real thin
device), and crossing ``soft_threshold_blocks`` upwards arms a one-shot event that
``soft_threshold_event`` reports once.

There is no cache: every write is immediately "durable". ``flushes`` and
``fua_writes`` count the durability barriers the SCSI layer asked for, so tests can
check that SYNCHRONIZE CACHE and FUA reach the device. One lock serialises all
mutations, which also makes COMPARE AND WRITE atomic against every other write.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

from iscsi.device import InvalidField, Miscompare, OutOfRange, SpaceExhausted

# lba_status reports runs of at most this many blocks, so one call never scans an
# arbitrarily large unmapped device; the caller continues from where the run ended.
LBA_STATUS_RUN_BLOCKS_MAX = 1 << 16

_BLOCK_SIZES = (512, 4096)  # the logical block sizes a floe volume can have (DESIGN.md §5)


class MemDevice:
    """A thin in-memory block device implementing iscsi.device.BlockDevice."""

    def __init__(
        self,
        blocks: int,
        block_size: int = 512,
        *,
        hard_limit_blocks: int | None = None,
        soft_threshold_blocks: int | None = None,
    ) -> None:
        if block_size not in _BLOCK_SIZES:
            raise ValueError(f"block size {block_size} is not one of {_BLOCK_SIZES}")
        if blocks < 0:
            raise ValueError(f"negative capacity {blocks}")
        self._block_size = block_size
        self._blocks = blocks
        self._hard_limit = hard_limit_blocks
        self._soft_threshold = soft_threshold_blocks
        self._zero = bytes(block_size)
        self._mapped: dict[int, bytes] = {}
        self._lock = threading.Lock()
        self._above_soft = False
        self._soft_event = False
        self.flushes = 0
        # Set by tests: as if this device took over from an owner that lost cached writes.
        self.writes_lost = False
        self.fua_writes = 0
        self.writes = 0

    # ------------------------------------------------------------------ geometry

    @property
    def block_size(self) -> int:
        return self._block_size

    @property
    def capacity_blocks(self) -> int:
        return self._blocks

    @property
    def mapped_blocks(self) -> int:
        with self._lock:
            return len(self._mapped)

    def resize(self, blocks: int) -> None:
        """Grow or shrink the device (a shrink drops the blocks past the new end)."""
        if blocks < 0:
            raise ValueError(f"negative capacity {blocks}")
        with self._lock:
            for lba in [lba for lba in self._mapped if lba >= blocks]:
                del self._mapped[lba]
            self._blocks = blocks
            self._update_soft_locked()

    # ------------------------------------------------------------------ BlockDevice

    def read(self, lba: int, count: int) -> bytes:
        with self._lock:
            self._check_range(lba, count)
            return b"".join(self._mapped.get(b, self._zero) for b in range(lba, lba + count))

    def write(self, lba: int, data: bytes, *, fua: bool = False) -> None:
        count = self._whole_blocks(data)
        with self._lock:
            self._check_range(lba, count)
            blocks = [data[i * self._block_size : (i + 1) * self._block_size] for i in range(count)]
            self._store_locked(lba, blocks)
            self.writes += 1
            if fua:
                self.fua_writes += 1

    def flush(self) -> None:
        with self._lock:
            self.flushes += 1

    def unmap(self, ranges: Sequence[tuple[int, int]]) -> None:
        with self._lock:
            for lba, count in ranges:  # all ranges are checked before any is applied
                self._check_range(lba, count)
            for lba, count in ranges:
                for b in range(lba, lba + count):
                    self._mapped.pop(b, None)
            self._update_soft_locked()

    def write_same(self, lba: int, count: int, block: bytes, *, unmap: bool = False) -> None:
        if len(block) != self._block_size:
            raise InvalidField(f"write same block of {len(block)} bytes, block size {self._block_size}")
        with self._lock:
            self._check_range(lba, count)
            # With unmap and a zero block the blocks become holes; without unmap a zero
            # block is stored as a hole anyway (zero blocks are never mapped here).
            self._store_locked(lba, [bytes(block)] * count)
            self.writes += 1

    def compare_and_write(self, lba: int, compare: bytes, data: bytes) -> None:
        count = self._whole_blocks(compare)
        if len(data) != len(compare):
            raise InvalidField(f"compare ({len(compare)} bytes) and write ({len(data)} bytes) data differ in size")
        with self._lock:
            self._check_range(lba, count)
            current = b"".join(self._mapped.get(b, self._zero) for b in range(lba, lba + count))
            if current != compare:
                offset = next(i for i in range(len(current)) if current[i] != compare[i])
                raise Miscompare(offset)
            blocks = [data[i * self._block_size : (i + 1) * self._block_size] for i in range(count)]
            self._store_locked(lba, blocks)
            self.writes += 1

    def lba_status(self, lba: int) -> tuple[int, int, bool]:
        with self._lock:
            if not 0 <= lba < self._blocks:
                raise OutOfRange(f"lba {lba} past capacity {self._blocks}")
            mapped = lba in self._mapped
            end = min(self._blocks, lba + LBA_STATUS_RUN_BLOCKS_MAX)
            run = 1
            while lba + run < end and ((lba + run) in self._mapped) == mapped:
                run += 1
            return lba, run, mapped

    def soft_threshold_event(self) -> bool:
        with self._lock:
            event, self._soft_event = self._soft_event, False
            return event

    # ------------------------------------------------------------------ internals

    def _whole_blocks(self, data: bytes) -> int:
        if len(data) % self._block_size:
            raise InvalidField(f"{len(data)} bytes is not a whole number of {self._block_size}-byte blocks")
        return len(data) // self._block_size

    def _check_range(self, lba: int, count: int) -> None:
        if lba < 0 or count < 0:
            raise InvalidField(f"negative lba {lba} or count {count}")
        if lba + count > self._blocks:
            raise OutOfRange(f"blocks {lba}..{lba + count} past capacity {self._blocks}")

    def _store_locked(self, lba: int, blocks: list[bytes]) -> None:
        """Store whole blocks at lba; zero blocks become holes. All or nothing."""
        if self._hard_limit is not None:
            newly_mapped = sum(
                1 for i, block in enumerate(blocks) if block != self._zero and (lba + i) not in self._mapped
            )
            freed = sum(1 for i, block in enumerate(blocks) if block == self._zero and (lba + i) in self._mapped)
            if newly_mapped and len(self._mapped) - freed + newly_mapped > self._hard_limit:
                raise SpaceExhausted(
                    f"{newly_mapped} more mapped blocks would pass the hard limit of {self._hard_limit}"
                )
        for i, block in enumerate(blocks):
            if block == self._zero:
                self._mapped.pop(lba + i, None)
            else:
                self._mapped[lba + i] = block
        self._update_soft_locked()

    def _update_soft_locked(self) -> None:
        if self._soft_threshold is None:
            return
        above = len(self._mapped) >= self._soft_threshold
        if above and not self._above_soft:
            self._soft_event = True
        self._above_soft = above
