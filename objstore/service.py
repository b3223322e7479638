"""The blob service (proto/blob.proto) over a node's local store and, when the
node takes part in a cluster, its coordinator.

Theory of operation. Every byte that arrives here is untrusted, so each RPC is
checked in the same order before any work is done: the admin token (metadata
`x-floe-token`, compared in constant time), then every field against the
bounds in objstore/api.py. Only then does the call reach the store or the
coordinator, and whatever they raise is mapped to one gRPC status:

  OK                   done (a Put: durable on the nodes named in stored_on)
  UNAUTHENTICATED      missing or wrong admin token; nothing was done
  INVALID_ARGUMENT     the request is malformed or the data does not match its
                       hash or size; nothing was stored
  OUT_OF_RANGE         a Get's offset/length reaches past the end of the blob
  NOT_FOUND            no copy where it was looked for
  DATA_LOSS            the copy failed its checksum or content hash; it is never
                       served (a stream may end with this after some pieces)
  UNAVAILABLE          not enough replicas / a replica or this node is busy,
                       or its store has failed or is closed;
                       a Put answered so did not succeed (it may have left
                       copies, which are harmless: blobs are immutable and
                       puts idempotent)
  FAILED_PRECONDITION  a cluster call on a node that runs no coordinator
  RESOURCE_EXHAUSTED   (from the transport) a message over the size cap
  CANCELLED            the client went away, or the stream stalled and the
                       watchdog ended it
  INTERNAL             a bug on this node; the traceback is logged and the
                       server keeps serving

The servicer's trailing metadata `x-floe-blob-error` names the objstore.api
error class behind a failure, so clients re-raise exactly that class (a
NotEnoughReplicas put and an unreachable replica share UNAVAILABLE).

A Put is a client stream. Its first message fixes hash, size and replicate;
the data is counted, bounded piece by piece (every later message carries
1..CHUNK_BYTES bytes) and hashed as it arrives, and reading stops as soon as
it exceeds the declared size. Blobs up to
MEMORY_BLOB_BYTES_MAX are assembled in memory; larger ones are spooled to an
anonymous temporary file in tmp_dir (unlinked at creation, so nothing is left
behind on any exit path) and stored with store.put_file. The SHA-256 is checked
here before anything is stored and again by the store when it writes (the same
fact checked twice). A replicated put needs the bytes in memory because the
coordinator sends them to several replicas at once, so at most
LARGE_REPLICATE_PUTS_MAX large ones hold their data in memory at a time.

PutMany is the batch form of a replica put: one message of at most
PUT_MANY_BLOBS_MAX whole blobs (each at most SMALL_BYTES_MAX) and
PUT_MANY_BYTES_MAX data bytes, stored on this node in one group commit. Every
blob's fields are checked against those bounds before any is stored, and the
store checks every hash before it queues any, so a bad blob stores nothing.
The transport's receive cap is sized to hold one full PutMany.

Streams are bounded in time as well as size: a watchdog cancels any Put or Get
stream that makes no progress for STREAM_IDLE_S_MAX or runs longer than
STREAM_S_MAX, so a stalled or malicious client cannot hold a server thread.
This matters because gRPC's synchronous server gives each RPC a pool thread
for its whole life: a Put's thread waits in the request iterator for the next
message, and a Get's thread waits in each send until the client's
flow-control window takes it, so without a client deadline either can wait
forever. `context.cancel()` from the watchdog's thread wakes both (the
iterator raises or ends, the send returns), and the tests check it does.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent import futures
from contextlib import contextmanager
from typing import Any, BinaryIO, NoReturn, Protocol

import grpc

from objstore import api
from objstore.pack import COMPRESSION_NONE, COMPRESSION_ZSTD, EncodedBlob
from proto import blob_pb2, blob_pb2_grpc

log = logging.getLogger("floe.objstore.service")

TOKEN_METADATA = "x-floe-token"
# Trailing metadata naming the objstore.api error class behind a failed call.
ERROR_METADATA = "x-floe-blob-error"

# Blobs up to this size are assembled in memory; larger ones go to a temp file.
# 4 MiB is four volume segments: every put the block layer makes stays in memory.
MEMORY_BLOB_BYTES_MAX = 4 * 1024 * 1024
# Replicated puts larger than MEMORY_BLOB_BYTES_MAX hold the whole blob in
# memory while the coordinator writes it out; two of them bound that memory to
# 2 x BLOB_BYTES_MAX = 128 MiB per node.
LARGE_REPLICATE_PUTS_MAX = 2
# How long a large replicated put waits for one of those slots before it is
# refused with UNAVAILABLE (the client may retry).
LARGE_PUT_WAIT_S = 30.0
# Every field of a PutMany besides the data: a blob's hash (34 bytes with its
# tag), size (at most 11), data tag and length (at most 11) and the blob's own
# envelope (at most 11) come to under 80 bytes.
PUT_MANY_BLOB_ENVELOPE_BYTES_MAX = 80
# What a request may carry besides its data: PutMany's envelopes (256 x 80 =
# 20 KiB) or a PutSmall's fields fit, and so does a whole data-less request
# (the largest, a full Has batch, is 4096 x 34 = 136 KiB, under the data room).
REQUEST_FIELDS_BYTES_MAX = 64 * 1024
# The transport refuses larger messages before parsing: the most data one
# message carries (a Put piece, a PutSmall blob, or a PutMany's
# PUT_MANY_BYTES_MAX) plus the fields' margin.
GRPC_RECEIVE_BYTES_MAX = max(api.CHUNK_BYTES, api.SMALL_BYTES_MAX, api.PUT_MANY_BYTES_MAX) + REQUEST_FIELDS_BYTES_MAX
if api.PUT_MANY_BLOBS_MAX * PUT_MANY_BLOB_ENVELOPE_BYTES_MAX > REQUEST_FIELDS_BYTES_MAX:
    raise RuntimeError("a full PutMany's envelopes do not fit the receive margin")
# Largest answer: a Get piece (CHUNK_BYTES) or a full List page (4096 x ~70 B).
GRPC_SEND_BYTES_MAX = 4 * 1024 * 1024
# A stream that makes no progress this long is cancelled (a client gone quiet,
# or one that stopped reading a Get). Generous next to any real stall of a
# 256 KiB piece on a working network.
STREAM_IDLE_S_MAX = 30.0
# No stream lives longer than this: 64 MiB at ~110 KiB/s.
STREAM_S_MAX = 600.0
# Server threads; each serves one RPC at a time, so this also bounds the
# concurrent puts and their memory (16 x 4 MiB in memory, the rest spooled;
# a PutMany holds at most PUT_MANY_BYTES_MAX = 4 MiB too).
SERVER_THREADS = 16

_HANDLED_ERRORS: tuple[tuple[type[api.BlobError], grpc.StatusCode], ...] = (
    (api.InvalidBlob, grpc.StatusCode.INVALID_ARGUMENT),
    (api.BlobNotFound, grpc.StatusCode.NOT_FOUND),
    (api.BlobCorrupt, grpc.StatusCode.DATA_LOSS),
    (api.NotEnoughReplicas, grpc.StatusCode.UNAVAILABLE),
    (api.ReplicaUnavailable, grpc.StatusCode.UNAVAILABLE),
    # Any other BlobError is the store refusing service (a failed writer, a
    # closed store): to the caller this node is unavailable. A Put refused so
    # may or may not have left a copy (harmless, as above).
    (api.BlobError, grpc.StatusCode.UNAVAILABLE),
)


class BlobStore(Protocol):
    """What the service needs of a node's local store (objstore.pack.LocalStore)."""

    def put(self, data: bytes, h: bytes) -> bool: ...

    def put_many(self, items: Sequence[tuple[bytes, bytes]]) -> list[bool]: ...

    def put_many_encoded(self, items: Sequence[EncodedBlob]) -> list[bool]: ...

    def get(self, h: bytes, offset: int = 0, length: int = 0) -> bytes: ...

    def put_file(self, f: BinaryIO, h: bytes, size: int) -> bool: ...

    def read_iter(self, h: bytes, offset: int = 0, length: int = 0,
                  chunk: int = api.CHUNK_BYTES) -> tuple[int, Iterator[bytes]]: ...

    def info(self, h: bytes) -> api.BlobInfo | None: ...

    def has(self, hashes: Iterable[bytes]) -> list[bool]: ...

    def delete(self, h: bytes, min_age_s: float = 0.0) -> bool: ...

    def list(self, after: bytes = b"", limit: int = 1000) -> list[api.BlobInfo]: ...

    def verify(self, h: bytes) -> api.VerifyResult: ...

    def stats(self) -> dict[str, int]: ...


