"""Clients of the blob service (proto/blob.proto): another node's store as an
api.Replica, and the operators' client.

RemoteReplica is what a coordinator holds for every other node: it makes
replica calls only (Put/PutSmall with replicate=false, PutMany, Get/GetSmall
with local_only=true, Has, Delete, List, Verify, Stats) and never retries; the coordinator decides what a
failure means and where to go next. BlobClient is for the CLI and benchmarks:
it makes cluster calls on one node, which coordinates them.

A failed call raises the objstore.api error that says what happened:
  BlobNotFound        no (readable) copy on that node
  BlobCorrupt         the copy failed its checksum or hash (on the server, or
                      here: a whole blob read is hashed end to end)
  InvalidBlob         the request was wrong (bad hash, data/size mismatch,
                      range beyond the blob, a message over the size cap)
  NotEnoughReplicas   a replicated put found fewer than W replicas; it did not
                      succeed
  ReplicaUnavailable  the node could not be reached, timed out, was busy, or
                      broke the protocol; a Put may or may not have stored
                      the blob (harmless: puts are idempotent)
  TokenRejected       (a PermissionError) the node refused the admin token:
                      a configuration error. RemoteReplica raises its
                      subclass ReplicaTokenRejected, which is also a
                      ReplicaUnavailable, so a coordinator treats a peer it
                      may not talk to like one it cannot reach.
The server names the api error class in trailing metadata; when it does, that
class is raised, else the status code decides.

Call deadlines grow with the bytes a call moves (TRANSFER_BYTES_PER_S_MIN), so
a 64 MiB put on a slow link is not cut off while a hung node still fails fast.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Generator, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, BinaryIO, Self

import grpc

from objstore import api
from objstore.pack import COMPRESSION_NONE, EncodedBlob
from objstore.service import ERROR_METADATA, TOKEN_METADATA
from objstore.service import GRPC_RECEIVE_BYTES_MAX as SERVER_RECEIVE_BYTES_MAX
from proto import blob_pb2, blob_pb2_grpc

# Deadlines add one second per this many bytes moved: slower than any link
# floe should run on, so only a stalled transfer hits it.
TRANSFER_BYTES_PER_S_MIN = 4 * 1024 * 1024
# Answers larger than this are refused by the transport: a Get piece is
# CHUNK_BYTES and a full List page about 300 KiB.
GRPC_RECEIVE_BYTES_MAX = 4 * 1024 * 1024
# Reads of files being put, in CHUNK_BYTES pieces (one wire message each).
_FILE_READ_BYTES = api.CHUNK_BYTES


class TokenRejected(PermissionError):
    """The node refused the admin token (x-floe-token): the token configured
    here is not the cluster's. Nothing was done."""


class ReplicaTokenRejected(api.ReplicaUnavailable, TokenRejected):
    """TokenRejected on a replica call: to the coordinator, an unusable replica."""


_API_ERRORS: dict[str, type[api.BlobError]] = {
    cls.__name__: cls for cls in (api.BlobNotFound, api.BlobCorrupt, api.InvalidBlob,
                                  api.NotEnoughReplicas, api.ReplicaUnavailable)
}

_STATUS_ERRORS: dict[grpc.StatusCode, type[api.BlobError]] = {
    grpc.StatusCode.NOT_FOUND: api.BlobNotFound,
    grpc.StatusCode.DATA_LOSS: api.BlobCorrupt,
    grpc.StatusCode.INVALID_ARGUMENT: api.InvalidBlob,
    grpc.StatusCode.OUT_OF_RANGE: api.InvalidBlob,
}


def _mapped(e: grpc.RpcError, where: str, token_error: type[TokenRejected]) -> Exception:
    """The api error (or token_error) for a failed call to the node at `where`."""
    code = e.code() if hasattr(e, "code") else None
    details = (e.details() if hasattr(e, "details") else None) or str(code)
    message = f"{where}: {details}"
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return token_error(f"{where} refused the admin token: the configured token is wrong ({details})")
    trailing = dict(e.trailing_metadata() or ()) if hasattr(e, "trailing_metadata") else {}
    named = _API_ERRORS.get(str(trailing.get(ERROR_METADATA, "")))
    if named is not None:
        return named(message)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in details.lower():
        return api.InvalidBlob(message)  # our request was over the server's message cap
    if code is not None and code in _STATUS_ERRORS:
        return _STATUS_ERRORS[code](message)
    return api.ReplicaUnavailable(message)


