"""The node's iSCSI targets: one per volume, served by the volume's owner (DESIGN.md §6, §7).

Theory of operation. The iSCSI server (iscsi/server.py) asks a Catalog about
targets; this is the node's. A target name is
`iqn.2026-11.io.floe:<tenant>.<volume>`; the tenant's KV token comes from the
node's config, so a node serves the volumes of the tenants it knows.

Ownership decides where a volume is served. At login the catalog reads the
volume's lease: if another node holds it and renewed it within 1.5 lease
periods (by the lease's own wall-clock stamp: a hint for routing only, never
for safety), the login is redirected to that node's portal (RFC 7143 login
status 0101h, "target moved temporarily"). Otherwise this node opens the
volume, which takes its lease (waiting the lease out, by this node's own
clock, if a silent owner still holds it) with epoch+1. Safety does not rest on
that judgement: every flush is fenced by the owner epoch (DESIGN.md §2 point 5),
and an owner that learns it lost the volume stops serving it: the logical unit
raises LunFenced, the server closes its connections, and the initiator's next
login is redirected to the new owner. A new owner's logical unit is new, so
every I_T nexus gets the power-on/reset UNIT ATTENTION first (§2 point 6).

A background thread (every RESIZE_POLL_S) notices a resize in the registry
(CAPACITY DATA HAS CHANGED to every nexus) and refreshes the tenant's pool
usage, which the thin-provisioning hard limit reads.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import threading
import time
from collections.abc import Sequence
from typing import Any

import msgpack

from blockdev import errors as berr
from blockdev.registry import EPOCH_KEY, LEASE_KEY, Registry, VolumeInfo, u64
from blockdev.volume import Volume
from cluster.config import NodeConfig
from iscsi import device as dev
from iscsi.login import ChapSecrets, TargetPolicy, TargetUnavailable
from iscsi.scsi import LogicalUnit, LunIdentity
from kv.errors import KVError

log = logging.getLogger("floe.targets")

IQN_PREFIX = "iqn.2026-11.io.floe:"
PR_KEY = b"pr"  # persistent reservations, in the volume's meta keyspace
RESIZE_POLL_S = 2.0
# A lease renewed within this many lease periods counts as held (routing only).
LEASE_FRESH_PERIODS = 1.5


def target_name(tenant: str, volume: str) -> str:
    return f"{IQN_PREFIX}{tenant}.{volume}"


def parse_target_name(name: str) -> tuple[str, str] | None:
    """(tenant, volume) of a floe target name; None if it is not one. Tenant names hold no '.'."""
    if not name.lower().startswith(IQN_PREFIX):
        return None
    rest = name[len(IQN_PREFIX):]
    tenant, dot, volume = rest.partition(".")
    if not dot or not tenant or not volume:
        return None
    return tenant, volume


def naa_designator(volume_id: str) -> bytes:
    """A 16-byte NAA IEEE Registered Extended designator (SPC-4 §7.8.6.6.6) made from the
    volume id: NAA 6, then bytes of SHA-256(id), stable for the volume's life."""
    h = hashlib.sha256(b"floe-naa:" + volume_id.encode()).digest()
    return bytes([0x60 | (h[0] & 0x0F)]) + h[1:16]


class VolumeDevice:
    """iscsi.device.BlockDevice over a blockdev Volume: the same calls, errors translated."""

    def __init__(self, volume: Volume) -> None:
        self.volume = volume

    @property
    def block_size(self) -> int:
        return self.volume.block_size

    @property
    def capacity_blocks(self) -> int:
        return self.volume.capacity_blocks

    def _call(self, fn: Any, *args: Any, **kw: Any) -> Any:
        try:
            return fn(*args, **kw)
        except berr.Fenced as e:
            raise dev.Fenced(str(e)) from e
        except berr.OutOfRange as e:
            raise dev.OutOfRange(str(e)) from e
        except berr.SpaceExhausted as e:
            raise dev.SpaceExhausted(str(e)) from e
        except berr.Miscompare as e:
            raise dev.Miscompare(e.offset) from e
        except berr.InvalidRequest as e:
            raise dev.InvalidField(str(e)) from e
        except (berr.Unavailable, KVError) as e:
            raise dev.Unavailable(str(e)) from e

    def read(self, lba: int, count: int) -> bytes:
        return bytes(self._call(self.volume.read, lba, count))

    def write(self, lba: int, data: bytes, *, fua: bool = False) -> None:
        self._call(self.volume.write, lba, data, fua=fua)

    def flush(self) -> None:
        self._call(self.volume.flush)

    def unmap(self, ranges: Sequence[tuple[int, int]]) -> None:
        self._call(self.volume.unmap, ranges)

    def write_same(self, lba: int, count: int, block: bytes, *, unmap: bool = False) -> None:
        self._call(self.volume.write_same, lba, count, block, unmap=unmap)

    def compare_and_write(self, lba: int, compare: bytes, data: bytes) -> None:
        self._call(self.volume.compare_and_write, lba, compare, data)

    def lba_status(self, lba: int) -> tuple[int, int, bool]:
        out: tuple[int, int, bool] = self._call(self.volume.lba_status, lba)
        return out

    def soft_threshold_event(self) -> bool:
        return bool(self.volume.soft_threshold_event())

    @property
    def writes_lost(self) -> bool:
        return self.volume.writes_lost


