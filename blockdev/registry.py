"""Volumes in the KV: the registry and each volume's own store.

Layout (all in the tenant's namespace, so one tenant never sees another's):

  store "volumes", keyspace "registry":
      volume name -> msgpack {"id", "size", "block_size", "created", "ancestors",
                              "origin", "acl"}; acl = {"initiators": [IQN, ...] or
                              absent (any initiator), "chap": {"user", "secret",
                              "mutual_user", "mutual_secret"} or absent}
  store "vol.<id>" (one per volume, the blog's "a store per volume"):
      keyspace "meta":      b"epoch" -> owner epoch (u64 BE); changes only on takeover
                            b"lease" -> msgpack {"node", "epoch", "renewed"}
                            b"flush_seq" -> u64 BE, the last committed flush
                            b"gen" -> u64 BE, the current generation (snapshots)
                            b"allocated" -> u64 BE, bytes mapped at the head
                            b"dirty" -> msgpack {"node", "epoch"} while the owner
                            holds unflushed acknowledged writes
      keyspace "segments":  segment index (u64 BE) + (2^64-1 - generation) (u64 BE)
                            -> segment record (blockdev/extents.py). Versioned by
                            generation so snapshots can keep old versions; a
                            forward scan from (index, 2^64-1 - G) finds the
                            newest record visible at generation G.
      keyspace "snapshots": name -> msgpack {"gen", "created"}
      keyspace "changelog": flush seq (u64 BE) -> msgpack {"segments": [...], "gen"}

A flush is one conditional batch on the volume's store: every changed
segment record, the new flush_seq and a changelog entry, applied only if
meta/epoch still holds the flusher's epoch (fencing, DESIGN.md §2 point 5).
"""

from __future__ import annotations

import builtins
import os
import struct
import time
from dataclasses import dataclass
from typing import Any

import msgpack

from blockdev.errors import InvalidRequest, NoSuchVolume, VolumeExists
from kv.errors import AlreadyExists, NotFound

REGISTRY_STORE = "volumes"
REGISTRY_KS = "registry"
KEYSPACES = ("meta", "segments", "snapshots", "changelog")
BLOCK_SIZES = (512, 4096)
VOLUME_BYTES_MAX = 64 << 40  # 64 TiB
NAME_BYTES_MAX = 100
GEN_MAX = (1 << 64) - 1

EPOCH_KEY = b"epoch"
LEASE_KEY = b"lease"
FLUSH_SEQ_KEY = b"flush_seq"
GEN_KEY = b"gen"
ALLOCATED_KEY = b"allocated"  # bytes mapped at the head, written by every flush
# Present while the owner holds acknowledged writes that no flush has made durable
# yet: written before the first such write completes, deleted once a flush leaves
# the buffer empty. A new owner that finds it knows acknowledged writes were lost.
DIRTY_KEY = b"dirty"


def u64(n: int) -> bytes:
    return struct.pack(">Q", n)


def from_u64(b: bytes) -> int:
    if len(b) != 8:
        raise ValueError(f"expected 8 bytes, got {len(b)}")
    return int(struct.unpack(">Q", b)[0])


def segment_key(index: int, gen: int = 0) -> bytes:
    return u64(index) + u64(GEN_MAX - gen)


def parse_segment_key(key: bytes) -> tuple[int, int]:
    return from_u64(key[:8]), GEN_MAX - from_u64(key[8:16])


@dataclass(frozen=True, slots=True)
class VolumeInfo:
    name: str
    id: str
    size: int
    block_size: int
    created: float
    # A clone reads segments it has never written from its ancestors: the
    # (store, generation) of the snapshot it was cloned from, then that
    # volume's own ancestors.
    ancestors: tuple[tuple[str, int], ...] = ()
    origin: str = ""  # "volume@snapshot" it was cloned from

    @property
    def store(self) -> str:
        return f"vol.{self.id}"

    @property
    def blocks(self) -> int:
        return self.size // self.block_size

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "id": self.id, "size": self.size, "block_size": self.block_size,
                "blocks": self.blocks, "created": self.created, "origin": self.origin or None}


def _check_name(name: str) -> None:
    if not name or len(name.encode()) > NAME_BYTES_MAX or not name.isprintable() or any(c in name for c in "/@ "):
        raise InvalidRequest(f"a volume name is 1-{NAME_BYTES_MAX} printable bytes without '/', '@' or spaces, "
                             f"got {name!r}")


