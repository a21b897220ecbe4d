"""Text models that embed queries into an image model's space, paired with that image model
for text search: for example queries in other languages over a CLIP collection.

A text model is named like an image model, ``hf:<hub id>`` or ``hf:<folder>``, and is a
sentence-transformers model in its usual folder layout: ``modules.json`` listing a
``Transformer`` (a transformers text model, with ``sentence_bert_config.json``), a ``Pooling``
(``1_Pooling/config.json``), optional ``Dense`` layers (``2_Dense/config.json`` + weights) and
an optional ``Normalize``. That is how ``sentence-transformers/clip-ViT-B-32-multilingual-v1``
is saved: multilingual DistilBERT, mean pooling and a dense layer into the 512-d space of
``openai/clip-vit-base-patch32``. It runs here with transformers and torch alone (no
sentence-transformers package): the modules are read from their configs and weights.

:func:`with_text_model` pairs one with an image encoder: the pair embeds images as the image
encoder does and texts with the text model, so the collection's one search path serves both.
Vectors of different dimensions are refused (``ModelMismatchError``); equal dimensions cannot
prove the two share a space, so pair a text model only with the image model it was trained for.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lookalike.encoders.base import Encoder, EncoderCapabilities, EncoderIdentity
from lookalike.encoders.hf import (
    PREFIX,
    _quiet_transformers,
    _read_json,
    load_tokenizer,
    resolve_checkpoint,
)
from lookalike.encoders.preprocess import PreprocessConfig
from lookalike.encoders.runtime import resolve_device
from lookalike.errors import EncoderError, ModelMismatchError
from lookalike.images import ImageSource

MODULES_FILE = "modules.json"
# sentence-transformers' pooling modes, in the order it concatenates them.
POOLING_MODES: tuple[str, ...] = (
    "cls_token",
    "max_tokens",
    "mean_tokens",
    "mean_sqrt_len_tokens",
    "weightedmean_tokens",
    "lasttoken",
)
_ACTIVATIONS = {
    "Identity": lambda x: x,
    "Tanh": torch.tanh,
    "ReLU": torch.relu,
    "GELU": torch.nn.functional.gelu,
    "Sigmoid": torch.sigmoid,
}


@dataclasses.dataclass(frozen=True)
class Dense:
    """A sentence-transformers ``Dense`` module: ``activation(x @ weight.T + bias)``."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    activation: str

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.nn.functional.linear(x, self.weight, self.bias)
        out: torch.Tensor = _ACTIVATIONS[self.activation](y)
        return out


def _module_kind(entry: dict[str, Any]) -> str:
    # "sentence_transformers.models.Pooling" -> "Pooling"
    return str(entry.get("type", "")).rsplit(".", 1)[-1]


def read_modules(folder: Path) -> list[dict[str, Any]]:
    """The modules a sentence-transformers folder lists, in order."""
    path = folder / MODULES_FILE
    if not path.is_file():
        raise EncoderError(
            f"{folder} is not a sentence-transformers model (no {MODULES_FILE}); a text model "
            "is one, e.g. hf:sentence-transformers/clip-ViT-B-32-multilingual-v1"
        )
    try:
        modules = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise EncoderError(f"cannot read {path}: {error}") from error
    if not isinstance(modules, list) or not all(isinstance(m, dict) for m in modules):
        raise EncoderError(f"{path} does not hold a list of modules")
    return sorted(modules, key=lambda m: int(m.get("idx", 0)))


def pooling_modes(config: dict[str, Any], where: Path) -> tuple[str, ...]:
    """The pooling modes a ``Pooling`` config turns on (sentence-transformers' order)."""
    modes = tuple(m for m in POOLING_MODES if config.get(f"pooling_mode_{m}"))
    if not modes:
        raise EncoderError(f"{where} turns on no pooling mode")
    return modes


