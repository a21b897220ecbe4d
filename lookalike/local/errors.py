"""Typed errors of local-feature extraction, storage and matching."""

from __future__ import annotations

from lookalike.errors import LookalikeError


class LocalFeaturesError(LookalikeError):
    """Local features could not be computed or used (e.g. OpenCV is not installed)."""


class CorruptLocalFeaturesError(LocalFeaturesError):
    """Serialised local features are truncated, corrupt, or of an unknown format version."""
