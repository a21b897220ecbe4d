# ruff: noqa
# fmt: off
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SearchRequest(_message.Message):
    __slots__ = ("image", "k", "metric", "threshold", "where", "rerank", "query_expansion", "multi_crop", "images", "negatives", "text", "weights", "filters", "near", "within", "sort", "no_copy_views", "copies")
    class WhereEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    METRIC_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    WHERE_FIELD_NUMBER: _ClassVar[int]
    RERANK_FIELD_NUMBER: _ClassVar[int]
    QUERY_EXPANSION_FIELD_NUMBER: _ClassVar[int]
    MULTI_CROP_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    NEGATIVES_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    FILTERS_FIELD_NUMBER: _ClassVar[int]
    NEAR_FIELD_NUMBER: _ClassVar[int]
    WITHIN_FIELD_NUMBER: _ClassVar[int]
    SORT_FIELD_NUMBER: _ClassVar[int]
    NO_COPY_VIEWS_FIELD_NUMBER: _ClassVar[int]
    COPIES_FIELD_NUMBER: _ClassVar[int]
    image: bytes
    k: int
    metric: str
    threshold: float
    where: _containers.ScalarMap[str, str]
    rerank: int
    query_expansion: int
    multi_crop: bool
    images: _containers.RepeatedScalarFieldContainer[bytes]
    negatives: _containers.RepeatedScalarFieldContainer[bytes]
    text: str
    weights: _containers.RepeatedScalarFieldContainer[float]
    filters: _containers.RepeatedScalarFieldContainer[str]
    near: Near
    within: Within
    sort: str
    no_copy_views: bool
    copies: bool
    def __init__(self, image: _Optional[bytes] = ..., k: _Optional[int] = ..., metric: _Optional[str] = ..., threshold: _Optional[float] = ..., where: _Optional[_Mapping[str, str]] = ..., rerank: _Optional[int] = ..., query_expansion: _Optional[int] = ..., multi_crop: _Optional[bool] = ..., images: _Optional[_Iterable[bytes]] = ..., negatives: _Optional[_Iterable[bytes]] = ..., text: _Optional[str] = ..., weights: _Optional[_Iterable[float]] = ..., filters: _Optional[_Iterable[str]] = ..., near: _Optional[_Union[Near, _Mapping]] = ..., within: _Optional[_Union[Within, _Mapping]] = ..., sort: _Optional[str] = ..., no_copy_views: _Optional[bool] = ..., copies: _Optional[bool] = ...) -> None: ...

class Near(_message.Message):
    __slots__ = ("lat", "lon", "km")
    LAT_FIELD_NUMBER: _ClassVar[int]
    LON_FIELD_NUMBER: _ClassVar[int]
    KM_FIELD_NUMBER: _ClassVar[int]
    lat: float
    lon: float
    km: float
    def __init__(self, lat: _Optional[float] = ..., lon: _Optional[float] = ..., km: _Optional[float] = ...) -> None: ...

class Within(_message.Message):
    __slots__ = ("south", "west", "north", "east")
    SOUTH_FIELD_NUMBER: _ClassVar[int]
    WEST_FIELD_NUMBER: _ClassVar[int]
    NORTH_FIELD_NUMBER: _ClassVar[int]
    EAST_FIELD_NUMBER: _ClassVar[int]
    south: float
    west: float
    north: float
    east: float
    def __init__(self, south: _Optional[float] = ..., west: _Optional[float] = ..., north: _Optional[float] = ..., east: _Optional[float] = ...) -> None: ...

class Match(_message.Message):
    __slots__ = ("id", "path", "score", "metadata", "width", "height", "copy_probability", "transform")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    COPY_PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    TRANSFORM_FIELD_NUMBER: _ClassVar[int]
    id: int
    path: str
    score: float
    metadata: _containers.ScalarMap[str, str]
    width: int
    height: int
    copy_probability: float
    transform: Transform
    def __init__(self, id: _Optional[int] = ..., path: _Optional[str] = ..., score: _Optional[float] = ..., metadata: _Optional[_Mapping[str, str]] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., copy_probability: _Optional[float] = ..., transform: _Optional[_Union[Transform, _Mapping]] = ...) -> None: ...

class Transform(_message.Message):
    __slots__ = ("rotation_degrees", "scale", "mirrored", "inliers")
    ROTATION_DEGREES_FIELD_NUMBER: _ClassVar[int]
    SCALE_FIELD_NUMBER: _ClassVar[int]
    MIRRORED_FIELD_NUMBER: _ClassVar[int]
    INLIERS_FIELD_NUMBER: _ClassVar[int]
    rotation_degrees: float
    scale: float
    mirrored: bool
    inliers: int
    def __init__(self, rotation_degrees: _Optional[float] = ..., scale: _Optional[float] = ..., mirrored: _Optional[bool] = ..., inliers: _Optional[int] = ...) -> None: ...

class SearchReply(_message.Message):
    __slots__ = ("matches", "no_close_match", "best_score", "metric", "partial")
    MATCHES_FIELD_NUMBER: _ClassVar[int]
    NO_CLOSE_MATCH_FIELD_NUMBER: _ClassVar[int]
    BEST_SCORE_FIELD_NUMBER: _ClassVar[int]
    METRIC_FIELD_NUMBER: _ClassVar[int]
    PARTIAL_FIELD_NUMBER: _ClassVar[int]
    matches: _containers.RepeatedCompositeFieldContainer[Match]
    no_close_match: bool
    best_score: float
    metric: str
    partial: bool
    def __init__(self, matches: _Optional[_Iterable[_Union[Match, _Mapping]]] = ..., no_close_match: _Optional[bool] = ..., best_score: _Optional[float] = ..., metric: _Optional[str] = ..., partial: _Optional[bool] = ...) -> None: ...

class AddRequest(_message.Message):
    __slots__ = ("image", "filename", "metadata")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    FILENAME_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    image: bytes
    filename: str
    metadata: _containers.ScalarMap[str, str]
    def __init__(self, image: _Optional[bytes] = ..., filename: _Optional[str] = ..., metadata: _Optional[_Mapping[str, str]] = ...) -> None: ...

class AddReply(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: int
    def __init__(self, id: _Optional[int] = ...) -> None: ...

class RemoveRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: int
    def __init__(self, id: _Optional[int] = ...) -> None: ...

class RemoveReply(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatsReply(_message.Message):
    __slots__ = ("images", "model", "layer", "dim", "index_spec", "index_kind", "schema_version")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    INDEX_SPEC_FIELD_NUMBER: _ClassVar[int]
    INDEX_KIND_FIELD_NUMBER: _ClassVar[int]
    SCHEMA_VERSION_FIELD_NUMBER: _ClassVar[int]
    images: int
    model: str
    layer: str
    dim: int
    index_spec: str
    index_kind: str
    schema_version: int
    def __init__(self, images: _Optional[int] = ..., model: _Optional[str] = ..., layer: _Optional[str] = ..., dim: _Optional[int] = ..., index_spec: _Optional[str] = ..., index_kind: _Optional[str] = ..., schema_version: _Optional[int] = ...) -> None: ...