def pool(hidden: torch.Tensor, mask: torch.Tensor, modes: Sequence[str]) -> torch.Tensor:
    """Token embeddings [n, tokens, d] and attention mask [n, tokens] -> [n, d * len(modes)],
    as sentence-transformers' ``Pooling`` computes them (padding never counts)."""
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    counts = weights.sum(dim=1).clamp(min=1e-9)
    parts = []
    for mode in modes:
        if mode == "cls_token":
            parts.append(hidden[:, 0])
        elif mode == "max_tokens":
            parts.append(hidden.masked_fill(weights == 0, -1e9).max(dim=1).values)
        elif mode == "mean_tokens":
            parts.append((hidden * weights).sum(dim=1) / counts)
        elif mode == "mean_sqrt_len_tokens":
            parts.append((hidden * weights).sum(dim=1) / counts.sqrt())
        elif mode == "weightedmean_tokens":
            positions = torch.arange(1, hidden.shape[1] + 1, device=hidden.device)
            position_weights = weights * positions.view(1, -1, 1).to(hidden.dtype)
            total = position_weights.sum(dim=1).clamp(min=1e-9)
            parts.append((hidden * position_weights).sum(dim=1) / total)
        else:  # lasttoken: the last position the mask keeps (left or right padding alike)
            positions = torch.arange(hidden.shape[1], device=hidden.device)
            last = (mask.to(torch.long) * positions).argmax(dim=1)
            parts.append(hidden[torch.arange(hidden.shape[0], device=hidden.device), last])
    return torch.cat(parts, dim=1)


def _load_state(folder: Path) -> dict[str, torch.Tensor]:
    safetensors = folder / "model.safetensors"
    legacy = folder / "pytorch_model.bin"
    try:
        if safetensors.is_file():
            from safetensors.torch import load_file

            return load_file(str(safetensors))
        if legacy.is_file():
            state: dict[str, torch.Tensor] = torch.load(
                legacy, map_location="cpu", weights_only=True
            )
            return state
    except (OSError, RuntimeError, ValueError) as error:
        raise EncoderError(f"cannot read the weights in {folder}: {error}") from error
    raise EncoderError(f"no weights (model.safetensors or pytorch_model.bin) in {folder}")


def load_dense(folder: Path) -> Dense:
    """A ``Dense`` module from its folder (``config.json`` and weights)."""
    config = _read_json(folder / "config.json")
    activation = str(config.get("activation_function", "Identity")).rsplit(".", 1)[-1]
    if activation not in _ACTIVATIONS:
        raise EncoderError(
            f"unsupported activation {config.get('activation_function')!r} in {folder}; "
            f"supported: {', '.join(_ACTIVATIONS)}"
        )
    state = _load_state(folder)
    weight = state.get("linear.weight")
    bias = state.get("linear.bias")
    shape = (int(config.get("out_features", -1)), int(config.get("in_features", -1)))
    if weight is None or tuple(weight.shape) != shape:
        got = None if weight is None else tuple(weight.shape)
        raise EncoderError(f"the weights in {folder} do not fit its config: {got} != {shape}")
    if bool(config.get("bias", True)) != (bias is not None):
        raise EncoderError(f"the weights in {folder} do not match its config's bias setting")
    return Dense(weight.float(), None if bias is None else bias.float(), activation)


