# ruff: noqa
# fmt: off
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class ImageFileIn(_message.Message):
    __slots__ = ("image", "similarity")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    SIMILARITY_FIELD_NUMBER: _ClassVar[int]
    image: str
    similarity: str
    def __init__(self, image: _Optional[str] = ..., similarity: _Optional[str] = ...) -> None: ...

class ImageFileOut(_message.Message):
    __slots__ = ("imageOut1", "imageOut2", "imageOut3", "imageOut4", "imageOut5")
    IMAGEOUT1_FIELD_NUMBER: _ClassVar[int]
    IMAGEOUT2_FIELD_NUMBER: _ClassVar[int]
    IMAGEOUT3_FIELD_NUMBER: _ClassVar[int]
    IMAGEOUT4_FIELD_NUMBER: _ClassVar[int]
    IMAGEOUT5_FIELD_NUMBER: _ClassVar[int]
    imageOut1: str
    imageOut2: str
    imageOut3: str
    imageOut4: str
    imageOut5: str
    def __init__(self, imageOut1: _Optional[str] = ..., imageOut2: _Optional[str] = ..., imageOut3: _Optional[str] = ..., imageOut4: _Optional[str] = ..., imageOut5: _Optional[str] = ...) -> None: ...