class _ProtocolError(api.ReplicaUnavailable):
    """The node answered something the protocol does not allow."""


def _deadline_s(base_s: float, nbytes: int) -> float:
    return base_s + nbytes / TRANSFER_BYTES_PER_S_MIN


def _info(pb: Any) -> api.BlobInfo:
    return api.BlobInfo(hash=bytes(pb.hash), size=int(pb.size), stored_size=int(pb.stored_size),
                        compression=str(pb.compression), age_s=float(pb.age_s))


def _bytes_pieces(data: bytes) -> Iterator[bytes]:
    view = memoryview(data)
    for i in range(0, len(data), api.CHUNK_BYTES):
        yield bytes(view[i:i + api.CHUNK_BYTES])


# PutMany calls one put_many keeps in flight to one node (each at most
# PUT_MANY_BYTES_MAX of data, so at most 16 MiB encoded and waiting).
PUT_MANY_CALLS_IN_FLIGHT = 4


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def encode_put_many(blobs: Sequence[EncodedBlob]) -> bytes:
    """The protobuf encoding of PutManyRequest{blobs: [PutRequest{hash, size,
    data, compression}, ...]} (proto/blob.proto; replicate left false),
    written out by hand so each blob's bytes are copied once, by the final
    join. Field numbers: PutManyRequest.blobs = 1; PutRequest.hash = 1,
    size = 2, data = 4, compression = 5 (length-delimited fields are tag
    (field << 3 | 2), varint length, bytes; varint fields tag (field << 3),
    varint; proto3 leaves zeros and empty bytes out). A test holds it equal
    to protobuf's."""
    parts: list[bytes] = []
    for b in blobs:
        head = b"\x0a" + _varint(len(b.hash)) + b.hash
        if b.size:
            head += b"\x10" + _varint(b.size)
        if b.stored:
            head += b"\x22" + _varint(len(b.stored))
        tail = b"\x28" + _varint(b.compression) if b.compression else b""
        parts += (b"\x0a", _varint(len(head) + len(b.stored) + len(tail)), head, b.stored, tail)
    return b"".join(parts)


