"""Hugging Face vision transformers (CLIP, DINOv2, BEiT, ViT) as encoders, through ``transformers``.

A model is named ``hf:<hub id>`` (``hf:facebook/dinov2-small``) or ``hf:<folder>`` (a folder
written by ``save_pretrained`` or ``hf download --local-dir``). The family comes from the
checkpoint's ``config.json`` (``model_type``), the preprocessing from its
``preprocessor_config.json`` (or the family's documented defaults when it has none), so vectors
are made exactly as the model was trained to see images. CLIP also embeds text into the same
space as its images (``encode_text``), which is what text search uses.

``transformers`` is imported only when a model is built, so ``import lookalike`` stays light.
"""

from __future__ import annotations

import contextlib
import hashlib
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
SUPPORTED_MODEL_TYPES = ("beit", "clip", "dinov2", "vit")

# Hub files an encoder needs: configs, tokenizer files and safetensors weights, top level only
# (repos often carry ONNX or other framework exports in sub-folders that would waste downloads).
_HUB_PATTERNS = ["*.json", "*.txt", "*.safetensors"]
_HUB_LEGACY_WEIGHTS = ["pytorch_model*.bin"]

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
}
_FAMILY_PROCESSOR = {
    "clip": "CLIPImageProcessor",
    "dinov2": "BitImageProcessor",
    "vit": "ViTImageProcessor",
    "beit": "BeitImageProcessor",
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


def resolve_checkpoint(source: str) -> tuple[Path, str]:
    """A local folder holding the checkpoint ``source`` names, and the name for its identity.

    ``source`` is a folder, or a hub id that is fetched into (or, offline, found in) the
    Hugging Face cache.
    """
    if not source:
        raise EncoderError("empty Hugging Face model name; use hf:<hub id> or hf:<folder>")
    folder = Path(source).expanduser()
    if folder.is_dir():
        return folder, folder.resolve().name
    if _looks_like_path(source) or folder.exists():
        raise EncoderError(f"no model folder at {folder}")
    return _download(source), source


def _download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    offline = _offline()
    advice = (
        f"download it once where there is internet (hf download {repo_id}, or "
        f"hf download {repo_id} --local-dir FOLDER and use hf:FOLDER), or pass a local folder"
    )
    try:
        with _quiet_transformers():
            folder = Path(
                snapshot_download(
                    repo_id,
                    allow_patterns=_HUB_PATTERNS,
                    ignore_patterns=["*/*"],
                    local_files_only=offline,
                )
            )
            if not _weight_files(folder):
                folder = Path(
                    snapshot_download(
                        repo_id,
                        allow_patterns=_HUB_LEGACY_WEIGHTS,
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
    """The checkpoint's ``model_type``, checked against the families supported here."""
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise EncoderError(f"{folder} has no config.json: not a transformers checkpoint")
    kind = _read_json(config_path).get("model_type")
    if not isinstance(kind, str) or kind not in SUPPORTED_MODEL_TYPES:
        raise EncoderError(
            f"unsupported model type {kind!r} in {config_path}; "
            f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    return kind


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
    """Documented preprocessing of each family, for folders saved without a processor config."""
    if kind == "dinov2":
        # What every facebook/dinov2-* checkpoint ships: the DINOv2 evaluation transform.
        return {
            "image_processor_type": "BitImageProcessor",
            "size": {"shortest_edge": 256},
            "crop_size": {"height": 224, "width": 224},
            "image_mean": _IMAGENET_MEAN,
            "image_std": _IMAGENET_STD,
        }
    vision = config.vision_config if kind == "clip" else config
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


def _interpolation(resample: Any) -> str:
    if isinstance(resample, str):
        resample = _RESAMPLE_NAMES.get(resample.lower(), 3)
    return _RESAMPLE.get(int(resample), "bicubic")


def preprocess_from_processor(
    processor: dict[str, Any], family: str
) -> tuple[PreprocessConfig, bool]:
    """Translate image processor settings into a ``PreprocessConfig``.

    Returns the config and whether it is exact. It is inexact only where a processor squashes
    to a square and then crops (the pipeline keeps the aspect ratio when it crops), resizes the
    shortest edge without cropping (the model would see a non-square image), or does not resize.
    """
    declared = str(processor.get("image_processor_type") or processor.get("feature_extractor_type"))
    declared = declared.removesuffix("Fast").removesuffix("Pil")
    declared = declared.replace("FeatureExtractor", "ImageProcessor")
    defaults = _PROCESSOR_DEFAULTS.get(declared, _PROCESSOR_DEFAULTS[_FAMILY_PROCESSOR[family]])
    settings = {**defaults, **{k: v for k, v in processor.items() if v is not None}}
    square = bool(settings["square"])

    # The network sees (x * rescale - mean) / std for uint8 x; the pipeline applies
    # (x / 255 - mean') / std' instead, so fold the rescale factor into mean' and std'.
    rescale = (
        float(settings.get("rescale_factor", 1 / 255)) if settings.get("do_rescale", True) else 1.0
    )
    scale = 255.0 * rescale
    if abs(scale - 1.0) < 1e-6:
        scale = 1.0
    if settings.get("do_normalize", True):
        mean = [float(m) for m in settings["image_mean"]]
        std = [float(s) for s in settings["image_std"]]
    else:
        mean, std = [0.0] * 3, [1.0] * 3
    if len(mean) == 1:
        mean, std = mean * 3, std * 3
    mean3 = tuple(m / scale for m in mean)
    std3 = tuple(s / scale for s in std)

    crop = None
    if settings.get("do_center_crop") and settings.get("crop_size") is not None:
        _, crop = _side(settings["crop_size"], square=True, what="crop_size")
    resize = settings.get("do_resize", True)
    size_kind, size = _side(settings["size"], square=square, what="size")
    exact = True
    if not resize:
        # Without a resize the model would see the raw image; squash to its input size instead.
        resolution, mode, fraction = crop or size, "squash", 1.0
        exact = False
    elif size_kind == "shortest":
        resolution = crop or size
        mode, fraction = "center_crop", resolution / size
        exact = crop is not None
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
    """uint8 NHWC pixels in, pooled vectors (or patch tokens) out; normalises inside."""

    layers: ClassVar[tuple[str, ...]] = ()
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
        self.layer = self._resolve_layer(layer)
        image_size = getattr(self._vision_config(), "image_size", preprocess.resolution)
        # Positional embeddings are learnt at one size; other sizes need interpolating them.
        self.interpolate = int(image_size) != preprocess.resolution
        self.register_buffer("mean", (255.0 * torch.tensor(preprocess.mean)).view(1, 3, 1, 1))
        self.register_buffer(
            "inv_std", (1.0 / (255.0 * torch.tensor(preprocess.std))).view(1, 3, 1, 1)
        )

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


class ClipFeatures(HFFeatures):
    """CLIP: ``embeds`` is the image embedding in the space shared with text
    (``get_image_features``); ``cls`` is the vision tower's normed class token before projection."""

    layers = ("embeds", "cls")

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

    def text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Text embeddings in the image embedding space (``get_text_features``)."""
        out = self.model.text_model(input_ids=input_ids, attention_mask=attention_mask)
        embeds: torch.Tensor = self.model.text_projection(out.pooler_output)
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


_FEATURES: dict[str, type[HFFeatures]] = {
    "clip": ClipFeatures,
    "dinov2": Dinov2Features,
    "vit": VitFeatures,
    "beit": BeitFeatures,
}
_MODEL_CLASSES = {
    "clip": "CLIPModel",
    "dinov2": "Dinov2Model",
    "vit": "ViTModel",
    "beit": "BeitModel",
}


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


def load_model(folder: Path, kind: str) -> tuple[nn.Module, bool]:
    """The transformers model for ``kind`` with the folder's weights, and whether the checkpoint
    trained its pooler (classifier checkpoints often have none; a fresh one would be random)."""
    import transformers

    model_class = getattr(transformers, _MODEL_CLASSES[kind])
    try:
        with _quiet_transformers():
            model, info = model_class.from_pretrained(
                folder, output_loading_info=True, dtype=torch.float32
            )
    except (OSError, ValueError, RuntimeError, KeyError) as error:
        raise EncoderError(f"cannot load the {kind} model in {folder}: {error}") from error
    missing = sorted(info.get("missing_keys") or ())
    pooler_missing = any(key.startswith("pooler.") for key in missing)
    # logit_scale only matters for CLIP's contrastive loss; pooler weights are handled above.
    wrong = [k for k in missing if not k.startswith("pooler.") and k != "logit_scale"]
    if wrong or info.get("mismatched_keys") or info.get("error_msgs"):
        shown = wrong or sorted(info.get("mismatched_keys") or ()) or info.get("error_msgs")
        raise EncoderError(f"the weights in {folder} do not fit a {kind} model: {list(shown)[:5]}")
    return model.eval(), not pooler_missing


# -- the encoder ----------------------------------------------------------------------------


class HFEncoder(EncoderBase):
    """A CLIP, DINOv2, BEiT or ViT checkpoint as an Encoder, run by PyTorch (CPU or CUDA).

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
        sha = weights_sha256(folder)
        model, pooler = load_model(folder, kind)
        processor = processor_config(folder)
        preprocess, exact = preprocess_from_processor(
            processor if processor is not None else default_processor(kind, model.config), kind
        )
        module = _FEATURES[kind](model, preprocess, layer=layer, pooler=pooler)
        self.folder = folder
        self.model_type = kind
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

    # -- text ---------------------------------------------------------------------------

    @property
    def capabilities(self) -> EncoderCapabilities:
        """Every supported family is a vision transformer with patch tokens; CLIP's
        ``embeds`` layer also embeds text."""
        return EncoderCapabilities(text=self.supports_text, patch_tokens=True)

    @property
    def supports_text(self) -> bool:
        """True when ``encode_text`` works: the model has a text tower (CLIP)."""
        return isinstance(self._module, ClipFeatures) and self.identity.layer == "embeds"

    def encode_text(self, texts: Sequence[str], *, batch_size: int = 64) -> np.ndarray:
        """Texts -> float32 [n, dim] in the image embedding space (L2-normalised when
        ``normalize`` is set), so they can search image vectors by cosine."""
        if not self.supports_text:
            why = (
                "layer 'cls' is not in the text space; use layer 'embeds'"
                if isinstance(self._module, ClipFeatures)
                else "it has no text tower; text search needs a CLIP model"
            )
            raise EncoderError(f"{self.identity.model} cannot embed text: {why}")
        if isinstance(texts, str):
            texts = [texts]
        if batch_size < 1:
            raise EncoderError(f"batch_size must be at least 1, got {batch_size}")
        module = self._module
        assert isinstance(module, ClipFeatures)
        tokenizer = self._text_tokenizer()
        limit = int(module.model.config.text_config.max_position_embeddings)
        parts = [np.empty((0, self.dim), dtype=np.float32)]
        for start in range(0, len(texts), batch_size):
            chunk = list(texts[start : start + batch_size])
            tokens = tokenizer(
                chunk, padding=True, truncation=True, max_length=limit, return_tensors="pt"
            )
            with torch.inference_mode():
                ids = tokens["input_ids"].to(self.device)
                mask = tokens["attention_mask"].to(self.device)
                parts.append(module.text(ids, mask).float().cpu().numpy())
        vectors = np.concatenate(parts)
        if self.normalize:
            vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        return vectors

    def _text_tokenizer(self) -> Any:
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            try:
                with _quiet_transformers():
                    self._tokenizer = AutoTokenizer.from_pretrained(self.folder)
            except (OSError, ValueError, TypeError) as error:
                raise EncoderError(
                    f"cannot load the tokenizer of {self.identity.model} from {self.folder}: "
                    f"{error}"
                ) from error
        return self._tokenizer


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
