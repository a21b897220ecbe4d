"""Hugging Face image models as encoders, through ``transformers``.

A model is named ``hf:<hub id>`` (``hf:facebook/dinov2-small``) or ``hf:<folder>`` (a folder
written by ``save_pretrained`` or ``hf download --local-dir``). The family comes from the
checkpoint's ``config.json`` (``model_type``), the preprocessing from its
``preprocessor_config.json`` (or the family's documented defaults when it has none), so vectors
are made exactly as the model was trained to see images.

CLIP, SigLIP, DINOv2, BEiT and ViT have their own poolings (and patch tokens for local
matching); CLIP and SigLIP also embed text into the same space as their images
(``encode_text``), which is what text search uses. Any other image backbone that
``transformers.AutoModel`` builds (ResNet, ConvNeXt, Swin, EfficientNet, MobileNet, RegNet, ...)
goes through one generic path: its own pooled output (``pooler_output``), or the average of its
last feature map.

``transformers`` is imported only when a model is built, so ``import lookalike`` stays light.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from lookalike.encoders.base import EncoderBase, EncoderCapabilities, EncoderIdentity
from lookalike.encoders.preprocess import PreprocessConfig, resize_for_model
from lookalike.encoders.runtime import TorchRunner, file_sha256, resolve_device
from lookalike.errors import EncoderError
from lookalike.images import ImageSource, load_image

PREFIX = "hf:"
# Families with their own poolings; any other image model_type goes through the generic path.
FAMILIES = ("beit", "clip", "dinov2", "siglip", "vit")
GENERIC = "backbone"

# Hub files an encoder needs: configs, tokenizer files (sentencepiece ones end in .model) and
# safetensors weights, top level only (repos often carry ONNX or other framework exports in
# sub-folders that would waste downloads).
_HUB_PATTERNS = ["*.json", "*.txt", "*.model", "*.safetensors"]
_HUB_LEGACY_WEIGHTS = ["pytorch_model*.bin"]
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "vocab.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
    "tokenizer.model",
)

_OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
_HALF = (0.5, 0.5, 0.5)

# Class defaults of the transformers image processors these checkpoints declare; a
# preprocessor_config.json only lists what differs from them. "square" is the processor's
# default_to_square: how a bare integer "size" is read (square side, or shortest edge).
_PROCESSOR_DEFAULTS: dict[str, dict[str, Any]] = {
    "CLIPImageProcessor": {
        "size": {"shortest_edge": 224},
        "crop_size": {"height": 224, "width": 224},
        "do_center_crop": True,
        "resample": 3,
        "image_mean": _OPENAI_CLIP_MEAN,
        "image_std": _OPENAI_CLIP_STD,
        "square": False,
    },
    "BitImageProcessor": {
        "size": {"shortest_edge": 224},
        "crop_size": {"height": 224, "width": 224},
        "do_center_crop": True,
        "resample": 3,
        "image_mean": _OPENAI_CLIP_MEAN,
        "image_std": _OPENAI_CLIP_STD,
        "square": False,
    },
    "ViTImageProcessor": {
        "size": {"height": 224, "width": 224},
        "do_center_crop": False,
        "resample": 2,
        "image_mean": _HALF,
        "image_std": _HALF,
        "square": True,
    },
    "BeitImageProcessor": {
        "size": {"height": 224, "width": 224},
        "crop_size": {"height": 224, "width": 224},
        "do_center_crop": False,
        "resample": 3,
        "image_mean": _HALF,
        "image_std": _HALF,
        "square": True,
    },
    "SiglipImageProcessor": {
        "size": {"height": 224, "width": 224},
        "do_center_crop": False,
        "resample": 3,
        "image_mean": _HALF,
        "image_std": _HALF,
        "square": False,
    },
    # ResNet (microsoft/resnet-*), ConvNeXt, RegNet: below 384 px it resizes the shortest edge
    # to size / crop_pct and crops the centre; from 384 px it squashes to size x size.
    "ConvNextImageProcessor": {
        "size": {"shortest_edge": 384},
        "crop_pct": 224 / 256,
        "do_center_crop": False,
        "resample": 3,
        "image_mean": _HALF,
        "image_std": _HALF,
        "square": False,
    },
    # include_top divides by std a second time (how the Keras EfficientNets were trained);
    # rescale_offset maps pixels to [-1, 1] before the mean is taken.
    "EfficientNetImageProcessor": {
        "size": {"height": 346, "width": 346},
        "crop_size": {"height": 289, "width": 289},
        "do_center_crop": False,
        "resample": 3,
        "image_mean": _HALF,
        "image_std": _HALF,
        "include_top": True,
        "rescale_offset": False,
        "square": True,
    },
    "MobileNetV2ImageProcessor": {
        "size": {"shortest_edge": 256},
        "crop_size": {"height": 224, "width": 224},
        "do_center_crop": True,
        "resample": 2,
        "image_mean": _HALF,
        "image_std": _HALF,
        "square": False,
    },
}
_PROCESSOR_DEFAULTS["MobileNetV1ImageProcessor"] = _PROCESSOR_DEFAULTS["MobileNetV2ImageProcessor"]
# What an image processor this module does not know is read as: its listed settings over
# these (the base processor's squash to 224 and ImageNet statistics); flagged inexact.
_UNKNOWN_PROCESSOR: dict[str, Any] = {
    "size": {"height": 224, "width": 224},
    "do_center_crop": False,
    "resample": 2,
    "image_mean": _IMAGENET_MEAN,
    "image_std": _IMAGENET_STD,
    "square": True,
}
_FAMILY_PROCESSOR = {
    "clip": "CLIPImageProcessor",
    "dinov2": "BitImageProcessor",
    "vit": "ViTImageProcessor",
    "beit": "BeitImageProcessor",
    "siglip": "SiglipImageProcessor",
}
# PIL resampling codes; the pipeline offers bilinear and bicubic, so the rare others map to the
# closer of the two (Lanczos is sharper, like bicubic; nearest, box and hamming are softer).
_RESAMPLE = {0: "bilinear", 1: "bicubic", 2: "bilinear", 3: "bicubic", 4: "bilinear", 5: "bilinear"}
_RESAMPLE_NAMES = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3, "box": 4, "hamming": 5}


# -- locating a checkpoint ------------------------------------------------------------------


def _offline() -> bool:
    """True when HF_HUB_OFFLINE (or the older TRANSFORMERS_OFFLINE) asks for no network.

    Read on each call: huggingface_hub reads it once at import, which would ignore a variable
    set later in the same process.
    """
    flags = (os.environ.get("HF_HUB_OFFLINE", ""), os.environ.get("TRANSFORMERS_OFFLINE", ""))
    return any(flag.strip().upper() in {"1", "ON", "YES", "TRUE"} for flag in flags)


def _looks_like_path(source: str) -> bool:
    return (
        source.startswith(("/", "./", "../", "~", "\\"))
        or source in {".", ".."}
        or "\\" in source
        or source.count("/") > 1
        or bool(re.match(r"^[A-Za-z]:", source))
    )


def resolve_checkpoint(source: str, *, folders: Sequence[str] = ("",)) -> tuple[Path, str]:
    """A local folder holding the checkpoint ``source`` names, and the name for its identity.

    ``source`` is a folder, or a hub id that is fetched into (or, offline, found in) the
    Hugging Face cache. ``folders`` are the repository's folders to fetch ("" is the top
    level): a sentence-transformers model keeps its pooling and dense layers in sub-folders.
    """
    if not source:
        raise EncoderError("empty Hugging Face model name; use hf:<hub id> or hf:<folder>")
    folder = Path(source).expanduser()
    if folder.is_dir():
        return folder, folder.resolve().name
    if _looks_like_path(source) or folder.exists():
        raise EncoderError(f"no model folder at {folder}")
    return _download(source, folders), source


def _download(repo_id: str, folders: Sequence[str] = ("",)) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    folders = tuple(folders) or ("",)
    folder = Path()
    offline = _offline()
    advice = (
        f"download it once where there is internet (hf download {repo_id}, or "
        f"hf download {repo_id} --local-dir FOLDER and use hf:FOLDER), or pass a local folder"
    )
    try:
        with _quiet_transformers():
            for sub in folders:
                prefix = f"{sub.strip('/')}/" if sub.strip("/") else ""
                folder = Path(
                    snapshot_download(
                        repo_id,
                        allow_patterns=[prefix + pattern for pattern in _HUB_PATTERNS],
                        ignore_patterns=[f"{prefix}*/*"],
                        local_files_only=offline,
                    )
                )
                if not _weight_files(folder / prefix):
                    folder = Path(
                        snapshot_download(
                            repo_id,
                            allow_patterns=[prefix + p for p in _HUB_LEGACY_WEIGHTS],
                            local_files_only=offline,
                        )
                    )
    except HFValidationError as error:
        raise EncoderError(
            f"{repo_id!r} is neither a model folder nor a valid Hugging Face hub id: {error}"
        ) from None
    except RepositoryNotFoundError:
        raise EncoderError(
            f"no model {repo_id!r} on the Hugging Face Hub (or it is private or gated), and no "
            "such local folder"
        ) from None
    except LocalEntryNotFoundError:
        why = (
            "HF_HUB_OFFLINE is set"
            if offline
            else "the Hugging Face Hub cannot be reached (no internet?)"
        )
        raise EncoderError(
            f"model {repo_id!r} is not in the local Hugging Face cache and {why}; {advice}"
        ) from None
    except OSError as error:  # network and disk errors from the download itself
        raise EncoderError(f"could not fetch model {repo_id!r}: {error}; {advice}") from None
    return folder


def _weight_files(folder: Path) -> list[Path]:
    """The weight files transformers loads from ``folder``: safetensors when present."""
    files = sorted(folder.glob("*.safetensors"))
    return files or sorted(folder.glob("pytorch_model*.bin"))


def weights_sha256(folder: Path) -> str:
    """sha256 of the checkpoint's weights: the file's own digest for a single file (the one the
    Hub shows), else a digest of the shards' names and digests."""
    files = _weight_files(folder)
    if not files:
        raise EncoderError(f"no weights (*.safetensors or pytorch_model*.bin) in {folder}")
    digests = [(path.name, _cached_digest(path)) for path in files]
    if len(digests) == 1:
        return digests[0][1]
    combined = hashlib.sha256()
    for name, digest in digests:
        combined.update(f"{name} {digest}\n".encode())
    return combined.hexdigest()


