"""Encoders turn images into vectors. Build one by name with ``create_encoder``."""

from lookalike.encoders.base import (
    Encoder,
    EncoderIdentity,
    create_encoder,
    list_encoders,
    register_encoder,
)
from lookalike.encoders.preprocess import PreprocessConfig

__all__ = [
    "Encoder",
    "EncoderIdentity",
    "PreprocessConfig",
    "create_encoder",
    "list_encoders",
    "register_encoder",
]