class KVReservations:
    """Persistent reservation state (iscsi/reservations.py ReservationStore) in the volume's
    meta keyspace, written only while our owner epoch holds, so it survives a failover and a
    stale owner cannot change it."""

    def __init__(self, kv: Any, volume: Volume) -> None:
        self.kv = kv
        self.volume = volume

    def load(self) -> bytes | None:
        try:
            found = self.kv.get(self.volume.info.store, "meta", PR_KEY)
        except KVError as e:
            raise dev.Unavailable(f"reading reservations: {e}") from e
        return None if found is None else bytes(found[0])

    def save(self, state: bytes) -> None:
        from proto import kv_pb2

        try:
            applied, _i, _f = self.kv.batch(
                self.volume.info.store,
                conditions=[kv_pb2.Condition(keyspace="meta", key=EPOCH_KEY, value_equals=u64(self.volume.epoch))],
                mutations=[kv_pb2.Mutation(keyspace="meta", key=PR_KEY, put=state)])
        except KVError as e:
            raise dev.Unavailable(f"saving reservations: {e}") from e
        if not applied:
            raise dev.Unavailable("saving reservations: this node no longer owns the volume")


@dataclasses.dataclass(slots=True)
class _Served:
    tenant: str
    info: VolumeInfo
    volume: Volume
    lu: LogicalUnit