def _cached_digest(path: Path) -> str:
    # Files in the Hugging Face cache link to blobs named by their sha256, which spares
    # reading gigabytes on every start.
    target = path.resolve()
    if path.is_symlink() and re.fullmatch(r"[0-9a-f]{64}", target.name):
        return target.name
    return file_sha256(target)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, ValueError) as error:
        raise EncoderError(f"cannot read {path}: {error}") from error
    if not isinstance(data, dict):
        raise EncoderError(f"{path} does not hold a JSON object")
    return data


def model_type(folder: Path) -> str:
    """The checkpoint's ``model_type``, from its ``config.json``."""
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise EncoderError(f"{folder} has no config.json: not a transformers checkpoint")
    kind = _read_json(config_path).get("model_type")
    if not isinstance(kind, str) or not kind:
        raise EncoderError(f"{config_path} names no model_type: not a transformers checkpoint")
    return kind


def family_of(kind: str) -> str:
    """The family whose poolings a ``model_type`` gets: its own, or the generic backbone's."""
    return kind if kind in FAMILIES else GENERIC


# -- preprocessing --------------------------------------------------------------------------


def processor_config(folder: Path) -> dict[str, Any] | None:
    """The image processor settings saved with the checkpoint, if any."""
    path = folder / "preprocessor_config.json"
    if path.is_file():
        return _read_json(path)
    # Newer transformers may save one processor_config.json with the image part nested.
    path = folder / "processor_config.json"
    if path.is_file():
        nested = _read_json(path).get("image_processor")
        if isinstance(nested, dict):
            return nested
    return None