def _check_size(size: int, block_size: int) -> None:
    if block_size not in BLOCK_SIZES:
        raise InvalidRequest(f"block size must be one of {BLOCK_SIZES}, got {block_size}")
    if not 0 < size <= VOLUME_BYTES_MAX:
        raise InvalidRequest(f"size must be between 1 byte and {VOLUME_BYTES_MAX} bytes, got {size}")
    if size % block_size:
        raise InvalidRequest(f"size {size} is not a multiple of the block size {block_size}")


ACL_INITIATORS_MAX = 256
CHAP_SECRET_BYTES_MIN = 12  # RFC 7143 §12.1.3 recommends at least 96 bits of secret
CHAP_SECRET_BYTES_MAX = 255


def _check_acl(acl: dict[str, Any]) -> None:
    unknown = set(acl) - {"initiators", "chap"}
    if unknown:
        raise InvalidRequest(f"unknown ACL fields {sorted(unknown)}")
    inits = acl.get("initiators")
    if inits is not None:
        if not isinstance(inits, list) or len(inits) > ACL_INITIATORS_MAX:
            raise InvalidRequest(f"initiators must be a list of at most {ACL_INITIATORS_MAX} names")
        for n in inits:
            if not isinstance(n, str) or not n.startswith(("iqn.", "eui.", "naa.")) or len(n) > 223 or " " in n:
                raise InvalidRequest(f"{n!r} is not an iSCSI name (iqn./eui./naa., at most 223 bytes)")
    chap = acl.get("chap")
    if chap is not None:
        if not isinstance(chap, dict) or not chap.get("user") or not chap.get("secret"):
            raise InvalidRequest("CHAP needs a user and a secret")
        for who in ("secret", "mutual_secret"):
            sec = chap.get(who)
            if sec is not None and not CHAP_SECRET_BYTES_MIN <= len(str(sec).encode()) <= CHAP_SECRET_BYTES_MAX:
                raise InvalidRequest(f"a CHAP {who.replace('_', ' ')} must be {CHAP_SECRET_BYTES_MIN}-"
                                     f"{CHAP_SECRET_BYTES_MAX} bytes (RFC 7143 §12.1.3 asks for 96 bits or more)")
        if bool(chap.get("mutual_user")) != bool(chap.get("mutual_secret")):
            raise InvalidRequest("mutual CHAP needs both a user and a secret")
        if chap.get("mutual_secret") and chap.get("mutual_secret") == chap.get("secret"):
            raise InvalidRequest("the mutual CHAP secret must differ from the initiator's (RFC 7143 §12.1.3)")


def _decode(name: str, raw: bytes) -> VolumeInfo:
    d = msgpack.unpackb(raw, raw=False)
    return VolumeInfo(name=name, id=str(d["id"]), size=int(d["size"]), block_size=int(d["block_size"]),
                      created=float(d["created"]),
                      ancestors=tuple((str(a), int(g)) for a, g in d.get("ancestors", ())),
                      origin=str(d.get("origin", "")))


