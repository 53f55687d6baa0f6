from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class AddWorkersRequest(_message.Message):
    __slots__ = ("pool", "count")
    POOL_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    pool: str
    count: int
    def __init__(self, pool: _Optional[str] = ..., count: _Optional[int] = ...) -> None: ...

class AddWorkersResponse(_message.Message):
    __slots__ = ("worker_ids", "topology")
    WORKER_IDS_FIELD_NUMBER: _ClassVar[int]
    TOPOLOGY_FIELD_NUMBER: _ClassVar[int]
    worker_ids: _containers.RepeatedScalarFieldContainer[str]
    topology: str
    def __init__(self, worker_ids: _Optional[_Iterable[str]] = ..., topology: _Optional[str] = ...) -> None: ...

class RemoveWorkerRequest(_message.Message):
    __slots__ = ("worker_id", "drain_timeout_s")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    DRAIN_TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    drain_timeout_s: float
    def __init__(self, worker_id: _Optional[str] = ..., drain_timeout_s: _Optional[float] = ...) -> None: ...

class RemoveWorkerResponse(_message.Message):
    __slots__ = ("worker_id", "drained", "topology")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    DRAINED_FIELD_NUMBER: _ClassVar[int]
    TOPOLOGY_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    drained: bool
    topology: str
    def __init__(self, worker_id: _Optional[str] = ..., drained: _Optional[bool] = ..., topology: _Optional[str] = ...) -> None: ...

class ScalePoolRequest(_message.Message):
    __slots__ = ("pool", "replicas", "drain_timeout_s")
    POOL_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    DRAIN_TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    pool: str
    replicas: int
    drain_timeout_s: float
    def __init__(self, pool: _Optional[str] = ..., replicas: _Optional[int] = ..., drain_timeout_s: _Optional[float] = ...) -> None: ...

class ScalePoolResponse(_message.Message):
    __slots__ = ("added", "removed", "topology")
    ADDED_FIELD_NUMBER: _ClassVar[int]
    REMOVED_FIELD_NUMBER: _ClassVar[int]
    TOPOLOGY_FIELD_NUMBER: _ClassVar[int]
    added: _containers.RepeatedScalarFieldContainer[str]
    removed: _containers.RepeatedScalarFieldContainer[str]
    topology: str
    def __init__(self, added: _Optional[_Iterable[str]] = ..., removed: _Optional[_Iterable[str]] = ..., topology: _Optional[str] = ...) -> None: ...