def default_processor(kind: str, config: Any) -> dict[str, Any]:
    """Documented preprocessing of each family, for folders saved without a processor config
    (a generic backbone gets a squash to its input size with ImageNet statistics, the most
    common choice, which ``preprocess_from_processor`` flags inexact)."""
    if kind == "dinov2":
        # What every facebook/dinov2-* checkpoint ships: the DINOv2 evaluation transform.
        return {
            "image_processor_type": "BitImageProcessor",
            "size": {"shortest_edge": 256},
            "crop_size": {"height": 224, "width": 224},
            "image_mean": _IMAGENET_MEAN,
            "image_std": _IMAGENET_STD,
        }
    if kind not in _FAMILY_PROCESSOR:
        side = getattr(config, "image_size", None)
        side = side if isinstance(side, int) else 224
        return {"image_processor_type": None, "size": {"height": side, "width": side}}
    vision = config.vision_config if kind in ("clip", "siglip") else config
    side = int(vision.image_size)
    processor: dict[str, Any] = {
        "image_processor_type": _FAMILY_PROCESSOR[kind],
        "size": {"shortest_edge": side} if kind == "clip" else {"height": side, "width": side},
    }
    if kind == "clip":
        processor["crop_size"] = {"height": side, "width": side}
    return processor


def _side(value: Any, *, square: bool, what: str) -> tuple[str, int]:
    """("square" | "shortest", pixels) of an image processor ``size`` / ``crop_size``."""
    if isinstance(value, int):
        return ("square" if square else "shortest", value)
    if isinstance(value, dict):
        if "shortest_edge" in value and "longest_edge" not in value:
            return ("shortest", int(value["shortest_edge"]))
        if "height" in value and "width" in value:
            if int(value["height"]) != int(value["width"]):
                raise EncoderError(f"non-square {what} {value} is not supported")
            return ("square", int(value["height"]))
    raise EncoderError(f"unsupported image processor {what}: {value!r}")


def _resample_code(resample: Any) -> int:
    if isinstance(resample, str):
        return _RESAMPLE_NAMES.get(resample.lower(), 3)
    return int(resample)


def _interpolation(resample: Any) -> str:
    return _RESAMPLE.get(_resample_code(resample), "bicubic")


