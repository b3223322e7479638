from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PutRequest(_message.Message):
    __slots__ = ("hash", "size", "replicate", "data", "compression")
    HASH_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    REPLICATE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    COMPRESSION_FIELD_NUMBER: _ClassVar[int]
    hash: bytes
    size: int
    replicate: bool
    data: bytes
    compression: int
    def __init__(self, hash: _Optional[bytes] = ..., size: _Optional[int] = ..., replicate: _Optional[bool] = ..., data: _Optional[bytes] = ..., compression: _Optional[int] = ...) -> None: ...

class PutResponse(_message.Message):
    __slots__ = ("hash", "stored_on", "pending", "existed")
    HASH_FIELD_NUMBER: _ClassVar[int]
    STORED_ON_FIELD_NUMBER: _ClassVar[int]
    PENDING_FIELD_NUMBER: _ClassVar[int]
    EXISTED_FIELD_NUMBER: _ClassVar[int]
    hash: bytes
    stored_on: _containers.RepeatedScalarFieldContainer[str]
    pending: _containers.RepeatedScalarFieldContainer[str]
    existed: bool
    def __init__(self, hash: _Optional[bytes] = ..., stored_on: _Optional[_Iterable[str]] = ..., pending: _Optional[_Iterable[str]] = ..., existed: _Optional[bool] = ...) -> None: ...

class PutManyRequest(_message.Message):
    __slots__ = ("blobs",)
    BLOBS_FIELD_NUMBER: _ClassVar[int]
    blobs: _containers.RepeatedCompositeFieldContainer[PutRequest]
    def __init__(self, blobs: _Optional[_Iterable[_Union[PutRequest, _Mapping]]] = ...) -> None: ...

class PutManyResponse(_message.Message):
    __slots__ = ("existed",)
    EXISTED_FIELD_NUMBER: _ClassVar[int]
    existed: _containers.RepeatedScalarFieldContainer[bool]
    def __init__(self, existed: _Optional[_Iterable[bool]] = ...) -> None: ...

class GetRequest(_message.Message):
    __slots__ = ("hash", "offset", "length", "local_only")
    HASH_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    LOCAL_ONLY_FIELD_NUMBER: _ClassVar[int]
    hash: bytes
    offset: int
    length: int
    local_only: bool
    def __init__(self, hash: _Optional[bytes] = ..., offset: _Optional[int] = ..., length: _Optional[int] = ..., local_only: _Optional[bool] = ...) -> None: ...

class GetResponse(_message.Message):
    __slots__ = ("size", "data", "served_by")
    SIZE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    SERVED_BY_FIELD_NUMBER: _ClassVar[int]
    size: int
    data: bytes
    served_by: str
    def __init__(self, size: _Optional[int] = ..., data: _Optional[bytes] = ..., served_by: _Optional[str] = ...) -> None: ...

class HasRequest(_message.Message):
    __slots__ = ("hashes",)
    HASHES_FIELD_NUMBER: _ClassVar[int]
    hashes: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, hashes: _Optional[_Iterable[bytes]] = ...) -> None: ...

class HasResponse(_message.Message):
    __slots__ = ("present",)
    PRESENT_FIELD_NUMBER: _ClassVar[int]
    present: _containers.RepeatedScalarFieldContainer[bool]
    def __init__(self, present: _Optional[_Iterable[bool]] = ...) -> None: ...

class DeleteRequest(_message.Message):
    __slots__ = ("hash", "min_age_s")
    HASH_FIELD_NUMBER: _ClassVar[int]
    MIN_AGE_S_FIELD_NUMBER: _ClassVar[int]
    hash: bytes
    min_age_s: float
    def __init__(self, hash: _Optional[bytes] = ..., min_age_s: _Optional[float] = ...) -> None: ...

class DeleteResponse(_message.Message):
    __slots__ = ("deleted",)
    DELETED_FIELD_NUMBER: _ClassVar[int]
    deleted: bool
    def __init__(self, deleted: _Optional[bool] = ...) -> None: ...

class BlobInfo(_message.Message):
    __slots__ = ("hash", "size", "stored_size", "compression", "age_s")
    HASH_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    STORED_SIZE_FIELD_NUMBER: _ClassVar[int]
    COMPRESSION_FIELD_NUMBER: _ClassVar[int]
    AGE_S_FIELD_NUMBER: _ClassVar[int]
    hash: bytes
    size: int
    stored_size: int
    compression: str
    age_s: float
    def __init__(self, hash: _Optional[bytes] = ..., size: _Optional[int] = ..., stored_size: _Optional[int] = ..., compression: _Optional[str] = ..., age_s: _Optional[float] = ...) -> None: ...

class ListRequest(_message.Message):
    __slots__ = ("after", "limit")
    AFTER_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    after: bytes
    limit: int
    def __init__(self, after: _Optional[bytes] = ..., limit: _Optional[int] = ...) -> None: ...

class ListResponse(_message.Message):
    __slots__ = ("blobs", "next_after")
    BLOBS_FIELD_NUMBER: _ClassVar[int]
    NEXT_AFTER_FIELD_NUMBER: _ClassVar[int]
    blobs: _containers.RepeatedCompositeFieldContainer[BlobInfo]
    next_after: bytes
    def __init__(self, blobs: _Optional[_Iterable[_Union[BlobInfo, _Mapping]]] = ..., next_after: _Optional[bytes] = ...) -> None: ...

class VerifyRequest(_message.Message):
    __slots__ = ("hash",)
    HASH_FIELD_NUMBER: _ClassVar[int]
    hash: bytes
    def __init__(self, hash: _Optional[bytes] = ...) -> None: ...

