from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Consistency(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LINEARIZABLE: _ClassVar[Consistency]
    STALE: _ClassVar[Consistency]
LINEARIZABLE: Consistency
STALE: Consistency

class CreateStoreCmd(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class DropStoreCmd(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class CreateKeyspaceCmd(_message.Message):
    __slots__ = ("store", "keyspace")
    STORE_FIELD_NUMBER: _ClassVar[int]
    KEYSPACE_FIELD_NUMBER: _ClassVar[int]
    store: str
    keyspace: str
    def __init__(self, store: _Optional[str] = ..., keyspace: _Optional[str] = ...) -> None: ...

class Condition(_message.Message):
    __slots__ = ("keyspace", "key", "version_equals", "value_equals", "absent")
    KEYSPACE_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    VERSION_EQUALS_FIELD_NUMBER: _ClassVar[int]
    VALUE_EQUALS_FIELD_NUMBER: _ClassVar[int]
    ABSENT_FIELD_NUMBER: _ClassVar[int]
    keyspace: str
    key: bytes
    version_equals: int
    value_equals: bytes
    absent: bool
    def __init__(self, keyspace: _Optional[str] = ..., key: _Optional[bytes] = ..., version_equals: _Optional[int] = ..., value_equals: _Optional[bytes] = ..., absent: _Optional[bool] = ...) -> None: ...

class Mutation(_message.Message):
    __slots__ = ("keyspace", "key", "put", "delete")
    KEYSPACE_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    PUT_FIELD_NUMBER: _ClassVar[int]
    DELETE_FIELD_NUMBER: _ClassVar[int]
    keyspace: str
    key: bytes
    put: bytes
    delete: bool
    def __init__(self, keyspace: _Optional[str] = ..., key: _Optional[bytes] = ..., put: _Optional[bytes] = ..., delete: _Optional[bool] = ...) -> None: ...

class BatchCmd(_message.Message):
    __slots__ = ("store", "conditions", "mutations")
    STORE_FIELD_NUMBER: _ClassVar[int]
    CONDITIONS_FIELD_NUMBER: _ClassVar[int]
    MUTATIONS_FIELD_NUMBER: _ClassVar[int]
    store: str
    conditions: _containers.RepeatedCompositeFieldContainer[Condition]
    mutations: _containers.RepeatedCompositeFieldContainer[Mutation]
    def __init__(self, store: _Optional[str] = ..., conditions: _Optional[_Iterable[_Union[Condition, _Mapping]]] = ..., mutations: _Optional[_Iterable[_Union[Mutation, _Mapping]]] = ...) -> None: ...

class BarrierCmd(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Command(_message.Message):
    __slots__ = ("tenant", "request_id", "create_store", "drop_store", "create_keyspace", "batch", "barrier")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CREATE_STORE_FIELD_NUMBER: _ClassVar[int]
    DROP_STORE_FIELD_NUMBER: _ClassVar[int]
    CREATE_KEYSPACE_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    BARRIER_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    request_id: bytes
    create_store: CreateStoreCmd
    drop_store: DropStoreCmd
    create_keyspace: CreateKeyspaceCmd
    batch: BatchCmd
    barrier: BarrierCmd
    def __init__(self, tenant: _Optional[str] = ..., request_id: _Optional[bytes] = ..., create_store: _Optional[_Union[CreateStoreCmd, _Mapping]] = ..., drop_store: _Optional[_Union[DropStoreCmd, _Mapping]] = ..., create_keyspace: _Optional[_Union[CreateKeyspaceCmd, _Mapping]] = ..., batch: _Optional[_Union[BatchCmd, _Mapping]] = ..., barrier: _Optional[_Union[BarrierCmd, _Mapping]] = ...) -> None: ...

class CommandResult(_message.Message):
    __slots__ = ("code", "message", "index", "failed_condition")
    class Code(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        OK: _ClassVar[CommandResult.Code]
        NOT_FOUND: _ClassVar[CommandResult.Code]
        ALREADY_EXISTS: _ClassVar[CommandResult.Code]
        CONDITION_FAILED: _ClassVar[CommandResult.Code]
        INVALID: _ClassVar[CommandResult.Code]
    OK: CommandResult.Code
    NOT_FOUND: CommandResult.Code
    ALREADY_EXISTS: CommandResult.Code
    CONDITION_FAILED: CommandResult.Code
    INVALID: CommandResult.Code
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    FAILED_CONDITION_FIELD_NUMBER: _ClassVar[int]
    code: CommandResult.Code
    message: str
    index: int
    failed_condition: int
    def __init__(self, code: _Optional[_Union[CommandResult.Code, str]] = ..., message: _Optional[str] = ..., index: _Optional[int] = ..., failed_condition: _Optional[int] = ...) -> None: ...

class CreateStoreRequest(_message.Message):
    __slots__ = ("store", "request_id")
    STORE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    store: str
    request_id: bytes
    def __init__(self, store: _Optional[str] = ..., request_id: _Optional[bytes] = ...) -> None: ...

class DropStoreRequest(_message.Message):
    __slots__ = ("store", "request_id")
    STORE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    store: str
    request_id: bytes
    def __init__(self, store: _Optional[str] = ..., request_id: _Optional[bytes] = ...) -> None: ...

class StoreInfo(_message.Message):
    __slots__ = ("name", "id", "keyspaces")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    KEYSPACES_FIELD_NUMBER: _ClassVar[int]
    name: str
    id: int
    keyspaces: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., id: _Optional[int] = ..., keyspaces: _Optional[_Iterable[str]] = ...) -> None: ...

class ListStoresRequest(_message.Message):
    __slots__ = ("consistency",)
    CONSISTENCY_FIELD_NUMBER: _ClassVar[int]
    consistency: Consistency
    def __init__(self, consistency: _Optional[_Union[Consistency, str]] = ...) -> None: ...

class ListStoresResponse(_message.Message):
    __slots__ = ("stores",)
    STORES_FIELD_NUMBER: _ClassVar[int]
    stores: _containers.RepeatedCompositeFieldContainer[StoreInfo]
    def __init__(self, stores: _Optional[_Iterable[_Union[StoreInfo, _Mapping]]] = ...) -> None: ...

class CreateKeyspaceRequest(_message.Message):
    __slots__ = ("store", "keyspace", "request_id")
    STORE_FIELD_NUMBER: _ClassVar[int]
    KEYSPACE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    store: str
    keyspace: str
    request_id: bytes
    def __init__(self, store: _Optional[str] = ..., keyspace: _Optional[str] = ..., request_id: _Optional[bytes] = ...) -> None: ...

class ListKeyspacesRequest(_message.Message):
    __slots__ = ("store", "consistency")
    STORE_FIELD_NUMBER: _ClassVar[int]
    CONSISTENCY_FIELD_NUMBER: _ClassVar[int]
    store: str
    consistency: Consistency
    def __init__(self, store: _Optional[str] = ..., consistency: _Optional[_Union[Consistency, str]] = ...) -> None: ...

class ListKeyspacesResponse(_message.Message):
    __slots__ = ("keyspaces",)
    KEYSPACES_FIELD_NUMBER: _ClassVar[int]
    keyspaces: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, keyspaces: _Optional[_Iterable[str]] = ...) -> None: ...

class GetRequest(_message.Message):
    __slots__ = ("store", "keyspace", "key", "consistency")
    STORE_FIELD_NUMBER: _ClassVar[int]
    KEYSPACE_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    CONSISTENCY_FIELD_NUMBER: _ClassVar[int]
    store: str
    keyspace: str
    key: bytes
    consistency: Consistency
    def __init__(self, store: _Optional[str] = ..., keyspace: _Optional[str] = ..., key: _Optional[bytes] = ..., consistency: _Optional[_Union[Consistency, str]] = ...) -> None: ...

class GetResponse(_message.Message):
    __slots__ = ("found", "value", "version", "read_index")
    FOUND_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    READ_INDEX_FIELD_NUMBER: _ClassVar[int]
    found: bool
    value: bytes
    version: int
    read_index: int
    def __init__(self, found: _Optional[bool] = ..., value: _Optional[bytes] = ..., version: _Optional[int] = ..., read_index: _Optional[int] = ...) -> None: ...

class PutRequest(_message.Message):
    __slots__ = ("store", "keyspace", "key", "value", "request_id")
    STORE_FIELD_NUMBER: _ClassVar[int]
    KEYSPACE_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    store: str
    keyspace: str
    key: bytes
    value: bytes
    request_id: bytes
    def __init__(self, store: _Optional[str] = ..., keyspace: _Optional[str] = ..., key: _Optional[bytes] = ..., value: _Optional[bytes] = ..., request_id: _Optional[bytes] = ...) -> None: ...

class DeleteRequest(_message.Message):
    __slots__ = ("store", "keyspace", "key", "request_id")
    STORE_FIELD_NUMBER: _ClassVar[int]
    KEYSPACE_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    store: str
    keyspace: str
    key: bytes
    request_id: bytes
    def __init__(self, store: _Optional[str] = ..., keyspace: _Optional[str] = ..., key: _Optional[bytes] = ..., request_id: _Optional[bytes] = ...) -> None: ...

class WriteResponse(_message.Message):
    __slots__ = ("index",)
    INDEX_FIELD_NUMBER: _ClassVar[int]
    index: int
    def __init__(self, index: _Optional[int] = ...) -> None: ...

class ScanRequest(_message.Message):
    __slots__ = ("store", "keyspace", "prefix", "start", "end", "limit", "continuation", "consistency")
    STORE_FIELD_NUMBER: _ClassVar[int]
    KEYSPACE_FIELD_NUMBER: _ClassVar[int]
    PREFIX_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    CONTINUATION_FIELD_NUMBER: _ClassVar[int]
    CONSISTENCY_FIELD_NUMBER: _ClassVar[int]
    store: str
    keyspace: str
    prefix: bytes
    start: bytes
    end: bytes
    limit: int
    continuation: bytes
    consistency: Consistency
    def __init__(self, store: _Optional[str] = ..., keyspace: _Optional[str] = ..., prefix: _Optional[bytes] = ..., start: _Optional[bytes] = ..., end: _Optional[bytes] = ..., limit: _Optional[int] = ..., continuation: _Optional[bytes] = ..., consistency: _Optional[_Union[Consistency, str]] = ...) -> None: ...

class KeyValue(_message.Message):
    __slots__ = ("key", "value", "version")
    KEY_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    key: bytes
    value: bytes
    version: int
    def __init__(self, key: _Optional[bytes] = ..., value: _Optional[bytes] = ..., version: _Optional[int] = ...) -> None: ...

class ScanResponse(_message.Message):
    __slots__ = ("items", "continuation", "read_index")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    CONTINUATION_FIELD_NUMBER: _ClassVar[int]
    READ_INDEX_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[KeyValue]
    continuation: bytes
    read_index: int
    def __init__(self, items: _Optional[_Iterable[_Union[KeyValue, _Mapping]]] = ..., continuation: _Optional[bytes] = ..., read_index: _Optional[int] = ...) -> None: ...

class BatchRequest(_message.Message):
    __slots__ = ("batch", "request_id")
    BATCH_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    batch: BatchCmd
    request_id: bytes
    def __init__(self, batch: _Optional[_Union[BatchCmd, _Mapping]] = ..., request_id: _Optional[bytes] = ...) -> None: ...

class BatchResponse(_message.Message):
    __slots__ = ("applied", "index", "failed_condition")
    APPLIED_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    FAILED_CONDITION_FIELD_NUMBER: _ClassVar[int]
    applied: bool
    index: int
    failed_condition: int
    def __init__(self, applied: _Optional[bool] = ..., index: _Optional[int] = ..., failed_condition: _Optional[int] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatusResponse(_message.Message):
    __slots__ = ("node_id", "role", "term", "commit_index", "applied_index", "leader", "log_len", "ready", "raft_peers_connected")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    TERM_FIELD_NUMBER: _ClassVar[int]
    COMMIT_INDEX_FIELD_NUMBER: _ClassVar[int]
    APPLIED_INDEX_FIELD_NUMBER: _ClassVar[int]
    LEADER_FIELD_NUMBER: _ClassVar[int]
    LOG_LEN_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    RAFT_PEERS_CONNECTED_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    role: str
    term: int
    commit_index: int
    applied_index: int
    leader: str
    log_len: int
    ready: bool
    raft_peers_connected: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, node_id: _Optional[str] = ..., role: _Optional[str] = ..., term: _Optional[int] = ..., commit_index: _Optional[int] = ..., applied_index: _Optional[int] = ..., leader: _Optional[str] = ..., log_len: _Optional[int] = ..., ready: _Optional[bool] = ..., raft_peers_connected: _Optional[_Iterable[str]] = ...) -> None: ...
