"""Snapshots and clones: redirect-on-write of versioned segment records (DESIGN.md §5).

A volume has a generation G (meta/gen). Segment records are keyed by
(segment, generation) and a reader at generation g sees, per segment, the
newest record whose generation is <= g. Creating a snapshot records
{name: G} and moves the volume to G+1, in one batch conditional on meta/gen:
no data and no record is copied. The owner's next flush of a segment writes
a record at G+1 (the conditional batch tells it the generation moved), so
the record the snapshot sees stays as it was.

Deleting a snapshot removes its name first, then every record version that
no remaining viewer (another snapshot, the volume's head, a clone through a
remaining snapshot) sees any more; GC then reclaims blobs no record names.
A snapshot with clones cannot be deleted.

A clone is a new volume whose `ancestors` name the snapshot's (store,
generation): a segment the clone never wrote is read from there.
"""

from __future__ import annotations

import time
from typing import Any

import msgpack

from blockdev.errors import Fenced, InvalidRequest, NoSuchVolume
from blockdev.registry import GEN_KEY, Registry, VolumeInfo, from_u64, parse_segment_key, u64

DELETES_PER_BATCH = 200


def current_gen(kv: Any, info: VolumeInfo) -> int:
    found = kv.get(info.store, "meta", GEN_KEY)
    return from_u64(found[0]) if found else 0


def _gen_condition(kv_pb2: Any, gen: int) -> Any:
    return kv_pb2.Condition(keyspace="meta", key=GEN_KEY, value_equals=u64(gen))


def create(kv: Any, info: VolumeInfo, name: str, *, extra_conditions: tuple[Any, ...] = ()) -> int:
    """Snapshot what is committed now; returns the snapshot's generation."""
    from proto import kv_pb2

    if not name or "/" in name or "@" in name or len(name) > 100 or not name.isprintable():
        raise InvalidRequest(f"bad snapshot name {name!r}")
    for _ in range(10):
        gen = current_gen(kv, info)
        conds = [_gen_condition(kv_pb2, gen), kv_pb2.Condition(keyspace="snapshots", key=name.encode(), absent=True),
                 *extra_conditions]
        muts = [kv_pb2.Mutation(keyspace="snapshots", key=name.encode(),
                                put=msgpack.packb({"gen": gen, "created": time.time()})),
                kv_pb2.Mutation(keyspace="meta", key=GEN_KEY, put=u64(gen + 1))]
        applied, _i, failed = kv.batch(info.store, conditions=conds, mutations=muts)
        if applied:
            return gen
        if failed == 2:
            raise InvalidRequest(f"volume {info.name} already has a snapshot named {name!r}")
        if failed > 2:
            raise Fenced(f"snapshot of {info.name} refused: this node no longer owns the volume")
    raise InvalidRequest(f"volume {info.name} kept changing generation; try again")


def list_(kv: Any, info: VolumeInfo) -> list[dict[str, Any]]:
    out = []
    cont = b""
    while True:
        rows, cont = kv.scan(info.store, "snapshots", limit=1000, continuation=cont)
        for k, v, _ver in rows:
            d = msgpack.unpackb(v, raw=False)
            out.append({"name": k.decode(), "gen": int(d["gen"]), "created": float(d["created"])})
        if not cont:
            return out


def get(kv: Any, info: VolumeInfo, name: str) -> int:
    found = kv.get(info.store, "snapshots", name.encode())
    if found is None:
        raise NoSuchVolume(f"volume {info.name} has no snapshot {name!r}")
    return int(msgpack.unpackb(found[0], raw=False)["gen"])


def delete(kv: Any, registry: Registry, info: VolumeInfo, name: str) -> int:
    """Delete a snapshot and prune record versions nobody sees; returns how many were removed."""
    gen = get(kv, info, name)
    users = [v.name for v in registry.clones_of(info.store) if (info.store, gen) in v.ancestors]
    if users:
        raise InvalidRequest(f"snapshot {info.name}@{name} has clones ({', '.join(users)}); delete them first")
    kv.delete(info.store, "snapshots", name.encode())
    return prune(kv, info)


def prune(kv: Any, info: VolumeInfo) -> int:
    """Remove every record version no viewer sees: a viewer is the head (the
    current generation, and anything newer) or a remaining snapshot."""
    from proto import kv_pb2

    viewers = sorted({s["gen"] for s in list_(kv, info)})
    head = current_gen(kv, info)
    by_segment: dict[int, list[tuple[int, bytes]]] = {}
    cont = b""
    while True:
        rows, cont = kv.scan(info.store, "segments", limit=1000, continuation=cont)
        for k, _v, _ver in rows:
            seg, gen = parse_segment_key(k)
            by_segment.setdefault(seg, []).append((gen, k))
        if not cont:
            break
    doomed: list[bytes] = []
    for versions in by_segment.values():
        gens = sorted(g for g, _k in versions)
        keep = {g for g in gens if g >= head}  # the head may be writing: never touch its generation
        for v in viewers + [head]:
            seen = [g for g in gens if g <= v]
            if seen:
                keep.add(max(seen))
        doomed.extend(k for g, k in versions if g not in keep)
    for i in range(0, len(doomed), DELETES_PER_BATCH):
        kv.batch(info.store, mutations=[kv_pb2.Mutation(keyspace="segments", key=k, delete=True)
                                        for k in doomed[i:i + DELETES_PER_BATCH]])
    return len(doomed)


def clone(kv: Any, registry: Registry, info: VolumeInfo, snapshot: str, new_name: str) -> VolumeInfo:
    gen = get(kv, info, snapshot)
    return registry.create(new_name, info.size, info.block_size,
                           ancestors=((info.store, gen), *info.ancestors), origin=f"{info.name}@{snapshot}")