class VerifyResponse(_message.Message):
    __slots__ = ("present", "verified", "info", "error")
    PRESENT_FIELD_NUMBER: _ClassVar[int]
    VERIFIED_FIELD_NUMBER: _ClassVar[int]
    INFO_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    present: bool
    verified: bool
    info: BlobInfo
    error: str
    def __init__(self, present: _Optional[bool] = ..., verified: _Optional[bool] = ..., info: _Optional[_Union[BlobInfo, _Mapping]] = ..., error: _Optional[str] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatsResponse(_message.Message):
    __slots__ = ("node", "blobs", "bytes", "stored_bytes", "pack_bytes", "packs", "repair_backlog", "counters")
    class CountersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    NODE_FIELD_NUMBER: _ClassVar[int]
    BLOBS_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    STORED_BYTES_FIELD_NUMBER: _ClassVar[int]
    PACK_BYTES_FIELD_NUMBER: _ClassVar[int]
    PACKS_FIELD_NUMBER: _ClassVar[int]
    REPAIR_BACKLOG_FIELD_NUMBER: _ClassVar[int]
    COUNTERS_FIELD_NUMBER: _ClassVar[int]
    node: str
    blobs: int
    bytes: int
    stored_bytes: int
    pack_bytes: int
    packs: int
    repair_backlog: int
    counters: _containers.ScalarMap[str, int]
    def __init__(self, node: _Optional[str] = ..., blobs: _Optional[int] = ..., bytes: _Optional[int] = ..., stored_bytes: _Optional[int] = ..., pack_bytes: _Optional[int] = ..., packs: _Optional[int] = ..., repair_backlog: _Optional[int] = ..., counters: _Optional[_Mapping[str, int]] = ...) -> None: ...

class LocateRequest(_message.Message):
    __slots__ = ("hash",)
    HASH_FIELD_NUMBER: _ClassVar[int]
    hash: bytes
    def __init__(self, hash: _Optional[bytes] = ...) -> None: ...

class Copy(_message.Message):
    __slots__ = ("node", "placed", "present", "verified", "stored_size", "compression", "error")
    NODE_FIELD_NUMBER: _ClassVar[int]
    PLACED_FIELD_NUMBER: _ClassVar[int]
    PRESENT_FIELD_NUMBER: _ClassVar[int]
    VERIFIED_FIELD_NUMBER: _ClassVar[int]
    STORED_SIZE_FIELD_NUMBER: _ClassVar[int]
    COMPRESSION_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    node: str
    placed: bool
    present: bool
    verified: bool
    stored_size: int
    compression: str
    error: str
    def __init__(self, node: _Optional[str] = ..., placed: _Optional[bool] = ..., present: _Optional[bool] = ..., verified: _Optional[bool] = ..., stored_size: _Optional[int] = ..., compression: _Optional[str] = ..., error: _Optional[str] = ...) -> None: ...

class LocateResponse(_message.Message):
    __slots__ = ("hash", "size", "copies")
    HASH_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    COPIES_FIELD_NUMBER: _ClassVar[int]
    hash: bytes
    size: int
    copies: _containers.RepeatedCompositeFieldContainer[Copy]
    def __init__(self, hash: _Optional[bytes] = ..., size: _Optional[int] = ..., copies: _Optional[_Iterable[_Union[Copy, _Mapping]]] = ...) -> None: ...

class ScrubRequest(_message.Message):
    __slots__ = ("all_nodes",)
    ALL_NODES_FIELD_NUMBER: _ClassVar[int]
    all_nodes: bool
    def __init__(self, all_nodes: _Optional[bool] = ...) -> None: ...

class ScrubResponse(_message.Message):
    __slots__ = ("checked", "corrupt", "repaired", "unrepaired")
    CHECKED_FIELD_NUMBER: _ClassVar[int]
    CORRUPT_FIELD_NUMBER: _ClassVar[int]
    REPAIRED_FIELD_NUMBER: _ClassVar[int]
    UNREPAIRED_FIELD_NUMBER: _ClassVar[int]
    checked: int
    corrupt: int
    repaired: int
    unrepaired: int
    def __init__(self, checked: _Optional[int] = ..., corrupt: _Optional[int] = ..., repaired: _Optional[int] = ..., unrepaired: _Optional[int] = ...) -> None: ...

class GcRequest(_message.Message):
    __slots__ = ("dry_run", "grace_s")
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    GRACE_S_FIELD_NUMBER: _ClassVar[int]
    dry_run: bool
    grace_s: float
    def __init__(self, dry_run: _Optional[bool] = ..., grace_s: _Optional[float] = ...) -> None: ...

class GcResponse(_message.Message):
    __slots__ = ("live", "examined", "young", "deleted", "deleted_bytes", "unreachable")
    LIVE_FIELD_NUMBER: _ClassVar[int]
    EXAMINED_FIELD_NUMBER: _ClassVar[int]
    YOUNG_FIELD_NUMBER: _ClassVar[int]
    DELETED_FIELD_NUMBER: _ClassVar[int]
    DELETED_BYTES_FIELD_NUMBER: _ClassVar[int]
    UNREACHABLE_FIELD_NUMBER: _ClassVar[int]
    live: int
    examined: int
    young: int
    deleted: int
    deleted_bytes: int
    unreachable: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, live: _Optional[int] = ..., examined: _Optional[int] = ..., young: _Optional[int] = ..., deleted: _Optional[int] = ..., deleted_bytes: _Optional[int] = ..., unreachable: _Optional[_Iterable[str]] = ...) -> None: ...