class SentenceTextModel:
    """A sentence-transformers text model run with transformers: transformer, pooling, dense
    layers, normalisation. ``name`` is its ``hf:`` name, ``dim`` its output width."""

    def __init__(self, source: str, *, device: str = "auto") -> None:
        folder, name = resolve_checkpoint(source)
        modules = read_modules(folder)
        if not Path(source).expanduser().is_dir():
            # A hub id: fetch the module folders too (their configs and weights).
            paths = [str(m.get("path") or "") for m in modules]
            folder, name = resolve_checkpoint(source, folders=["", *(p for p in paths if p)])
        kinds = [_module_kind(m) for m in modules]
        if not kinds or kinds[0] != "Transformer" or "Pooling" not in kinds:
            raise EncoderError(
                f"{folder / MODULES_FILE} lists {kinds}; a text model needs a Transformer "
                "first, then a Pooling (then optional Dense and Normalize modules)"
            )
        self.folder = folder
        self.name = f"{PREFIX}{name}"
        self.modes: tuple[str, ...] = ()
        self.dense: list[Dense] = []
        self.normalized = False
        for entry, kind in zip(modules[1:], kinds[1:], strict=True):
            where = folder / str(entry.get("path") or "")
            if kind == "Pooling" and not self.modes:
                self.modes = pooling_modes(_read_json(where / "config.json"), where)
            elif kind == "Dense" and self.modes:
                self.dense.append(load_dense(where))
            elif kind == "Normalize" and self.modes:
                self.normalized = True
            else:
                raise EncoderError(
                    f"unsupported module {entry.get('type')!r} in {folder / MODULES_FILE}; "
                    "supported after the Transformer: Pooling, Dense, Normalize"
                )
        self._load_transformer(folder / str(modules[0].get("path") or ""))
        self.dim = self._output_dim()
        self.device = resolve_device(device)
        self.model.to(self.device)
        self.dense = [
            Dense(
                d.weight.to(self.device),
                None if d.bias is None else d.bias.to(self.device),
                d.activation,
            )
            for d in self.dense
        ]

    def _load_transformer(self, where: Path) -> None:
        from transformers import AutoModel

        try:
            with _quiet_transformers():
                model, info = AutoModel.from_pretrained(
                    where, output_loading_info=True, dtype=torch.float32
                )
        except (OSError, ValueError, RuntimeError, KeyError) as error:
            raise EncoderError(f"cannot load the text model in {where}: {error}") from error
        # A BERT pooler is never read by sentence-transformers; anything else missing is.
        missing = [k for k in info.get("missing_keys") or () if not k.startswith("pooler.")]
        if missing or info.get("mismatched_keys"):
            shown = missing or sorted(info.get("mismatched_keys") or ())
            raise EncoderError(f"the weights in {where} do not fit its model: {shown[:5]}")
        if getattr(model, "main_input_name", "input_ids") != "input_ids":
            raise EncoderError(f"the model in {where} is not a text model")
        self.model: Any = model.eval()
        self.tokenizer = load_tokenizer(where, self.name)
        settings_path = where / "sentence_bert_config.json"
        settings = _read_json(settings_path) if settings_path.is_file() else {}
        limit = settings.get("max_seq_length")
        if not isinstance(limit, int):
            # sentence-transformers' own fallback: the shorter of the model's and tokenizer's.
            limits = [
                getattr(model.config, "max_position_embeddings", None),
                getattr(self.tokenizer, "model_max_length", None),
            ]
            limit = min((v for v in limits if isinstance(v, int)), default=512)
        self.max_length = int(limit)
        self.lowercase = bool(settings.get("do_lower_case", False))
        self._inputs = set(inspect.signature(self.model.forward).parameters)

    def _output_dim(self) -> int:
        width = int(self.model.config.hidden_size) * len(self.modes)
        for dense in self.dense:
            if dense.weight.shape[1] != width:
                raise EncoderError(
                    f"a Dense layer of {self.name} takes {dense.weight.shape[1]}-d input, but "
                    f"what comes before it is {width}-d"
                )
            width = int(dense.weight.shape[0])
        return width

    def encode_text(self, texts: Sequence[str], *, batch_size: int = 32) -> np.ndarray:
        """Texts -> float32 [n, dim], as sentence-transformers' ``encode`` computes them
        (L2-normalised only if the model ends in a ``Normalize``)."""
        if isinstance(texts, str):
            texts = [texts]
        if batch_size < 1:
            raise EncoderError(f"batch_size must be at least 1, got {batch_size}")
        parts = [np.empty((0, self.dim), dtype=np.float32)]
        for start in range(0, len(texts), batch_size):
            chunk = [str(t).strip() for t in texts[start : start + batch_size]]
            if self.lowercase:
                chunk = [t.lower() for t in chunk]
            tokens = self.tokenizer(
                chunk,
                padding=True,
                truncation="longest_first",
                max_length=self.max_length,
                return_tensors="pt",
            )
            inputs = {k: v.to(self.device) for k, v in tokens.items() if k in self._inputs}
            with torch.inference_mode():
                hidden = self.model(**inputs).last_hidden_state
                vectors = pool(hidden, inputs["attention_mask"], self.modes)
                for dense in self.dense:
                    vectors = dense(vectors)
                if self.normalized:
                    vectors = torch.nn.functional.normalize(vectors, dim=1)
            parts.append(vectors.float().cpu().numpy())
        return np.concatenate(parts)


