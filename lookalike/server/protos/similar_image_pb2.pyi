# ruff: noqa
# fmt: off
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class ImageFileIn(_message.Message):
    __slots__ = ("value", "image_size", "similarity")
    VALUE_FIELD_NUMBER: _ClassVar[int]
    IMAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    SIMILARITY_FIELD_NUMBER: _ClassVar[int]
    value: bytes
    image_size: float
    similarity: str
    def __init__(self, value: _Optional[bytes] = ..., image_size: _Optional[float] = ..., similarity: _Optional[str] = ...) -> None: ...

class ImageFileOut(_message.Message):
    __slots__ = ("imageOut1", "imageOut2", "imageOut3", "imageOut4", "imageOut5")
    IMAGEOUT1_FIELD_NUMBER: _ClassVar[int]
    IMAGEOUT2_FIELD_NUMBER: _ClassVar[int]
    IMAGEOUT3_FIELD_NUMBER: _ClassVar[int]
    IMAGEOUT4_FIELD_NUMBER: _ClassVar[int]
    IMAGEOUT5_FIELD_NUMBER: _ClassVar[int]
    imageOut1: bytes
    imageOut2: bytes
    imageOut3: bytes
    imageOut4: bytes
    imageOut5: bytes
    def __init__(self, imageOut1: _Optional[bytes] = ..., imageOut2: _Optional[bytes] = ..., imageOut3: _Optional[bytes] = ..., imageOut4: _Optional[bytes] = ..., imageOut5: _Optional[bytes] = ...) -> None: ...