def preprocess_from_processor(
    processor: dict[str, Any], family: str
) -> tuple[PreprocessConfig, bool]:
    """Translate image processor settings into a ``PreprocessConfig``.

    Returns the config and whether it is exact. It is inexact where a processor squashes to a
    square and then crops (the pipeline keeps the aspect ratio when it crops), resizes the
    shortest edge without cropping (the model would see a non-square image), does not resize,
    resamples other than bilinearly or bicubically, flips channels, or is of a type this module
    does not know.
    """
    declared = str(processor.get("image_processor_type") or processor.get("feature_extractor_type"))
    declared = declared.removesuffix("Fast").removesuffix("Pil")
    declared = declared.replace("FeatureExtractor", "ImageProcessor")
    known = declared in _PROCESSOR_DEFAULTS
    fallback = (
        _PROCESSOR_DEFAULTS[_FAMILY_PROCESSOR[family]]
        if family in _FAMILY_PROCESSOR
        else _UNKNOWN_PROCESSOR
    )
    defaults = _PROCESSOR_DEFAULTS.get(declared, fallback)
    settings = {**defaults, **{k: v for k, v in processor.items() if v is not None}}
    square = bool(settings["square"])
    exact = (known or family in _FAMILY_PROCESSOR) and not settings.get("do_flip_channel_order")

    # The network sees ((x * rescale - offset) - mean) / std / std2 for uint8 x (offset 1 with
    # EfficientNet's rescale_offset, std2 = std with its include_top, else 0 and 1); the
    # pipeline applies (x / 255 - mean') / std' instead, so fold the rest into mean' and std'.
    rescaling = bool(settings.get("do_rescale", True))
    rescale = float(settings.get("rescale_factor", 1 / 255)) if rescaling else 1.0
    scale = 255.0 * rescale
    if abs(scale - 1.0) < 1e-6:
        scale = 1.0
    image_std = [float(s) for s in settings["image_std"]]
    if settings.get("do_normalize", True):
        mean = [float(m) for m in settings["image_mean"]]
        std = list(image_std)
    else:
        mean, std = [0.0] * 3, [1.0] * 3
    if len(mean) == 1:
        mean, std = mean * 3, std * 3
    if settings.get("include_top") and declared == "EfficientNetImageProcessor":
        again = image_std * 3 if len(image_std) == 1 else image_std
        std = [s * t for s, t in zip(std, again, strict=True)]
    offset = 1.0 if rescaling and settings.get("rescale_offset") else 0.0
    mean3 = tuple((m + offset) / scale for m in mean)
    std3 = tuple(s / scale for s in std)

    crop = None
    if settings.get("do_center_crop") and settings.get("crop_size") is not None:
        _, crop = _side(settings["crop_size"], square=True, what="crop_size")
    resize = settings.get("do_resize", True)
    size_kind, size = _side(settings["size"], square=square, what="size")
    if declared == "ConvNextImageProcessor" and resize and size_kind == "shortest":
        # Its own resize: below 384 px, shortest edge to int(size / crop_pct), then crop size.
        if size < 384:
            size_kind, crop, size = "shortest", size, int(size / float(settings["crop_pct"]))
        else:
            size_kind = "square"
    if _resample_code(settings.get("resample", 3)) not in (2, 3):
        exact = False
    if not resize:
        # Without a resize the model would see the raw image; squash to its input size instead.
        resolution, mode, fraction = crop or size, "squash", 1.0
        exact = False
    elif size_kind == "shortest":
        resolution = crop or size
        mode, fraction = "center_crop", resolution / size
        exact = exact and crop is not None
    elif crop is None or crop == size:
        resolution, mode, fraction = size, "squash", 1.0
    else:
        resolution, mode, fraction = crop, "center_crop", crop / size
        exact = False
    if fraction > 1.0:
        raise EncoderError(f"crop {resolution} is larger than the resized image ({size})")
    extra: dict[str, Any] = {"resize": mode}
    if mode == "center_crop":
        extra["crop_fraction"] = fraction
    config = PreprocessConfig(
        resolution=int(resolution),
        mean=mean3,  # type: ignore[arg-type]
        std=std3,  # type: ignore[arg-type]
        interpolation=_interpolation(settings.get("resample", 3)),  # type: ignore[arg-type]
        **extra,
    )
    return config, exact


# -- the networks ---------------------------------------------------------------------------