def create_text_model(name: str, *, device: str = "auto") -> SentenceTextModel:
    """The text model ``name`` (``hf:<hub id or folder>`` of a sentence-transformers model)."""
    if not name.startswith(PREFIX):
        raise EncoderError(
            f"unknown text model {name!r}; name a sentence-transformers model as "
            "hf:<hub id or folder>, e.g. hf:sentence-transformers/clip-ViT-B-32-multilingual-v1"
        )
    return SentenceTextModel(name.removeprefix(PREFIX), device=device)


def check_pairing(image: Encoder, text: SentenceTextModel) -> None:
    """``ModelMismatchError`` unless ``text`` gives vectors of ``image``'s dimension."""
    if text.dim != image.dim:
        raise ModelMismatchError(
            f"the text model {text.name} gives {text.dim}-d vectors but the collection's "
            f"model {image.identity.model} (layer {image.identity.layer}) gives "
            f"{image.dim}-d ones: they are not one space; pair a text model trained for "
            "this image model, e.g. hf:sentence-transformers/clip-ViT-B-32-multilingual-v1 "
            "with hf:openai/clip-vit-base-patch32"
        )


class TextPairedEncoder:
    """An image encoder whose text queries a separate text model embeds: images exactly as
    ``image`` embeds them (same identity, so stored vectors stay valid), texts by ``text``.

    ``text`` may be a function that builds the text model: it is then built (and checked
    against the image model) at the first text query, so image queries never wait for it.
    """

    def __init__(
        self, image: Encoder, text: SentenceTextModel | Callable[[], SentenceTextModel]
    ) -> None:
        self.image = image
        self.identity: EncoderIdentity = image.identity
        self.normalize: bool = image.normalize
        self._lock = threading.Lock()
        if isinstance(text, SentenceTextModel):
            check_pairing(image, text)
            self._text: SentenceTextModel | None = text
            self._build: Callable[[], SentenceTextModel] | None = None
        else:
            self._text, self._build = None, text

    @property
    def text_model(self) -> SentenceTextModel:
        """The text model, built and checked on first use."""
        with self._lock:
            if self._text is None:
                assert self._build is not None
                text = self._build()
                check_pairing(self.image, text)
                self._text = text
            return self._text

    @property
    def capabilities(self) -> EncoderCapabilities:
        """The image encoder's, with text."""
        return dataclasses.replace(self.image.capabilities, text=True)

    @property
    def dim(self) -> int:
        return self.image.dim

    @property
    def preprocess(self) -> PreprocessConfig:
        return self.image.preprocess

    def embed_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """As the image encoder does."""
        return self.image.embed_pixels(pixels)

    def embed(self, images: Sequence[ImageSource], *, batch_size: int = 32) -> np.ndarray:
        """As the image encoder does."""
        return self.image.embed(images, batch_size=batch_size)

    def encode_text(self, texts: Sequence[str]) -> np.ndarray:
        """Texts -> float32 [n, dim] by the text model (L2-normalised when ``normalize``)."""
        vectors = self.text_model.encode_text(texts)
        if self.normalize:
            vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        return vectors

    def patch_tokens(self, images: Sequence[ImageSource]) -> np.ndarray:
        """As the image encoder does."""
        return self.image.patch_tokens(images)

    def patch_tokens_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """As the image encoder does."""
        return self.image.patch_tokens_pixels(pixels)


def with_text_model(
    image: Encoder, text: SentenceTextModel | Callable[[], SentenceTextModel]
) -> Encoder:
    """``image`` with its text queries embedded by ``text`` (a built text model is checked now,
    a function building one at the first text query: ``ModelMismatchError`` when their
    dimensions differ). An image encoder that embeds text itself (CLIP) is overridden."""
    return TextPairedEncoder(image, text)