class _Endpoint:
    """One channel to one node's blob service, and the calls both clients share."""

    _token_error: type[TokenRejected] = TokenRejected

    def __init__(self, address: str, token: str, timeout_s: float) -> None:
        if timeout_s <= 0:
            raise ValueError("timeout_s must be positive")
        self.address = address
        self._timeout_s = timeout_s
        self._metadata = ((TOKEN_METADATA, token),)
        # No transparent retries: a replica call fails once and the caller decides.
        self._channel = grpc.insecure_channel(address, options=[
            ("grpc.max_receive_message_length", GRPC_RECEIVE_BYTES_MAX),
            ("grpc.max_send_message_length", SERVER_RECEIVE_BYTES_MAX),
            ("grpc.enable_retries", 0)])
        self._stub = blob_pb2_grpc.BlobServiceStub(self._channel)
        # PutMany with the request already encoded (encode_put_many): building
        # the message through protobuf copied every blob twice under the GIL.
        self._put_many_encoded = self._channel.unary_unary(
            "/floe.blob.BlobService/PutMany", request_serializer=None,
            response_deserializer=blob_pb2.PutManyResponse.FromString)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _unary(self, method: str, request: Any, timeout_s: float | None = None) -> Any:
        try:
            return getattr(self._stub, method)(request, timeout=timeout_s or self._timeout_s,
                                               metadata=self._metadata)
        except grpc.RpcError as e:
            raise _mapped(e, self.address, self._token_error) from None

    def _put(self, pieces: Iterator[bytes], h: bytes, size: int, replicate: bool) -> Any:
        """Streams one Put: the header on the first message, then the pieces.
        If producing the pieces fails (a file read), the stream is ended short,
        so the server stores nothing, and that local error is raised."""
        api.check_hash(h)
        if size > api.BLOB_BYTES_MAX:
            raise api.InvalidBlob(f"blob of {size} bytes is over the limit of {api.BLOB_BYTES_MAX}")
        local_failure: list[Exception] = []

        def requests() -> Iterator[Any]:
            first: Any = blob_pb2.PutRequest(hash=h, size=size, replicate=replicate)
            try:
                for piece in pieces:
                    if first is not None:
                        first.data = piece
                        yield first
                        first = None
                    else:
                        yield blob_pb2.PutRequest(data=piece)
            except Exception as e:  # re-raised below, once the server has refused the short stream
                local_failure.append(e)
                return
            if first is not None:
                yield first

        try:
            return self._stub.Put(requests(), timeout=_deadline_s(self._timeout_s, size), metadata=self._metadata)
        except grpc.RpcError as e:
            if local_failure:
                raise local_failure[0] from None
            raise _mapped(e, self.address, self._token_error) from None

    def _put_small(self, data: bytes, h: bytes, replicate: bool) -> Any:
        """Put in one message (blobs of at most SMALL_BYTES_MAX)."""
        api.check_hash(h)
        request = blob_pb2.PutRequest(hash=h, size=len(data), replicate=replicate, data=data)
        return self._unary("PutSmall", request, _deadline_s(self._timeout_s, len(data)))

    def _put_any(self, data: bytes, h: bytes, replicate: bool) -> Any:
        if len(data) <= api.SMALL_BYTES_MAX:
            return self._put_small(data, h, replicate)
        return self._put(_bytes_pieces(data), h, len(data), replicate)

    def _get_small(self, h: bytes, offset: int, length: int, local_only: bool) -> tuple[int, str, bytes] | None:
        """Get in one message; None when the range is too large for it (use the stream)."""
        api.check_hash(h)
        if offset < 0 or length < 0:
            raise api.InvalidBlob("offset and length are >= 0")
        request = blob_pb2.GetRequest(hash=h, offset=offset, length=length, local_only=local_only)
        try:
            r = self._stub.GetSmall(request, timeout=_deadline_s(self._timeout_s, api.SMALL_BYTES_MAX),
                                    metadata=self._metadata)
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                return None
            raise _mapped(e, self.address, self._token_error) from None
        size, data = int(r.size), bytes(r.data)
        if size > api.BLOB_BYTES_MAX or offset > size or (length and offset + length > size):
            raise _ProtocolError(f"{self.address}: GetSmall answered a {size}-byte blob for that range")
        if len(data) != (length or size - offset):
            raise _ProtocolError(f"{self.address}: GetSmall sent {len(data)} bytes for the range")
        return size, str(r.served_by), data

    def _get_iter(self, h: bytes, offset: int, length: int, local_only: bool
                  ) -> tuple[int, str, Generator[bytes, None, None]]:
        """(blob size, serving node, the range's pieces). The pieces are checked
        to add up to exactly the range; the call is cancelled if the caller
        stops early."""
        api.check_hash(h)
        if offset < 0 or length < 0:
            raise api.InvalidBlob("offset and length are >= 0")
        request = blob_pb2.GetRequest(hash=h, offset=offset, length=length, local_only=local_only)
        call = self._stub.Get(request, timeout=_deadline_s(self._timeout_s, length or api.BLOB_BYTES_MAX),
                              metadata=self._metadata)
        try:
            head = next(call)
        except StopIteration:
            raise _ProtocolError(f"{self.address}: Get answered no message") from None
        except grpc.RpcError as e:
            raise _mapped(e, self.address, self._token_error) from None
        size = int(head.size)
        if size > api.BLOB_BYTES_MAX:
            call.cancel()
            raise _ProtocolError(f"{self.address}: Get reported a {size}-byte blob")
        if offset > size or (length and offset + length > size):
            call.cancel()
            raise _ProtocolError(f"{self.address}: Get served a range beyond the blob")
        expected = length or size - offset

        def pieces() -> Generator[bytes, None, None]:
            received = 0
            msg = head
            try:
                while True:
                    piece = bytes(msg.data)
                    received += len(piece)
                    if received > expected:
                        raise _ProtocolError(f"{self.address}: Get sent more than the {expected} bytes asked for")
                    if piece:
                        yield piece
                    try:
                        msg = next(call)
                    except StopIteration:
                        break
                if received != expected:
                    raise _ProtocolError(f"{self.address}: Get ended after {received} of {expected} bytes")
            except grpc.RpcError as e:
                raise _mapped(e, self.address, self._token_error) from None
            finally:
                call.cancel()  # a no-op once the call has finished

        return size, str(head.served_by), pieces()

    def _get(self, h: bytes, offset: int, length: int, local_only: bool, check_hash: bool = True) -> bytes:
        small = self._get_small(h, offset, length, local_only)
        if small is not None:
            size, _served_by, data = small
        else:
            size, _served_by, pieces = self._get_iter(h, offset, length, local_only)
            data = b"".join(pieces)
        if check_hash and offset == 0 and len(data) == size and api.blob_hash(data) != h:
            # The content hash checked end to end, by the reader (DESIGN.md §4).
            raise api.BlobCorrupt(f"{self.address} served blob {h.hex()} with the wrong content hash")
        return data

    def _has(self, hashes: Iterable[bytes]) -> list[bool]:
        hs = list(hashes)
        for h in hs:
            api.check_hash(h)
        out: list[bool] = []
        for i in range(0, len(hs), api.HAS_BATCH_MAX):
            batch = hs[i:i + api.HAS_BATCH_MAX]
            r = self._unary("Has", blob_pb2.HasRequest(hashes=batch))
            if len(r.present) != len(batch):
                raise _ProtocolError(f"{self.address}: Has answered {len(r.present)} of {len(batch)}")
            out.extend(bool(p) for p in r.present)
        return out

    def _delete(self, h: bytes, min_age_s: float) -> bool:
        api.check_hash(h)
        return bool(self._unary("Delete", blob_pb2.DeleteRequest(hash=h, min_age_s=min_age_s)).deleted)

    def _list(self, after: bytes, limit: int) -> list[api.BlobInfo]:
        if after:
            api.check_hash(after)
        if limit < 1:
            raise ValueError("list limit must be >= 1")
        out: list[api.BlobInfo] = []
        while len(out) < limit:
            page = min(api.LIST_LIMIT_MAX, limit - len(out))
            r = self._unary("List", blob_pb2.ListRequest(after=after, limit=page))
            if len(r.blobs) > page:
                raise _ProtocolError(f"{self.address}: List answered {len(r.blobs)} for a limit of {page}")
            out.extend(_info(b) for b in r.blobs)
            if len(r.blobs) < page:
                break
            after = out[-1].hash
        return out

    def _verify(self, h: bytes) -> api.VerifyResult:
        api.check_hash(h)
        r = self._unary("Verify", blob_pb2.VerifyRequest(hash=h))
        return api.VerifyResult(present=bool(r.present), verified=bool(r.verified),
                                info=_info(r.info) if r.HasField("info") else None, error=str(r.error))

    def _stats(self) -> Any:
        return self._unary("Stats", blob_pb2.StatsRequest())