class VolumeCatalog:
    """iscsi.server.Catalog for a floe node (module docstring)."""

    def __init__(self, cfg: NodeConfig, blobs: Any, *, kv_clients: dict[str, Any] | None = None) -> None:
        self.cfg = cfg
        self.blobs = blobs
        if kv_clients is None:
            from kv.client import KVClient

            servers = [cfg.api_address] + [p.api_address for p in cfg.peers]
            kv_clients = {t.name: KVClient(servers, t.token, timeout_s=10.0) for t in cfg.tenants}
        self.kvs = kv_clients
        self.portals = {p.id: p.iscsi_address for p in cfg.all_peers()}
        self._served: dict[str, _Served] = {}
        self._lock = threading.Lock()
        self._opening: dict[str, threading.Lock] = {}
        self._usage: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll_loop, name="targets-poll", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------ lookups

    def _resolve(self, target: str) -> tuple[str, Registry, VolumeInfo] | None:
        parsed = parse_target_name(target)
        if parsed is None or parsed[0] not in self.kvs:
            return None
        tenant, name = parsed
        reg = Registry(self.kvs[tenant])
        try:
            return tenant, reg, reg.get(name)
        except (berr.NoSuchVolume, berr.InvalidRequest):
            return None

    def _live_holder(self, info: VolumeInfo, kv: Any) -> str | None:
        """The node holding a fresh lease on the volume, if that is another node (routing only)."""
        found = kv.get(info.store, "meta", LEASE_KEY)
        if found is None:
            return None
        lease = msgpack.unpackb(found[0], raw=False)
        holder = str(lease.get("node", ""))
        if holder == self.cfg.node_id or holder not in self.portals:
            return None
        age_s = time.time() - float(lease.get("renewed", 0.0))
        return holder if age_s < LEASE_FRESH_PERIODS * self.cfg.volume.lease_s else None

    def policy(self, target: str) -> TargetPolicy | None:
        try:
            return self._policy(target)
        except (KVError, dev.Unavailable) as e:
            raise TargetUnavailable(str(e)) from e

    def _policy(self, target: str) -> TargetPolicy | None:
        resolved = self._resolve(target)
        if resolved is None:
            return None
        tenant, reg, info = resolved
        acl = reg.get_acl(info.name)
        redirect = None
        with self._lock:
            served = self._served.get(target)
        if served is None:
            holder = self._live_holder(info, self.kvs[tenant])
            if holder is not None:
                redirect = self.portals[holder]
            else:
                self._open(target, tenant, info)
        chap = None
        if acl.get("chap"):
            c = acl["chap"]
            chap = ChapSecrets(user=str(c["user"]), secret=str(c["secret"]).encode(),
                               mutual_user=c.get("mutual_user") or None,
                               mutual_secret=str(c["mutual_secret"]).encode() if c.get("mutual_secret") else None)
        inits = acl.get("initiators")
        return TargetPolicy(name=target, allowed_initiators=None if inits is None else frozenset(inits),
                            chap=chap, redirect=redirect)

    def targets(self, initiator_name: str) -> list[tuple[str, list[str]]]:
        """Every volume this initiator may log in to, with every node's portal (owner first)."""
        out: list[tuple[str, list[str]]] = []
        for tenant, kv in sorted(self.kvs.items()):
            reg = Registry(kv)
            try:
                infos = reg.list()
            except KVError as e:
                log.warning("event=send_targets_failed tenant=%s error=%s", tenant, e)
                continue
            for info in infos:
                try:
                    acl = reg.get_acl(info.name)
                except (KVError, berr.NoSuchVolume):
                    continue
                inits = acl.get("initiators")
                if inits is not None and initiator_name not in inits:
                    continue
                portals = [f"{addr},1" for _pid, addr in sorted(self.portals.items())]
                out.append((target_name(tenant, info.name), portals))
        return out

    def logical_unit(self, target: str) -> LogicalUnit:
        with self._lock:
            served = self._served.get(target)
        if served is not None:
            return served.lu
        resolved = self._resolve(target)
        if resolved is None:
            raise dev.Unavailable(f"no target {target}")
        tenant, _reg, info = resolved
        return self._open(target, tenant, info).lu

    def fenced(self, target: str, lu: LogicalUnit) -> None:
        with self._lock:
            served = self._served.get(target)
            if served is None or served.lu is not lu:
                return
            del self._served[target]
        log.warning("event=target_fenced target=%s node=%s", target, self.cfg.node_id)
        try:
            served.volume.close(flush=False)
        except Exception as e:  # noqa: BLE001 - it is fenced; closing only releases threads
            log.info("event=fenced_close_failed target=%s error=%s", target, e)

    # ------------------------------------------------------------ opening

    def _open(self, target: str, tenant: str, info: VolumeInfo) -> _Served:
        with self._lock:
            opening = self._opening.setdefault(target, threading.Lock())
        with opening:
            with self._lock:
                served = self._served.get(target)
            if served is not None:
                return served
            kv = self.kvs[tenant]
            settings = dataclasses.asdict(self.cfg.volume)
            vol = Volume(kv, info, self.blobs, self.cfg.node_id, pool_allocated=lambda: self._usage.get(tenant, 0),
                         **settings)
            try:
                vol.open()
            except (berr.Unavailable, KVError) as e:
                raise dev.Unavailable(f"opening {info.name}: {e}") from e
            identity = LunIdentity(serial=info.id, naa=naa_designator(info.id), target_name=target)
            lu = LogicalUnit(VolumeDevice(vol), identity, reservations=KVReservations(kv, vol))
            served = _Served(tenant, info, vol, lu)
            with self._lock:
                self._served[target] = served
            log.info("event=target_opened target=%s node=%s epoch=%d", target, self.cfg.node_id, vol.epoch)
            return served

    # ------------------------------------------------------------ background

    def _poll_loop(self) -> None:
        while not self._stop.wait(RESIZE_POLL_S):
            for tenant, kv in list(self.kvs.items()):
                try:
                    self._usage[tenant] = Registry(kv).usage()["allocated"]
                except Exception as e:  # noqa: BLE001 - the previous figure stays
                    log.debug("event=usage_poll_failed tenant=%s error=%s", tenant, e)
            with self._lock:
                served = list(self._served.values())
            for s in served:
                try:
                    info = Registry(self.kvs[s.tenant]).get(s.info.name)
                except Exception:  # noqa: BLE001 - next round
                    continue
                if info.size != s.volume.info.size:
                    s.volume.info = info
                    s.info = info
                    s.lu.capacity_changed()
                    log.info("event=target_resized volume=%s size=%d", info.name, info.size)

    def close(self) -> None:
        """Flush and release every volume this node serves (a clean stop hands them over at once)."""
        self._stop.set()
        with self._lock:
            served = list(self._served.values())
            self._served.clear()
        for s in served:
            try:
                s.volume.close(flush=True)
            except Exception as e:  # noqa: BLE001 - unflushed data is the initiator's cache, as §2 allows
                log.warning("event=target_close_failed volume=%s error=%s", s.info.name, e)
        for kv in self.kvs.values():
            close = getattr(kv, "close", None)
            if close is not None:
                close()