class _Abort(Exception):
    """A request refused with a status chosen by the service itself."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


# ---------------------------------------------------------------- field checks


def _hash_arg(h: bytes, what: str = "hash") -> bytes:
    if len(h) != api.HASH_BYTES:
        raise _Abort(grpc.StatusCode.INVALID_ARGUMENT,
                     f"{what} must be {api.HASH_BYTES} bytes (SHA-256), got {len(h)}")
    return bytes(h)


def _seconds_arg(value: float, what: str) -> float:
    if not math.isfinite(value) or value < 0:
        raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, f"{what} must be a finite number >= 0, got {value!r}")
    return float(value)


def _range_len(offset: int, length: int, size: int) -> int:
    """Bytes a Get of [offset, offset+length) returns from a blob of `size`."""
    if offset > size:
        raise _Abort(grpc.StatusCode.OUT_OF_RANGE, f"offset {offset} is beyond the blob's {size} bytes")
    if length == 0:
        return size - offset
    if offset + length > size:
        raise _Abort(grpc.StatusCode.OUT_OF_RANGE,
                     f"range {offset}+{length} reaches beyond the blob's {size} bytes")
    return length


def _info_pb(info: api.BlobInfo) -> Any:
    return blob_pb2.BlobInfo(hash=info.hash, size=info.size, stored_size=info.stored_size,
                             compression=info.compression, age_s=info.age_s)


def _uint(value: int, bits: int = 64) -> int:
    """A count for a uint field; the store's counters are never negative, but a
    negative one must not make the whole Stats call fail."""
    return min(max(0, int(value)), (1 << bits) - 1)


# ---------------------------------------------------------------- stream watchdog


class _Watch:
    __slots__ = ("cancel", "started", "last")

    def __init__(self, cancel: Callable[[], Any], now: float) -> None:
        self.cancel = cancel
        self.started = now
        self.last = now


class StreamWatchdog:
    """Cancels streams that stall or run too long. One thread serves every
    stream of a service; a stream registers with `watch()` and calls
    `touch()` on its watch whenever it makes progress."""

    def __init__(self, idle_s: float = STREAM_IDLE_S_MAX, total_s: float = STREAM_S_MAX,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not (idle_s > 0 and total_s > 0):
            raise ValueError("stream time limits must be positive")
        self._idle_s = idle_s
        self._total_s = total_s
        self._clock = clock
        self._lock = threading.Condition()
        self._watches: dict[int, _Watch] = {}
        self._next_id = 0
        self._thread: threading.Thread | None = None
        self._closed = False
        self.cancelled = 0  # streams ended by the watchdog (reported in Stats)

    @contextmanager
    def watch(self, cancel: Callable[[], Any]) -> Iterator[_Watch]:
        with self._lock:
            if self._closed:
                raise RuntimeError("the stream watchdog is closed")
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="blob-stream-watchdog", daemon=True)
                self._thread.start()
            self._next_id += 1
            key = self._next_id
            w = self._watches[key] = _Watch(cancel, self._clock())
        try:
            yield w
        finally:
            with self._lock:
                self._watches.pop(key, None)

    def touch(self, w: _Watch) -> None:
        w.last = self._clock()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._lock.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(timeout=5)

    def _run(self) -> None:
        period_s = min(1.0, self._idle_s / 4, self._total_s / 4)
        while True:
            with self._lock:
                self._lock.wait(timeout=period_s)
                if self._closed:
                    return
                now = self._clock()
                expired = [(k, w) for k, w in self._watches.items()
                           if now - w.last > self._idle_s or now - w.started > self._total_s]
                for k, _w in expired:
                    del self._watches[k]
            for _k, w in expired:
                reason = "idle" if now - w.last > self._idle_s else "too_long"
                log.warning("event=stream_cancelled reason=%s idle_s=%.1f age_s=%.1f",
                            reason, now - w.last, now - w.started)
                self.cancelled += 1
                try:
                    w.cancel()
                except Exception:
                    log.exception("event=stream_cancel_failed")


# ---------------------------------------------------------------- error mapping


def _status_of(e: Exception, rpc: str, context: Any) -> tuple[grpc.StatusCode, str, str]:
    """(status, message, api error class name or "") for an exception raised by an RPC."""
    if isinstance(e, _Abort):
        return e.code, e.message, ""
    for cls, code in _HANDLED_ERRORS:
        if isinstance(e, cls):
            if cls is api.BlobError:
                log.warning("event=blob_rpc_refused rpc=%s error=%s detail=%s", rpc, type(e).__name__, e)
                return code, f"{type(e).__name__}: {e}", ""
            # The most specific objstore.api class, so the client raises the same one.
            name = next(c.__name__ for c in type(e).__mro__ if c.__module__ == api.__name__)
            return code, str(e) or name, name
    if isinstance(e, grpc.RpcError) and not context.is_active():
        # Raised by the request iterator when the client (or the watchdog) cancelled the stream.
        return grpc.StatusCode.CANCELLED, "the call was cancelled", ""
    log.exception("event=blob_rpc_failed rpc=%s error=%s", rpc, type(e).__name__)
    return grpc.StatusCode.INTERNAL, f"internal error in {rpc}: {type(e).__name__}", ""


def _abort(context: Any, code: grpc.StatusCode, message: str, error_class: str) -> NoReturn:
    if error_class:
        context.set_trailing_metadata(((ERROR_METADATA, error_class),))
    context.abort(code, message)
    raise AssertionError("unreachable: context.abort raises")


_Handler = Callable[["BlobService", Any, Any], Any]


def _unary(fn: _Handler) -> _Handler:
    """Wraps a unary or client-streaming RPC: token check, then error mapping."""

    def handler(self: BlobService, request: Any, context: Any) -> Any:
        try:
            self._authenticate(context)
            return fn(self, request, context)
        except Exception as e:  # every failure becomes a status; the server never dies of a request
            code, message, error_class = _status_of(e, fn.__name__, context)
        _abort(context, code, message, error_class)

    handler.__name__ = fn.__name__
    handler.__doc__ = fn.__doc__
    return handler


def _server_stream(fn: _Handler) -> _Handler:
    """Wraps a server-streaming RPC (a generator): the same, around every step."""

    def handler(self: BlobService, request: Any, context: Any) -> Iterator[Any]:
        try:
            self._authenticate(context)
            yield from fn(self, request, context)
            return
        except Exception as e:  # as above; GeneratorExit (client gone) is not an Exception
            code, message, error_class = _status_of(e, fn.__name__, context)
        _abort(context, code, message, error_class)

    handler.__name__ = fn.__name__
    handler.__doc__ = fn.__doc__
    return handler


# ---------------------------------------------------------------- the service


class BlobService(blob_pb2_grpc.BlobServiceServicer):  # type: ignore[misc]
    def __init__(self, store: BlobStore, coordinator: api.Coordinator | None, admin_token: str, node_id: str,
                 tmp_dir: str, *, watchdog: StreamWatchdog | None = None,
                 large_put_wait_s: float = LARGE_PUT_WAIT_S) -> None:
        if not admin_token:
            raise ValueError("the blob service needs a non-empty admin token")
        self._store = store
        self._coordinator = coordinator
        self._token = admin_token.encode()
        self._node_id = node_id
        self._tmp_dir = tmp_dir
        os.makedirs(tmp_dir, exist_ok=True)
        self._watchdog = watchdog if watchdog is not None else StreamWatchdog()
        self._large_puts = threading.BoundedSemaphore(LARGE_REPLICATE_PUTS_MAX)
        self._large_put_wait_s = large_put_wait_s

    def close(self) -> None:
        """Stops the watchdog thread (the gRPC server is stopped by its owner)."""
        self._watchdog.close()

    # ---------------------------------------------------------------- plumbing

    def _authenticate(self, context: Any) -> None:
        token = ""
        for key, value in context.invocation_metadata() or ():
            if key == TOKEN_METADATA:
                token = value if isinstance(value, str) else ""
                break
        if not hmac.compare_digest(token.encode(), self._token):
            raise _Abort(grpc.StatusCode.UNAUTHENTICATED, f"missing or wrong admin token ({TOKEN_METADATA})")

    def _require_coordinator(self, what: str) -> api.Coordinator:
        if self._coordinator is None:
            raise _Abort(grpc.StatusCode.FAILED_PRECONDITION,
                         f"{what} is a cluster call and node {self._node_id} runs no coordinator")
        return self._coordinator

    # ---------------------------------------------------------------- Put

    @_unary
    def Put(self, request_iterator: Iterator[Any], context: Any) -> Any:  # noqa: N802
        # The watchdog covers the receiving only: a client that goes quiet is
        # cut off, while the store's or the coordinator's write, which bounds
        # its own time, is never cancelled half way.
        with self._watchdog.watch(context.cancel) as watch:
            h, size, replicate, body = self._receive_put(request_iterator, watch)
        if isinstance(body, bytes):
            if replicate:
                return self._put_response(self._require_coordinator("Put with replicate").put(body, h))
            existed = self._store.put(body, h)
        else:
            with body:
                if replicate:
                    coordinator = self._require_coordinator("Put with replicate")
                    return self._put_response(self._replicate_large(coordinator, body, h, size))
                existed = self._store.put_file(body, h, size)
        return blob_pb2.PutResponse(hash=h, stored_on=[self._node_id], existed=bool(existed))

    def _receive_put(self, requests: Iterator[Any], watch: _Watch) -> tuple[bytes, int, bool, bytes | BinaryIO]:
        """(hash, size, replicate, the data): bytes up to MEMORY_BLOB_BYTES_MAX,
        else an open anonymous temp file positioned at its start. The header
        is checked before any data is read."""
        first = next(requests, None)
        if first is None:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, "empty Put stream: the first message carries hash and size")
        h = _hash_arg(first.hash)
        size = int(first.size)
        if first.compression:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, "Put carries content only (compression 0); "
                         "compressed blobs go in PutMany")
        if size > api.BLOB_BYTES_MAX:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT,
                         f"blob of {size} bytes is over the limit of {api.BLOB_BYTES_MAX}")
        replicate = bool(first.replicate)
        if replicate:
            self._require_coordinator("Put with replicate")
        if size <= MEMORY_BLOB_BYTES_MAX:
            pieces: list[bytes] = []
            self._receive(first, requests, h, size, replicate, pieces.append, watch)
            data = b"".join(pieces)
            if len(data) != size:  # counted while receiving; checked again on what is handed on
                raise RuntimeError(f"assembled {len(data)} bytes of a {size}-byte blob")
            return h, size, replicate, data
        spool = tempfile.TemporaryFile(dir=self._tmp_dir, prefix="put-")
        try:
            self._receive(first, requests, h, size, replicate, spool.write, watch)
            spool.flush()
            if spool.tell() != size:
                raise RuntimeError(f"spooled {spool.tell()} bytes of a {size}-byte blob")
            spool.seek(0)
        except BaseException:
            spool.close()
            raise
        return h, size, replicate, spool

    def _receive(self, first: Any, rest: Iterator[Any], h: bytes, size: int, replicate: bool,
                 sink: Callable[[bytes], Any], watch: _Watch) -> None:
        """Reads the stream's data into sink: every piece bounded, the total
        exactly `size`, the SHA-256 exactly `h`. Raises _Abort otherwise, having
        read nothing beyond the first piece that broke a rule."""
        hasher = hashlib.sha256()
        received = 0
        msg = first
        while True:
            piece = msg.data
            if len(piece) > api.CHUNK_BYTES:
                raise _Abort(grpc.StatusCode.INVALID_ARGUMENT,
                             f"a Put data piece is at most {api.CHUNK_BYTES} bytes, got {len(piece)}")
            received += len(piece)
            if received > size:
                raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, f"more data than the declared size of {size} bytes")
            if piece:
                hasher.update(piece)
                sink(piece)
            self._watchdog.touch(watch)
            msg = next(rest, None)
            if msg is None:
                break
            if (msg.hash and msg.hash != h) or (msg.size and msg.size != size) or (msg.replicate and not replicate):
                raise _Abort(grpc.StatusCode.INVALID_ARGUMENT,
                             "only the first Put message sets hash, size and replicate; a later one changed them")
            if not msg.data:
                # Every later message moves the stream forward, so a stream has
                # at most size + 1 messages and an endless run of empty ones
                # cannot keep a server thread busy.
                raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, "a Put message after the first must carry data")
        if received != size:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT,
                         f"the Put stream ended after {received} of {size} bytes; nothing was stored")
        if hasher.digest() != h:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT,
                         "the data does not match its hash (SHA-256); nothing was stored")

    def _replicate_large(self, coordinator: api.Coordinator, spool: BinaryIO, h: bytes, size: int) -> api.PutResult:
        if not self._large_puts.acquire(timeout=self._large_put_wait_s):
            raise _Abort(grpc.StatusCode.UNAVAILABLE,
                         f"{LARGE_REPLICATE_PUTS_MAX} large replicated puts are in flight; retry later")
        try:
            data = spool.read(size)
            if len(data) != size:
                raise RuntimeError(f"read {len(data)} bytes of a {size}-byte spool")
            return coordinator.put(data, h)
        finally:
            self._large_puts.release()

    @staticmethod
    def _put_response(r: api.PutResult) -> Any:
        return blob_pb2.PutResponse(hash=r.hash, stored_on=list(r.stored_on), pending=list(r.pending),
                                    existed=bool(r.existed))

    @_unary
    def PutSmall(self, request: Any, context: Any) -> Any:  # noqa: N802
        """Put in one message. The hash is checked once, by whoever stores the
        bytes (the store, or the coordinator before it sends them on)."""
        h = _hash_arg(request.hash)
        if request.compression:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, "PutSmall carries content only (compression 0); "
                         "compressed blobs go in PutMany")
        data = bytes(request.data)
        if len(data) > api.SMALL_BYTES_MAX:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT,
                         f"PutSmall carries at most {api.SMALL_BYTES_MAX} bytes, got {len(data)}; use Put")
        if int(request.size) != len(data):
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT,
                         f"PutSmall declared {int(request.size)} bytes and carried {len(data)}")
        if request.replicate:
            return self._put_response(self._require_coordinator("Put with replicate").put(data, h))
        existed = self._store.put(data, h)
        return blob_pb2.PutResponse(hash=h, stored_on=[self._node_id], existed=bool(existed))

    @_unary
    def PutMany(self, request: Any, context: Any) -> Any:  # noqa: N802
        """Many small blobs stored on this node in one group commit (a replica
        call: a coordinator sends each replica the blobs placed on it). Every
        bound is checked, for every blob, before any is stored; the hashes
        are checked by the store, which stores none if one is wrong. A blob
        may come zstd-compressed (`compression` 1: data is the frame, size
        the content's length, both at most SMALL_BYTES_MAX); the store decodes
        it, checks size and hash, and keeps the frame as the record."""
        if len(request.blobs) > api.PUT_MANY_BLOBS_MAX:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT,
                         f"PutMany carries at most {api.PUT_MANY_BLOBS_MAX} blobs, got {len(request.blobs)}")
        encoded: list[EncodedBlob] = []
        total = 0
        for i, blob in enumerate(request.blobs):
            h = _hash_arg(blob.hash, f"blob {i}'s hash")
            if blob.replicate:
                raise _Abort(grpc.StatusCode.INVALID_ARGUMENT,
                             f"PutMany stores on this node only; blob {i} asks to replicate (use Put)")
            data = bytes(blob.data)
            size, compression = int(blob.size), int(blob.compression)
            if len(data) > api.SMALL_BYTES_MAX or size > api.SMALL_BYTES_MAX:
                raise _Abort(grpc.StatusCode.INVALID_ARGUMENT,
                             f"PutMany blobs are at most {api.SMALL_BYTES_MAX} bytes, blob {i} has "
                             f"{max(len(data), size)}; use Put")
            if compression not in (COMPRESSION_NONE, COMPRESSION_ZSTD):
                raise _Abort(grpc.StatusCode.INVALID_ARGUMENT,
                             f"PutMany blob {i} has unknown compression {compression}")
            if compression == COMPRESSION_NONE and size != len(data):
                raise _Abort(grpc.StatusCode.INVALID_ARGUMENT,
                             f"PutMany blob {i} declared {size} bytes and carried {len(data)}")
            total += len(data)
            if total > api.PUT_MANY_BYTES_MAX:
                raise _Abort(grpc.StatusCode.INVALID_ARGUMENT,
                             f"PutMany carries at most {api.PUT_MANY_BYTES_MAX} data bytes; blob {i} passes that")
            encoded.append(EncodedBlob(h, size, compression, data))
        if any(b.compression for b in encoded):
            existed = self._store.put_many_encoded(encoded)
        else:
            existed = self._store.put_many([(b.stored, b.hash) for b in encoded]) if encoded else []
        if len(existed) != len(encoded):
            raise RuntimeError(f"the store answered {len(existed)} of {len(encoded)} puts")
        return blob_pb2.PutManyResponse(existed=[bool(e) for e in existed])

    @_unary
    def GetSmall(self, request: Any, context: Any) -> Any:  # noqa: N802
        h = _hash_arg(request.hash)
        offset, length = int(request.offset), int(request.length)
        if request.local_only:
            info = self._store.info(h)
            if info is None:
                raise api.BlobNotFound(f"blob {h.hex()} is not on node {self._node_id}")
            if _range_len(offset, length, info.size) > api.SMALL_BYTES_MAX:
                raise _Abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                             f"the range is over {api.SMALL_BYTES_MAX} bytes; use Get")
            try:
                data = self._store.get(h, offset, length)
            except api.InvalidBlob as e:
                raise _Abort(grpc.StatusCode.OUT_OF_RANGE, str(e)) from e
            size, served_by = info.size, self._node_id
        else:
            coordinator = self._require_coordinator("Get without local_only")
            try:
                data, size, served_by = coordinator.get(h, offset, length)
            except api.InvalidBlob as e:
                raise _Abort(grpc.StatusCode.OUT_OF_RANGE, str(e)) from e
            if len(data) > api.SMALL_BYTES_MAX:
                raise _Abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                             f"the range is over {api.SMALL_BYTES_MAX} bytes; use Get")
        if len(data) != _range_len(offset, length, size):
            raise RuntimeError(f"read {len(data)} bytes for a range of {_range_len(offset, length, size)}")
        return blob_pb2.GetResponse(size=size, data=data, served_by=served_by)

    # ---------------------------------------------------------------- Get

    @_server_stream
    def Get(self, request: Any, context: Any) -> Iterator[Any]:  # noqa: N802
        h = _hash_arg(request.hash)
        offset, length = int(request.offset), int(request.length)
        pieces: Iterable[bytes]
        if request.local_only:
            info = self._store.info(h)
            if info is None:
                raise api.BlobNotFound(f"blob {h.hex()} is not on node {self._node_id}")
            expected, indexed_size = _range_len(offset, length, info.size), info.size
            try:
                size, pieces = self._store.read_iter(h, offset, length, chunk=api.CHUNK_BYTES)
            except api.InvalidBlob as e:  # the hash is valid, so only the range can be wrong
                raise _Abort(grpc.StatusCode.OUT_OF_RANGE, str(e)) from e
            served_by = self._node_id
        else:
            coordinator = self._require_coordinator("Get without local_only")
            try:
                data, size, served_by = coordinator.get(h, offset, length)
            except api.InvalidBlob as e:
                raise _Abort(grpc.StatusCode.OUT_OF_RANGE, str(e)) from e
            expected, indexed_size = _range_len(offset, length, size), size
            pieces = (data,)
        try:
            if size != indexed_size:  # the store's read_iter and info disagree about the blob
                raise RuntimeError(f"the store reports {size} and {indexed_size} bytes for one blob")
            with self._watchdog.watch(context.cancel) as watch:
                yield from self._stream(pieces, size, expected, served_by, watch)
        finally:
            close = getattr(pieces, "close", None)  # the store's stream holds a file descriptor
            if close is not None:
                close()

    def _stream(self, pieces: Iterable[bytes], size: int, expected: int, served_by: str,
                watch: _Watch) -> Iterator[Any]:
        """GetResponses of at most CHUNK_BYTES each; the first carries size and
        served_by. The store's pieces must add up to exactly `expected`: a short
        or long read is a bug here or in the store, and ends the call with an
        error rather than an OK over wrong data."""
        sent = 0
        first = True
        for piece in pieces:
            for i in range(0, len(piece), api.CHUNK_BYTES):
                chunk = piece[i:i + api.CHUNK_BYTES]
                sent += len(chunk)
                if sent > expected:
                    raise RuntimeError(f"the store returned more than the {expected} bytes asked for")
                msg = blob_pb2.GetResponse(data=bytes(chunk))
                if first:
                    msg.size, msg.served_by, first = size, served_by, False
                self._watchdog.touch(watch)
                yield msg
        if sent != expected:
            raise RuntimeError(f"the store returned {sent} of the {expected} bytes asked for")
        if first:
            yield blob_pb2.GetResponse(size=size, served_by=served_by)

    # ---------------------------------------------------------------- other replica calls

    @_unary
    def Has(self, request: Any, context: Any) -> Any:  # noqa: N802
        if len(request.hashes) > api.HAS_BATCH_MAX:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT,
                         f"Has takes at most {api.HAS_BATCH_MAX} hashes, got {len(request.hashes)}")
        hashes = [_hash_arg(h) for h in request.hashes]
        present = self._store.has(hashes)
        if len(present) != len(hashes):
            raise RuntimeError(f"the store answered {len(present)} of {len(hashes)} Has queries")
        return blob_pb2.HasResponse(present=[bool(p) for p in present])

    @_unary
    def Delete(self, request: Any, context: Any) -> Any:  # noqa: N802
        h = _hash_arg(request.hash)
        min_age_s = _seconds_arg(request.min_age_s, "min_age_s")
        deleted = self._store.delete(h, min_age_s)
        if deleted:
            log.info("event=blob_deleted node=%s hash=%s min_age_s=%.1f", self._node_id, h.hex(), min_age_s)
        return blob_pb2.DeleteResponse(deleted=bool(deleted))

    @_unary
    def List(self, request: Any, context: Any) -> Any:  # noqa: N802
        after = bytes(request.after)
        if after:
            _hash_arg(after, "after")
        limit = int(request.limit) or 1000
        if limit > api.LIST_LIMIT_MAX:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT,
                         f"List limit is 1..{api.LIST_LIMIT_MAX} (0 = 1000), got {limit}")
        infos = self._store.list(after, limit)
        if len(infos) > limit:
            raise RuntimeError(f"the store listed {len(infos)} blobs for a limit of {limit}")
        prev = after
        for info in infos:
            if info.hash <= prev:
                raise RuntimeError("the store's listing is not in strictly increasing hash order after `after`")
            prev = info.hash
        return blob_pb2.ListResponse(blobs=[_info_pb(i) for i in infos],
                                     next_after=infos[-1].hash if len(infos) == limit else b"")

    @_unary
    def Verify(self, request: Any, context: Any) -> Any:  # noqa: N802
        h = _hash_arg(request.hash)
        r = self._store.verify(h)
        if not r.verified and r.present:
            log.warning("event=verify_failed node=%s hash=%s error=%s", self._node_id, h.hex(), r.error)
        return blob_pb2.VerifyResponse(present=r.present, verified=r.verified,
                                       info=_info_pb(r.info) if r.info is not None else None, error=r.error)

    @_unary
    def Stats(self, request: Any, context: Any) -> Any:  # noqa: N802
        """The store's figures; counters are the store's, the watchdog's and the
        coordinator's. Where the coordinator and the store both name a counter
        (puts, gets, corrupt_found), the coordinator's keeps the name and the
        store's is reported as store_<name>."""
        s = dict(self._store.stats())
        fields = {k: s.pop(k, 0) for k in ("blobs", "bytes", "stored_bytes", "pack_bytes", "packs")}
        counters = {k: _uint(v) for k, v in s.items()}
        counters["streams_cancelled"] = self._watchdog.cancelled
        backlog = 0
        if self._coordinator is not None:
            for k, v in self._coordinator.counters().items():
                if k in counters:
                    counters["store_" + k] = counters[k]
                counters[k] = _uint(v)
            backlog = self._coordinator.repair_backlog()
        return blob_pb2.StatsResponse(
            node=self._node_id, blobs=_uint(fields["blobs"]), bytes=_uint(fields["bytes"]),
            stored_bytes=_uint(fields["stored_bytes"]), pack_bytes=_uint(fields["pack_bytes"]),
            packs=_uint(fields["packs"], 32), repair_backlog=_uint(backlog), counters=counters)

    # ---------------------------------------------------------------- cluster calls

    @_unary
    def Locate(self, request: Any, context: Any) -> Any:  # noqa: N802
        h = _hash_arg(request.hash)
        r = self._require_coordinator("Locate").locate(h)
        return blob_pb2.LocateResponse(hash=r.hash, size=r.size, copies=[
            blob_pb2.Copy(node=c.node, placed=c.placed, present=c.present, verified=c.verified,
                          stored_size=c.stored_size, compression=c.compression, error=c.error)
            for c in r.copies])

    @_unary
    def Scrub(self, request: Any, context: Any) -> Any:  # noqa: N802
        r = self._require_coordinator("Scrub").scrub(all_nodes=bool(request.all_nodes))
        return blob_pb2.ScrubResponse(checked=r.checked, corrupt=r.corrupt, repaired=r.repaired,
                                      unrepaired=r.unrepaired)

    @_unary
    def Gc(self, request: Any, context: Any) -> Any:  # noqa: N802
        grace_s = _seconds_arg(request.grace_s, "grace_s")
        coordinator = self._require_coordinator("Gc")
        r = coordinator.gc(dry_run=bool(request.dry_run), grace_s=grace_s or None)
        return blob_pb2.GcResponse(live=r.live, examined=r.examined, young=r.young, deleted=r.deleted,
                                   deleted_bytes=r.deleted_bytes, unreachable=list(r.unreachable or ()))


def serve_blobs(service: BlobService, address: str, threads: int = SERVER_THREADS) -> grpc.Server:
    """Starts a gRPC server for the blob service on `address`; raises OSError
    when the address cannot be bound."""
    return start_blob_server(service, address, threads)[0]


def start_blob_server(service: BlobService, address: str, threads: int = SERVER_THREADS) -> tuple[grpc.Server, int]:
    """serve_blobs, also returning the bound port (for an address ending in :0)."""
    if threads < 1:
        raise ValueError("the blob server needs at least one thread")
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix="blob-grpc"),
        # so_reuseport 0: a second server on the same address:port must fail to
        # bind, not silently share the port (gRPC enables SO_REUSEPORT on Linux).
        options=[("grpc.so_reuseport", 0),
                 ("grpc.max_receive_message_length", GRPC_RECEIVE_BYTES_MAX),
                 ("grpc.max_send_message_length", GRPC_SEND_BYTES_MAX)],
        # RPCs beyond the threads wait in the executor's queue; beyond this
        # many the transport answers RESOURCE_EXHAUSTED at once.
        maximum_concurrent_rpcs=4 * threads,
    )
    blob_pb2_grpc.add_BlobServiceServicer_to_server(service, server)
    try:
        # grpcio raises RuntimeError when it cannot bind (older releases returned 0).
        port = server.add_insecure_port(address)
    except RuntimeError as e:
        port = 0
        cause: Exception | None = e
    else:
        cause = None
    if port == 0:
        server.stop(0)
        raise OSError(f"cannot bind the blob service to {address}") from cause
    server.start()
    return server, port