class HFFeatures(nn.Module):
    """uint8 NHWC pixels in, pooled vectors (or patch tokens) out; normalises inside.

    ``has_patch_tokens``: ``tokens`` gives per-patch tokens for local matching. ``text_tower``:
    the model embeds text (``text_inputs`` and ``text``) into the space of its ``embeds``
    layer."""

    layers: ClassVar[tuple[str, ...]] = ()
    has_patch_tokens: ClassVar[bool] = True
    text_tower: ClassVar[bool] = False
    mean: torch.Tensor  # buffers, registered in __init__
    inv_std: torch.Tensor

    def __init__(
        self, model: nn.Module, preprocess: PreprocessConfig, *, layer: str | None, pooler: bool
    ) -> None:
        super().__init__()
        # A transformers model of the family (CLIPModel, Dinov2Model, ...): its config and
        # sub-modules are family-specific attributes that only exist at runtime.
        self.model: Any = model
        self.trained_pooler = pooler
        image_size = getattr(self._vision_config(), "image_size", preprocess.resolution)
        # Positional embeddings are learnt at one size; other sizes need interpolating them.
        self.interpolate = int(image_size) != preprocess.resolution
        self.register_buffer("mean", (255.0 * torch.tensor(preprocess.mean)).view(1, 3, 1, 1))
        self.register_buffer(
            "inv_std", (1.0 / (255.0 * torch.tensor(preprocess.std))).view(1, 3, 1, 1)
        )
        self._inspect(preprocess)
        self.layer = self._resolve_layer(layer)

    def _inspect(self, preprocess: PreprocessConfig) -> None:
        """Learn what the model gives before its layer is chosen (the generic path runs it)."""

    def available_layers(self) -> tuple[str, ...]:
        return self.layers

    def default_layer(self) -> str:
        return self.layers[0]

    def _resolve_layer(self, layer: str | None) -> str:
        # "head" is the collection's default layer name: here it means the family's default.
        if layer in (None, "head", "default"):
            return self.default_layer()
        if layer not in self.available_layers():
            raise EncoderError(
                f"unknown layer {layer!r} for {self.model.config.model_type}; "
                f"choose one of {', '.join(self.available_layers())}"
            )
        return layer

    def _vision_config(self) -> Any:
        return self.model.config

    def pixel_values(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 [n, h, w, 3] -> the float [n, 3, h, w] tensor the transformer expects."""
        x = pixels.permute(0, 3, 1, 2).float()
        return (x - self.mean) * self.inv_std

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.pool(self.pixel_values(pixels))

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        """Patch tokens [n, patches, hidden] of the last layer (class token left out)."""
        raise NotImplementedError

    def output_dim(self) -> int:
        raise NotImplementedError

    def token_dim(self) -> int:
        return int(self._vision_config().hidden_size)

    def _run(self, x: torch.Tensor) -> Any:
        if self.interpolate:
            return self.model(pixel_values=x, interpolate_pos_encoding=True)
        return self.model(pixel_values=x)

    def text_inputs(self, tokenizer: Any, texts: list[str]) -> dict[str, torch.Tensor]:
        """Token tensors for ``text``, made as the model was trained (families with a text
        tower only)."""
        raise NotImplementedError

    def text(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Text embeddings in the image embedding space (families with a text tower only)."""
        raise NotImplementedError


class ClipFeatures(HFFeatures):
    """CLIP: ``embeds`` is the image embedding in the space shared with text
    (``get_image_features``); ``cls`` is the vision tower's normed class token before projection."""

    layers = ("embeds", "cls")
    text_tower = True

    def _vision_config(self) -> Any:
        return self.model.config.vision_config

    def _vision(self, x: torch.Tensor) -> Any:
        return self.model.vision_model(pixel_values=x, interpolate_pos_encoding=self.interpolate)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        cls: torch.Tensor = self._vision(x).pooler_output
        if self.layer == "embeds":
            embeds: torch.Tensor = self.model.visual_projection(cls)
            return embeds
        return cls

    def tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        # Normed like the class token, so patch and image vectors share one scale.
        hidden = self._vision(self.pixel_values(pixels)).last_hidden_state
        normed: torch.Tensor = self.model.vision_model.post_layernorm(hidden[:, 1:])
        return normed

    def output_dim(self) -> int:
        if self.layer == "embeds":
            return int(self.model.config.projection_dim)
        return self.token_dim()

    def text_inputs(self, tokenizer: Any, texts: list[str]) -> dict[str, torch.Tensor]:
        """Padded to the longest text, with its attention mask."""
        limit = int(self.model.config.text_config.max_position_embeddings)
        tokens = tokenizer(
            texts, padding=True, truncation=True, max_length=limit, return_tensors="pt"
        )
        return {"input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"]}

    def text(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Text embeddings in the image embedding space (``get_text_features``)."""
        out = self.model.text_model(**inputs)
        embeds: torch.Tensor = self.model.text_projection(out.pooler_output)
        return embeds


class SiglipFeatures(HFFeatures):
    """SigLIP (and the fixed-resolution SigLIP 2 checkpoints, which share its architecture):
    ``embeds`` is the attention-pooled image embedding in the space shared with text
    (``get_image_features``); ``mean`` averages the normed patch tokens."""

    text_tower = True

    def _vision_config(self) -> Any:
        return self.model.config.vision_config

    def available_layers(self) -> tuple[str, ...]:
        has_head = bool(getattr(self._vision_config(), "vision_use_head", True))
        return ("embeds", "mean") if has_head else ("mean",)

    def default_layer(self) -> str:
        return self.available_layers()[0]

    def _vision(self, x: torch.Tensor) -> Any:
        return self.model.vision_model(pixel_values=x, interpolate_pos_encoding=self.interpolate)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        out = self._vision(x)
        if self.layer == "embeds":
            pooled: torch.Tensor = out.pooler_output
            return pooled
        hidden: torch.Tensor = out.last_hidden_state
        return hidden.mean(dim=1)

    def tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        # SigLIP has no class token: every output token is a patch's, normed already.
        hidden: torch.Tensor = self._vision(self.pixel_values(pixels)).last_hidden_state
        return hidden

    def output_dim(self) -> int:
        return self.token_dim()

    def text_inputs(self, tokenizer: Any, texts: list[str]) -> dict[str, torch.Tensor]:
        """Padded to the full length and without an attention mask, as SigLIP was trained: its
        text embedding is read at the last position, which padding must reach."""
        limit = int(self.model.config.text_config.max_position_embeddings)
        tokens = tokenizer(
            texts, padding="max_length", truncation=True, max_length=limit, return_tensors="pt"
        )
        return {"input_ids": tokens["input_ids"]}

    def text(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Text embeddings in the image embedding space (``get_text_features``)."""
        embeds: torch.Tensor = self.model.text_model(**inputs).pooler_output
        return embeds


class Dinov2Features(HFFeatures):
    """DINOv2: ``cls`` (default) is the normed class token, the feature DINOv2 retrieval uses;
    ``mean`` averages the patch tokens; ``cls+mean`` concatenates both, as DINOv2's linear
    classifier does (twice the dimension)."""

    layers = ("cls", "mean", "cls+mean")

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        hidden: torch.Tensor = self.model(pixel_values=x).last_hidden_state
        cls, mean = hidden[:, 0], hidden[:, 1:].mean(dim=1)
        if self.layer == "cls":
            return cls
        if self.layer == "mean":
            return mean
        return torch.cat([cls, mean], dim=1)

    def tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        hidden: torch.Tensor = self.model(pixel_values=self.pixel_values(pixels)).last_hidden_state
        return hidden[:, 1:]

    def output_dim(self) -> int:
        return self.token_dim() * (2 if self.layer == "cls+mean" else 1)


class VitFeatures(HFFeatures):
    """ViT: ``pooler`` is the checkpoint's trained pre-logits layer (dense + tanh; the default
    when the checkpoint has one, as the in21k ones do); ``cls`` is the normed class token (the
    default otherwise); ``mean`` averages the normed patch tokens."""

    def available_layers(self) -> tuple[str, ...]:
        return ("pooler", "cls", "mean") if self.trained_pooler else ("cls", "mean")

    def default_layer(self) -> str:
        return self.available_layers()[0]

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        out = self._run(x)
        if self.layer == "pooler":
            pooled: torch.Tensor = out.pooler_output
            return pooled
        hidden: torch.Tensor = out.last_hidden_state
        return hidden[:, 0] if self.layer == "cls" else hidden[:, 1:].mean(dim=1)

    def tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        hidden: torch.Tensor = self._run(self.pixel_values(pixels)).last_hidden_state
        return hidden[:, 1:]

    def output_dim(self) -> int:
        if self.layer == "pooler":
            return int(self.model.pooler.dense.out_features)
        return self.token_dim()


class BeitFeatures(HFFeatures):
    """BEiT: ``mean`` (default) is its pooler, the layer-normed mean of the patch tokens that its
    classifiers are trained on; ``cls`` is the class token."""

    layers = ("mean", "cls")

    def _mean_pooler(self) -> bool:
        return bool(self.model.config.use_mean_pooling) and self.trained_pooler

    def default_layer(self) -> str:
        return "mean" if self.model.config.use_mean_pooling else "cls"

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        out = self._run(x)
        hidden: torch.Tensor
        if self.layer == "mean":
            if self._mean_pooler():
                pooled: torch.Tensor = out.pooler_output
                return pooled
            hidden = out.last_hidden_state
            return hidden[:, 1:].mean(dim=1)
        hidden = out.last_hidden_state
        return hidden[:, 0]

    def tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        patches: torch.Tensor = self._run(self.pixel_values(pixels)).last_hidden_state[:, 1:]
        # With mean pooling BEiT's last norm sits after the average; apply it per token so
        # patch tokens are normed like the pooled vector.
        if self._mean_pooler():
            normed: torch.Tensor = self.model.pooler.layernorm(patches)
            return normed
        return patches

    def output_dim(self) -> int:
        return self.token_dim()


class BackboneFeatures(HFFeatures):
    """Any other transformers image backbone (ResNet, ConvNeXt, Swin, EfficientNet, MobileNet,
    RegNet, ...), by one rule: ``pooler`` (the default) is the model's own pooled output
    (``pooler_output``: the global average pool its classifier reads, layer-normed in ConvNeXt
    and Swin); ``mean`` averages its last feature map (or last tokens), for models without a
    pooled output or whose pooler the checkpoint did not train. No patch tokens (a CNN's last
    map is too coarse for local matching; re-ranking uses SIFT)."""

    has_patch_tokens = False

    def _inspect(self, preprocess: PreprocessConfig) -> None:
        forward = inspect.signature(self.model.forward).parameters
        self.interpolate = self.interpolate and "interpolate_pos_encoding" in forward
        side = preprocess.resolution
        try:
            with torch.inference_mode():
                out = self._run(self.pixel_values(torch.zeros(1, side, side, 3)))
        except (RuntimeError, ValueError, TypeError) as error:
            raise EncoderError(
                f"the {self.model.config.model_type} model cannot run on {side} x {side} images: "
                f"{error}"
            ) from error
        pooled = getattr(out, "pooler_output", None)
        hidden = getattr(out, "last_hidden_state", None)
        self.dims: dict[str, int] = {}
        # A pooler output is one vector per image ([n, c] or ResNet's [n, c, 1, 1]); a pooler
        # with weights the checkpoint lacks would be random, so it is left out.
        if (
            isinstance(pooled, torch.Tensor)
            and pooled.dim() >= 2
            and pooled[0, 0].numel() == 1
            and self.trained_pooler
        ):
            self.dims["pooler"] = int(pooled.shape[1])
        # Feature maps are [n, c, h, w], except in the few models (NAT, DiNAT) that keep
        # channels last, told apart by the pooled output's width where there is one.
        self.mean_dims: tuple[int, ...] = (1,)
        if isinstance(hidden, torch.Tensor) and hidden.dim() == 4:
            width = self.dims.get("pooler")
            last = width is not None and hidden.shape[1] != width and hidden.shape[3] == width
            self.mean_dims = (1, 2) if last else (2, 3)
            self.dims["mean"] = int(hidden.shape[3] if last else hidden.shape[1])
        elif isinstance(hidden, torch.Tensor) and hidden.dim() == 3:
            self.dims["mean"] = int(hidden.shape[2])
        if not self.dims:
            raise EncoderError(
                f"the {self.model.config.model_type} model gives neither a pooled output nor a "
                "feature map to pool"
            )

    def available_layers(self) -> tuple[str, ...]:
        return tuple(self.dims)

    def default_layer(self) -> str:
        return self.available_layers()[0]

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        out = self._run(x)
        if self.layer == "pooler":
            pooled: torch.Tensor = out.pooler_output
            return pooled.flatten(1)
        hidden: torch.Tensor = out.last_hidden_state
        # Feature maps average over space, [n, tokens, c] over tokens.
        return hidden.mean(dim=self.mean_dims)

    def output_dim(self) -> int:
        return self.dims[self.layer]

    def token_dim(self) -> int:
        raise EncoderError(f"the {self.model.config.model_type} model has no patch tokens")


_FEATURES: dict[str, type[HFFeatures]] = {
    "clip": ClipFeatures,
    "dinov2": Dinov2Features,
    "vit": VitFeatures,
    "beit": BeitFeatures,
    "siglip": SiglipFeatures,
    GENERIC: BackboneFeatures,
}
_MODEL_CLASSES = {
    "clip": "CLIPModel",
    "dinov2": "Dinov2Model",
    "vit": "ViTModel",
    "beit": "BeitModel",
    "siglip": "SiglipModel",
}
# Parameters a checkpoint may lack without harm: the contrastive losses' temperature and bias.
_UNUSED_KEYS = frozenset({"logit_scale", "logit_bias"})
_IMAGE_MODELS = "CLIP, SigLIP, DINOv2, BEiT, ViT, or an image backbone such as ResNet, ConvNeXt, "
_IMAGE_MODELS += "Swin, EfficientNet or MobileNet"


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """No progress bars or loading reports on stderr: the library never prints.

    Problems the reports would mention (missing weights) are checked and raised instead.
    """
    from huggingface_hub.utils.tqdm import (
        are_progress_bars_disabled,
        disable_progress_bars,
        enable_progress_bars,
    )
    from transformers.utils import logging as hf_logging

    hub_bars = not are_progress_bars_disabled()
    bars = hf_logging.is_progress_bar_enabled()
    verbosity = hf_logging.get_verbosity()
    # transformers leaves these two unannotated.
    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    hf_logging.set_verbosity_error()  # type: ignore[no-untyped-call]
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()  # type: ignore[no-untyped-call]
        if hub_bars:
            enable_progress_bars()
        else:
            disable_progress_bars()


def model_class(folder: Path, kind: str) -> Any:
    """The transformers class that builds a ``kind`` model: the family's, else the one
    ``AutoModel`` maps it to, which must take images (``pixel_values``)."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES

    name = _MODEL_CLASSES.get(kind) or MODEL_MAPPING_NAMES.get(kind)
    if isinstance(name, (tuple, list)):
        name = name[0]
    found = getattr(transformers, name, None) if isinstance(name, str) else None
    if found is None:
        raise EncoderError(
            f"unsupported model type {kind!r} in {folder / 'config.json'}: transformers "
            f"{transformers.__version__} has no model for it; use {_IMAGE_MODELS}"
        )
    composite = "text_config" in _read_json(folder / "config.json")
    takes = getattr(found, "main_input_name", "input_ids")
    if kind not in _MODEL_CLASSES and (takes != "pixel_values" or composite):
        what = "an image-text model" if composite else f"not an image model (it reads {takes})"
        raise EncoderError(
            f"unsupported model type {kind!r} in {folder / 'config.json'}: {what}; use "
            f"{_IMAGE_MODELS}"
        )
    return found


def load_model(folder: Path, kind: str) -> tuple[nn.Module, bool]:
    """The transformers model for ``kind`` with the folder's weights, and whether the checkpoint
    trained its pooler (classifier checkpoints often have none; a fresh one would be random).

    A classifier checkpoint (``ResNetForImageClassification``, ...) loads into its backbone:
    transformers drops the head and the backbone's prefix."""
    found = model_class(folder, kind)
    try:
        with _quiet_transformers():
            model, info = found.from_pretrained(
                folder, output_loading_info=True, dtype=torch.float32
            )
    except (OSError, ValueError, RuntimeError, KeyError) as error:
        raise EncoderError(f"cannot load the {kind} model in {folder}: {error}") from error
    missing = sorted(info.get("missing_keys") or ())
    pooler_missing = any(key.startswith("pooler.") for key in missing)
    # Pooler weights are handled above; the losses' parameters do not shape any vector.
    wrong = [k for k in missing if not k.startswith("pooler.") and k not in _UNUSED_KEYS]
    if wrong or info.get("mismatched_keys") or info.get("error_msgs"):
        shown = wrong or sorted(info.get("mismatched_keys") or ()) or info.get("error_msgs")
        raise EncoderError(f"the weights in {folder} do not fit a {kind} model: {list(shown)[:5]}")
    return model.eval(), not pooler_missing


# -- the encoder ----------------------------------------------------------------------------


class HFEncoder(EncoderBase):
    """A transformers image checkpoint as an Encoder, run by PyTorch (CPU or CUDA): CLIP,
    SigLIP, DINOv2, BEiT, ViT, or any other image backbone (``BackboneFeatures``).

    ``layer`` picks the pooling (see each family's ``*Features`` class); ``None`` or ``"head"``
    means the family's default. ``preprocess_exact`` says whether the stored preprocessing
    reproduces the checkpoint's image processor exactly.
    """

    def __init__(
        self,
        source: str,
        *,
        layer: str | None = None,
        normalize: bool = True,
        runtime: str = "auto",
        device: str = "auto",
        threads: int | None = None,  # accepted like other encoders; torch sets its own
    ) -> None:
        if runtime not in ("auto", "torch"):
            raise EncoderError(
                f"Hugging Face encoders run on PyTorch; runtime {runtime!r} is not available "
                "(use auto or torch)"
            )
        folder, name = resolve_checkpoint(source)
        kind = model_type(folder)
        family = family_of(kind)
        sha = weights_sha256(folder)
        model, pooler = load_model(folder, kind)
        processor = processor_config(folder)
        preprocess, exact = preprocess_from_processor(
            processor if processor is not None else default_processor(family, model.config),
            family,
        )
        module = _FEATURES[family](model, preprocess, layer=layer, pooler=pooler)
        self.folder = folder
        self.model_type = kind
        self.family = family
        self.preprocess_exact = exact
        self.identity = EncoderIdentity(
            f"{PREFIX}{name}", module.layer, module.output_dim(), sha, preprocess
        )
        self.normalize = normalize
        self.runtime = "torch"
        self._module = module
        self._run = TorchRunner(module, resolve_device(device))
        self._tokenizer: Any = None

    @property
    def device(self) -> torch.device:
        return self._run.device

    @property
    def token_dim(self) -> int:
        """Width of each patch token from ``patch_tokens``."""
        return self._module.token_dim()

    def _forward(self, pixels: np.ndarray) -> np.ndarray:
        return self._run(pixels)

    # -- patch tokens, for local matching ----------------------------------------------

    def patch_tokens_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 [n, res, res, 3] -> float32 [n, patches, token_dim] last-layer patch tokens."""
        self._require_patch_tokens()
        pixels = np.ascontiguousarray(pixels, dtype=np.uint8)
        expected = (self.preprocess.resolution, self.preprocess.resolution, 3)
        if pixels.ndim != 4 or pixels.shape[1:] != expected:
            raise EncoderError(
                f"expected uint8 pixels of shape [n, *{expected}], got {pixels.shape}"
            )
        with torch.inference_mode():
            batch = torch.from_numpy(pixels).to(self.device)
            return self._module.tokens(batch).float().cpu().numpy()

    def patch_tokens(self, images: Sequence[ImageSource], *, batch_size: int = 32) -> np.ndarray:
        """Any images -> float32 [n, patches, token_dim], never normalised."""
        self._require_patch_tokens()
        if batch_size < 1:
            raise EncoderError(f"batch_size must be at least 1, got {batch_size}")
        parts = []
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size]
            pixels = [
                resize_for_model(
                    load_image(s, draft_size=self.preprocess.resolution), self.preprocess
                )
                for s in chunk
            ]
            parts.append(self.patch_tokens_pixels(np.stack(pixels)))
        if not parts:
            patch = int(self._module._vision_config().patch_size)
            count = (self.preprocess.resolution // patch) ** 2
            return np.empty((0, count, self.token_dim), dtype=np.float32)
        return np.concatenate(parts)

    def _require_patch_tokens(self) -> None:
        if not self._module.has_patch_tokens:
            raise EncoderError(
                f"the model {self.identity.model} has no patch tokens (a {self.model_type} "
                "backbone); local matching uses SIFT with it"
            )

    # -- text ---------------------------------------------------------------------------

    @property
    def capabilities(self) -> EncoderCapabilities:
        """The vision transformer families give patch tokens (generic backbones do not); the
        ``embeds`` layer of CLIP and SigLIP also embeds text."""
        return EncoderCapabilities(
            text=self.supports_text, patch_tokens=self._module.has_patch_tokens
        )

    @property
    def supports_text(self) -> bool:
        """True when ``encode_text`` works: the model has a text tower (CLIP, SigLIP) and the
        layer is the one in its space."""
        return self._module.text_tower and self.identity.layer == "embeds"

    def encode_text(self, texts: Sequence[str], *, batch_size: int = 64) -> np.ndarray:
        """Texts -> float32 [n, dim] in the image embedding space (L2-normalised when
        ``normalize`` is set), so they can search image vectors by cosine."""
        if not self.supports_text:
            why = (
                f"layer {self.identity.layer!r} is not in the text space; use layer 'embeds'"
                if self._module.text_tower
                else "it has no text tower; text search needs a CLIP or SigLIP model (or a "
                "text model paired with one, --text-model)"
            )
            raise EncoderError(f"{self.identity.model} cannot embed text: {why}")
        if isinstance(texts, str):
            texts = [texts]
        if batch_size < 1:
            raise EncoderError(f"batch_size must be at least 1, got {batch_size}")
        tokenizer = self._text_tokenizer()
        parts = [np.empty((0, self.dim), dtype=np.float32)]
        for start in range(0, len(texts), batch_size):
            inputs = self._module.text_inputs(tokenizer, list(texts[start : start + batch_size]))
            with torch.inference_mode():
                on_device = {key: value.to(self.device) for key, value in inputs.items()}
                parts.append(self._module.text(on_device).float().cpu().numpy())
        vectors = np.concatenate(parts)
        if self.normalize:
            vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        return vectors

    def _text_tokenizer(self) -> Any:
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.folder, self.identity.model)
        return self._tokenizer


def load_tokenizer(folder: Path, model: str) -> Any:
    """The tokenizer saved with a checkpoint, or ``EncoderError`` saying what is missing."""
    from transformers import AutoTokenizer

    # Without any of these, transformers builds an empty tokenizer of the model's class that
    # maps every word to "unknown": text search would run but mean nothing.
    if not any((folder / name).is_file() for name in _TOKENIZER_FILES):
        raise EncoderError(
            f"cannot load the tokenizer of {model}: {folder} has no tokenizer files "
            f"({', '.join(_TOKENIZER_FILES)})"
        )
    try:
        with _quiet_transformers():
            return AutoTokenizer.from_pretrained(folder)
    except ImportError as error:
        # Sentencepiece tokenizers (SigLIP's spiece.model) need the sentencepiece package.
        raise EncoderError(
            f"cannot load the tokenizer of {model} from {folder}: {error} "
            "(pip install sentencepiece)"
        ) from error
    except (OSError, ValueError, TypeError, AttributeError) as error:
        raise EncoderError(
            f"cannot load the tokenizer of {model} from {folder}: {error}"
        ) from error


def create_hf_encoder(
    name: str,
    *,
    layer: str | None = None,
    normalize: bool = True,
    runtime: str = "auto",
    device: str = "auto",
    threads: int | None = None,
) -> HFEncoder:
    """The registry's factory for names starting with ``hf:``."""
    return HFEncoder(
        name.removeprefix(PREFIX),
        layer=layer,
        normalize=normalize,
        runtime=runtime,
        device=device,
        threads=threads,
    )