class Registry:
    """Create, find, resize and delete volumes through a kv.client.KVClient-like object."""

    def __init__(self, kv: Any) -> None:
        self.kv = kv
        self._ready = False

    def _ensure(self) -> None:
        if self._ready:
            return
        for fn, args in ((self.kv.create_store, (REGISTRY_STORE,)),
                         (self.kv.create_keyspace, (REGISTRY_STORE, REGISTRY_KS))):
            try:
                fn(*args)
            except AlreadyExists:
                pass
        self._ready = True

    def create(self, name: str, size: int, block_size: int = 512, *,
               ancestors: tuple[tuple[str, int], ...] = (), origin: str = "") -> VolumeInfo:
        _check_name(name)
        _check_size(size, block_size)
        self._ensure()
        info = VolumeInfo(name, os.urandom(8).hex(), size, block_size, time.time(), ancestors, origin)
        # The volume's store first: a crash before the registry entry leaves
        # an unnamed store (harmless), never a name without its store.
        self.kv.create_store(info.store)
        for ks in KEYSPACES:
            self.kv.create_keyspace(info.store, ks)
        self.kv.put(info.store, "meta", GEN_KEY, u64(0))
        from proto import kv_pb2

        raw = msgpack.packb({"id": info.id, "size": size, "block_size": block_size, "created": info.created,
                             "ancestors": [list(a) for a in ancestors], "origin": origin})
        applied, _index, _failed = self.kv.batch(
            REGISTRY_STORE, conditions=[kv_pb2.Condition(keyspace=REGISTRY_KS, key=name.encode(), absent=True)],
            mutations=[kv_pb2.Mutation(keyspace=REGISTRY_KS, key=name.encode(), put=raw)])
        if not applied:
            self.kv.drop_store(info.store)
            raise VolumeExists(f"a volume named {name!r} already exists")
        return info

    def get(self, name: str) -> VolumeInfo:
        _check_name(name)
        self._ensure()
        found = self.kv.get(REGISTRY_STORE, REGISTRY_KS, name.encode())
        if found is None:
            raise NoSuchVolume(f"no volume named {name!r}")
        return _decode(name, found[0])

    def list(self) -> list[VolumeInfo]:
        self._ensure()
        out: list[VolumeInfo] = []
        cont = b""
        while True:
            rows, cont = self.kv.scan(REGISTRY_STORE, REGISTRY_KS, limit=1000, continuation=cont)
            out.extend(_decode(k.decode(), v) for k, v, _ver in rows)
            if not cont:
                return out

    def _entry(self, name: str) -> tuple[dict[str, Any], int]:
        """A volume's registry entry (decoded) and its version."""
        self._ensure()
        found = self.kv.get(REGISTRY_STORE, REGISTRY_KS, name.encode())
        if found is None:
            raise NoSuchVolume(f"no volume named {name!r}")
        return msgpack.unpackb(found[0], raw=False), found[1]

    def _replace_entry(self, name: str, entry: dict[str, Any], version: int, doing: str) -> None:
        """Write an entry back, only if nobody changed it since it was read at `version`."""
        from proto import kv_pb2

        entry.setdefault("ancestors", [])
        applied, _i, _f = self.kv.batch(
            REGISTRY_STORE, conditions=[kv_pb2.Condition(keyspace=REGISTRY_KS, key=name.encode(),
                                                         version_equals=version)],
            mutations=[kv_pb2.Mutation(keyspace=REGISTRY_KS, key=name.encode(), put=msgpack.packb(entry))])
        if not applied:
            raise InvalidRequest(f"{name} changed while {doing}; try again")

    def resize(self, name: str, new_size: int, *, force: bool = False) -> VolumeInfo:
        entry, version = self._entry(name)
        info = _decode(name, msgpack.packb(entry))
        _check_size(new_size, info.block_size)
        if new_size < info.size and not force:
            raise InvalidRequest(f"shrinking {name} from {info.size} to {new_size} bytes discards data; "
                                 "pass force to do it anyway")
        entry["size"] = new_size
        self._replace_entry(name, entry, version, "it was being resized")
        return _decode(name, msgpack.packb(entry))

    def get_acl(self, name: str) -> dict[str, Any]:
        """The volume's iSCSI access list: {"initiators": [...]} and/or {"chap": {...}}; {} = open."""
        entry, _version = self._entry(name)
        return dict(entry.get("acl") or {})

    def set_acl(self, name: str, acl: dict[str, Any]) -> dict[str, Any]:
        """Replace the volume's access list (checked: initiator names and CHAP fields)."""
        _check_acl(acl)
        entry, version = self._entry(name)
        entry["acl"] = acl
        self._replace_entry(name, entry, version, "its ACL was being set")
        return acl

    def clones_of(self, store: str) -> builtins.list[VolumeInfo]:
        """Volumes that read through `store` (clones of its snapshots, at any depth)."""
        return [v for v in self.list() if any(a == store for a, _g in v.ancestors)]

    def usage(self) -> dict[str, int]:
        """The tenant's pool: provisioned (sum of sizes) and allocated (sum of
        each volume's mapped bytes as of its last flush)."""
        provisioned = allocated = 0
        for v in self.list():
            provisioned += v.size
            found = self.kv.get(v.store, "meta", ALLOCATED_KEY)
            allocated += from_u64(found[0]) if found else 0
        return {"provisioned": provisioned, "allocated": allocated}

    def delete(self, name: str) -> VolumeInfo:
        """Remove the volume: its name first, then its store. Its blobs are
        left for GC (no live set names them any more). Refused while clones
        read through it."""
        info = self.get(name)
        clones = self.clones_of(info.store)
        if clones:
            raise InvalidRequest(f"volume {name} has clones ({', '.join(c.name for c in clones)}); "
                                 "delete them first")
        self.kv.delete(REGISTRY_STORE, REGISTRY_KS, name.encode())
        try:
            self.kv.drop_store(info.store)
        except NotFound:
            pass
        return info
