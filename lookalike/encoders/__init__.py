"""Encoders turn images into vectors. Build one by name with ``create_encoder``."""

from lookalike.encoders.base import Encoder, EncoderCapabilities, EncoderIdentity
from lookalike.encoders.preprocess import PreprocessConfig
from lookalike.encoders.registry import (
    accepted_options,
    create_encoder,
    list_encoders,
    register_encoder,
)

__all__ = [
    "Encoder",
    "EncoderCapabilities",
    "EncoderIdentity",
    "PreprocessConfig",
    "accepted_options",
    "create_encoder",
    "list_encoders",
    "register_encoder",
]