class RemoteReplica(_Endpoint):
    """Another node's local store, reached over gRPC (an api.Replica)."""

    _token_error = ReplicaTokenRejected

    def __init__(self, node_id: str, address: str, token: str, timeout_s: float = 10.0) -> None:
        super().__init__(address, token, timeout_s)
        self.node_id = node_id

    def __repr__(self) -> str:
        return f"RemoteReplica({self.node_id!r}, {self.address!r})"

    def put(self, data: bytes, h: bytes) -> bool:
        """Stores the blob on that node (replicate=false); True if it was already there."""
        return bool(self._put_any(data, h, replicate=False).existed)

    def put_many(self, items: Sequence[tuple[bytes, bytes]]) -> list[bool]:
        """Stores every blob on that node; per blob True if it was already
        there. Blobs of at most SMALL_BYTES_MAX go in PutMany calls of at most
        PUT_MANY_BLOBS_MAX blobs and PUT_MANY_BYTES_MAX data bytes (each a
        group commit there), up to PUT_MANY_CALLS_IN_FLIGHT of them at once:
        a flush of sixteen 1 MiB blobs is four calls, and one after the other
        they took four times one call's latency. A larger blob goes alone in a
        streamed Put. The first failure is raised once every call has ended
        (calls that succeeded stored their blobs: harmless, puts are
        idempotent)."""
        for _data, h in items:
            api.check_hash(h)
        return self._put_many([EncodedBlob(h, len(data), COMPRESSION_NONE, data) for data, h in items])

    def put_many_encoded(self, items: Sequence[EncodedBlob]) -> list[bool]:
        """put_many() of blobs a coordinator encoded once for all replicas
        (zstd frames cross the network compressed; that node decodes and
        checks each before storing the frame as is)."""
        for b in items:
            api.check_hash(b.hash)
        return self._put_many(list(items))

    def _put_many(self, items: list[EncodedBlob]) -> list[bool]:
        out = [False] * len(items)
        batches: list[tuple[list[int], int]] = []
        batch: list[int] = []
        nbytes = 0
        for i, b in enumerate(items):
            data = b.stored
            if b.size > api.SMALL_BYTES_MAX or len(data) > api.SMALL_BYTES_MAX:
                if b.compression != COMPRESSION_NONE:
                    raise api.InvalidBlob(f"a compressed blob of {b.size} bytes is too large for PutMany")
                out[i] = self.put(data, b.hash)
                continue
            if batch and (len(batch) >= api.PUT_MANY_BLOBS_MAX or nbytes + len(data) > api.PUT_MANY_BYTES_MAX):
                batches.append((batch, nbytes))
                batch, nbytes = [], 0
            batch.append(i)
            nbytes += len(data)
        if batch:
            batches.append((batch, nbytes))
        in_flight: list[tuple[list[int], Any]] = []
        first_error: Exception | None = None

        def finish(idx: list[int], call: Any) -> None:
            nonlocal first_error
            try:
                r = call.result()
            except grpc.RpcError as e:
                first_error = first_error or _mapped(e, self.address, self._token_error)
                return
            if len(r.existed) != len(idx):
                first_error = first_error or _ProtocolError(
                    f"{self.address}: PutMany answered {len(r.existed)} of {len(idx)}")
                return
            for i, existed in zip(idx, r.existed, strict=True):
                out[i] = bool(existed)

        for idx, n in batches:
            if len(in_flight) >= PUT_MANY_CALLS_IN_FLIGHT:
                finish(*in_flight.pop(0))
            if first_error is not None:
                break
            request = encode_put_many([items[i] for i in idx])
            in_flight.append((idx, self._put_many_encoded.future(
                request, timeout=_deadline_s(self._timeout_s, n), metadata=self._metadata)))
        for idx, call in in_flight:
            finish(idx, call)
        if first_error is not None:
            raise first_error
        return out

    def get(self, h: bytes, offset: int = 0, length: int = 0) -> bytes:
        # The node's store checked the record's crc32c and (whole reads) its
        # SHA-256; the coordinator that called this checks the SHA-256 again
        # as the reader (objstore/cluster.py), so it is not hashed a third time.
        return self._get(h, offset, length, local_only=True, check_hash=False)

    def get_range(self, h: bytes, offset: int = 0, length: int = 0) -> tuple[bytes, int]:
        """(the range, the whole blob's size) from that node's own copy, whose
        record crc32c its store checked; one GetSmall unless the range is
        over SMALL_BYTES_MAX. Not hashed here (see get)."""
        small = self._get_small(h, offset, length, local_only=True)
        if small is not None:
            size, _served_by, data = small
            return data, size
        size, _served_by, pieces = self._get_iter(h, offset, length, local_only=True)
        return b"".join(pieces), size

    def has(self, hashes: Iterable[bytes]) -> list[bool]:
        return self._has(hashes)

    def delete(self, h: bytes, min_age_s: float = 0.0) -> bool:
        return self._delete(h, min_age_s)

    def list(self, after: bytes = b"", limit: int = 1000) -> list[api.BlobInfo]:
        return self._list(after, limit)

    def verify(self, h: bytes) -> api.VerifyResult:
        return self._verify(h)

    def stats(self) -> dict[str, int]:
        """The node's store figures and counters, flattened into one dict."""
        r = self._stats()
        out = {k: int(v) for k, v in r.counters.items()}
        out.update(blobs=int(r.blobs), bytes=int(r.bytes), stored_bytes=int(r.stored_bytes),
                   pack_bytes=int(r.pack_bytes), packs=int(r.packs), repair_backlog=int(r.repair_backlog))
        return out


