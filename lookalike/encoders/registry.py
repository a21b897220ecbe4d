"""Encoders by name: ``create_encoder("efficientnet-lite0")``, ``create_encoder("hf:<hub id or
folder>")``, ``create_encoder("<base>+<name>")`` for a fine-tuned one, or any name registered
with :func:`register_encoder` from outside the package.

Each family's factory declares the options it takes by its signature, so a caller asks
:func:`accepted_options` instead of guessing: an encoder without a ``pooling`` argument is
simply never given one.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from lookalike.encoders.base import Encoder
from lookalike.errors import EncoderError

EncoderFactory = Callable[..., Encoder]
# Names registered at run time (register_encoder); built-in families are resolved below.
_REGISTRY: dict[str, EncoderFactory] = {}
HF_PREFIX = "hf:"
FINETUNED_SEPARATOR = "+"


def register_encoder(name: str) -> Callable[[EncoderFactory], EncoderFactory]:
    """Decorator that makes a factory available to ``create_encoder(name)``; the factory's
    keyword arguments are the options it accepts."""

    def decorate(factory: EncoderFactory) -> EncoderFactory:
        _REGISTRY[name] = factory
        return factory

    return decorate


def _builtin_lite_names() -> list[str]:
    # From the torch-free module: naming or inspecting an encoder must not load torch.
    from lookalike.encoders.lite import LITE_NAMES

    return sorted(LITE_NAMES)


def list_encoders() -> list[str]:
    """Names accepted by ``create_encoder`` (plus any ``hf:<hub id or folder>`` and
    ``<base>+<name>`` of a fine-tuned encoder)."""
    return sorted({*_builtin_lite_names(), *_REGISTRY})


def factory_for(name: str) -> EncoderFactory:
    """The factory that builds encoder ``name`` (called with options only), or
    ``EncoderError`` naming what exists."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    if FINETUNED_SEPARATOR in name:
        from lookalike.encoders.finetuned import create_finetuned_encoder

        return _bind_name(create_finetuned_encoder, name, create_base=create_encoder)
    if name.startswith(HF_PREFIX):
        from lookalike.encoders.hf import create_hf_encoder

        return _bind_name(create_hf_encoder, name)
    if name in _builtin_lite_names():
        from lookalike.encoders.lite import create_lite

        return _bind_name(create_lite, name)
    raise EncoderError(
        f"unknown encoder {name!r}; available: {', '.join(list_encoders())}, "
        "or hf:<hub id or folder>"
    )


def _bind_name(function: Callable[..., Encoder], name: str, **bound: Any) -> EncoderFactory:
    """``function`` with its first argument (the name) and ``bound`` options filled in, and a
    signature that shows only the options left for callers."""

    def build(**options: Any) -> Encoder:
        return function(name, **bound, **options)

    parameters = list(inspect.signature(function).parameters.values())[1:]
    signature = inspect.Signature([p for p in parameters if p.name not in bound])
    build.__signature__ = signature  # type: ignore[attr-defined]
    return build


def accepted_options(name: str) -> frozenset[str] | None:
    """The keyword options encoder ``name``'s factory takes; None when it takes any."""
    parameters = inspect.signature(factory_for(name)).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return None
    return frozenset(
        p.name
        for p in parameters
        if p.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    )


def create_encoder(name: str, **options: Any) -> Encoder:
    """Build encoder ``name`` with ``options``, e.g.
    ``create_encoder("efficientnet-lite0", layer="head")``. An option the family does not
    take is an ``EncoderError``, never silently dropped."""
    factory = factory_for(name)
    accepted = accepted_options(name)
    if accepted is not None:
        unknown = sorted(set(options) - accepted)
        if unknown:
            raise EncoderError(
                f"encoder {name!r} does not take option(s) {', '.join(unknown)}; "
                f"it takes {', '.join(sorted(accepted)) or 'none'}"
            )
    return factory(**options)


def supported_options(name: str, options: dict[str, Any]) -> dict[str, Any]:
    """``options`` less those encoder ``name`` does not take and those left as None: what a
    collection passes when its settings are meant for whichever encoder it runs."""
    accepted = accepted_options(name)
    return {
        key: value
        for key, value in options.items()
        if value is not None and (accepted is None or key in accepted)
    }