class BlobClient(_Endpoint):
    """Cluster calls on one node of the object tier (the CLI, benchmarks)."""

    def __init__(self, address: str, token: str, timeout_s: float = 60.0) -> None:
        super().__init__(address, token, timeout_s)

    @staticmethod
    def _put_result(r: Any) -> api.PutResult:
        return api.PutResult(hash=bytes(r.hash), stored_on=list(r.stored_on), pending=list(r.pending),
                             existed=bool(r.existed))

    def put(self, data: bytes, replicate: bool = True) -> api.PutResult:
        """Stores `data` under its SHA-256: on the node only, or (replicate)
        on its R replicas, returning once W of them hold it durably."""
        h = api.blob_hash(data)
        r = self._put_any(data, h, replicate)
        if bytes(r.hash) != h:
            raise _ProtocolError(f"{self.address}: Put answered for another hash")
        return self._put_result(r)

    def put_file(self, path: str, replicate: bool = True) -> api.PutResult:
        """Hashes the file, then streams it; the file must not change meanwhile
        (if it does, the server refuses the put and nothing is stored)."""
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > api.BLOB_BYTES_MAX:
                raise api.InvalidBlob(f"{path} is {size} bytes; the limit is {api.BLOB_BYTES_MAX}")
            hasher = hashlib.sha256()
            for piece in _file_pieces(f, size):
                hasher.update(piece)
            h = hasher.digest()
            f.seek(0)
            r = self._put(_file_pieces(f, size), h, size, replicate)
        return self._put_result(r)

    def get(self, h: bytes, offset: int = 0, length: int = 0, local_only: bool = False) -> bytes:
        """The range [offset, offset+length) (length 0 = to the end); a whole
        blob is checked against its hash."""
        return self._get(h, offset, length, local_only)

    def get_to(self, h: bytes, out: BinaryIO, local_only: bool = False) -> int:
        """Streams the whole blob into `out`; returns its size. The SHA-256 is
        checked at the end: on a mismatch BlobCorrupt is raised, and what was
        written to `out` must be discarded."""
        size, _served_by, pieces = self._get_iter(h, 0, 0, local_only)
        hasher = hashlib.sha256()
        written = 0
        try:
            for piece in pieces:
                hasher.update(piece)
                out.write(piece)
                written += len(piece)
        finally:
            pieces.close()  # cancels the call if `out` failed part way
        if written != size or hasher.digest() != h:
            raise api.BlobCorrupt(f"{self.address} served blob {h.hex()} with the wrong content hash")
        return written

    def has(self, hashes: Iterable[bytes]) -> list[bool]:
        """Presence on this node's local store."""
        return self._has(hashes)

    def delete(self, h: bytes, min_age_s: float = 0.0) -> bool:
        """Deletes this node's local copy (GC does this cluster-wide)."""
        return self._delete(h, min_age_s)

    def list(self, after: bytes = b"", limit: int = 1000) -> list[api.BlobInfo]:
        """This node's local blobs in hash order, strictly after `after`."""
        return self._list(after, limit)

    def verify(self, h: bytes) -> api.VerifyResult:
        """Re-reads this node's local copy end to end."""
        return self._verify(h)

    def locate(self, h: bytes) -> api.LocateResult:
        api.check_hash(h)
        r = self._unary("Locate", blob_pb2.LocateRequest(hash=h))
        return api.LocateResult(hash=bytes(r.hash), size=int(r.size), copies=[
            api.CopyInfo(node=c.node, placed=bool(c.placed), present=bool(c.present), verified=bool(c.verified),
                         stored_size=int(c.stored_size), compression=str(c.compression), error=str(c.error))
            for c in r.copies])

    def scrub(self, all_nodes: bool = True) -> api.ScrubResult:
        r = self._unary("Scrub", blob_pb2.ScrubRequest(all_nodes=all_nodes))
        return api.ScrubResult(checked=int(r.checked), corrupt=int(r.corrupt), repaired=int(r.repaired),
                               unrepaired=int(r.unrepaired))

    def gc(self, dry_run: bool, grace_s: float | None = None) -> api.GcResult:
        """One mark-and-sweep pass; grace_s None = the node's configured grace."""
        r = self._unary("Gc", blob_pb2.GcRequest(dry_run=dry_run, grace_s=grace_s or 0.0))
        return api.GcResult(live=int(r.live), examined=int(r.examined), young=int(r.young), deleted=int(r.deleted),
                            deleted_bytes=int(r.deleted_bytes), unreachable=list(r.unreachable))

    def stats(self) -> dict[str, Any]:
        """Every StatsResponse field; `counters` is a dict of its own."""
        r = self._stats()
        return {"node": str(r.node), "blobs": int(r.blobs), "bytes": int(r.bytes),
                "stored_bytes": int(r.stored_bytes), "pack_bytes": int(r.pack_bytes), "packs": int(r.packs),
                "repair_backlog": int(r.repair_backlog), "counters": {k: int(v) for k, v in r.counters.items()}}


def _file_pieces(f: BinaryIO, size: int) -> Iterator[bytes]:
    """Exactly `size` bytes of f in pieces of at most CHUNK_BYTES; stops short
    if the file does (the server then refuses the put as truncated)."""
    left = size
    while left > 0:
        piece = f.read(min(_FILE_READ_BYTES, left))
        if not piece:
            return
        left -= len(piece)
        yield piece


if TYPE_CHECKING:
    def _conforms(r: RemoteReplica) -> api.Replica:  # mypy checks RemoteReplica against api.Replica
        return r
