"""Fine-tuned encoders: saving them, finding them by name, and running them.

A fine-tuned encoder is named ``<base>+<name>`` (``efficientnet-lite0+clothes``) and lives in
a folder of that name holding ``encoder.json`` (its base, shapes, training record and the
SHA-256 of every file) and ``head.pt`` (plus ``backbone.pt`` when backbone stages were
trained). ``create_encoder("<base>+<name>")`` looks for the folder

1. in each of the given ``search_dirs`` (a collection passes its own ``encoders/`` folder), then
2. in ``$LOOKALIKE_HOME/encoders`` (default ``~/.local/share/lookalike/encoders``).

Its identity carries its own name and a SHA-256 over its base's weights hash and its own
files, so its vectors are stored apart from the base's and from any retrained version's.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lookalike.encoders.base import Encoder, EncoderBase, EncoderIdentity
from lookalike.encoders.preprocess import PreprocessConfig
from lookalike.encoders.projection import HeadConfig, ProjectionHead
from lookalike.encoders.runtime import file_sha256
from lookalike.errors import EncoderError, FinetuneError

FORMAT_VERSION = 1
MANIFEST = "encoder.json"
HEAD_FILE = "head.pt"
BACKBONE_FILE = "backbone.pt"
ENCODERS_DIR = "encoders"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def is_finetuned_name(name: str) -> bool:
    """True for ``<base>+<name>`` names, which ``create_encoder`` resolves to saved folders."""
    return "+" in name


def finetuned_name(base: str, name: str) -> str:
    """The full encoder name for a fine-tune called ``name`` of ``base``."""
    if not _NAME.match(name):
        raise FinetuneError(
            f"name {name!r} must start with a letter or digit and hold only letters, digits, "
            "'.', '_' and '-'"
        )
    if is_finetuned_name(base):
        raise FinetuneError(f"{base} is itself fine-tuned; fine-tune its base encoder instead")
    return f"{base}+{name}"


def folder_name(name: str) -> str:
    """A file-system-safe folder name for an encoder name (``hf:`` ids hold '/' and ':')."""
    return re.sub(r"[^A-Za-z0-9._+-]", "_", name)


def encoders_home() -> Path:
    """Where encoders usable by every collection live: $LOOKALIKE_HOME/encoders, else
    ~/.local/share/lookalike/encoders."""
    home = os.environ.get("LOOKALIKE_HOME")
    if home:
        return Path(home) / ENCODERS_DIR
    data = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(data) / "lookalike" / ENCODERS_DIR


def find_finetuned(name: str, search_dirs: Sequence[str | Path] = ()) -> Path:
    """The folder of a fine-tuned encoder: the first ``search_dirs`` entry holding it, else
    the shared encoders folder. Raises ``FinetuneError`` naming every place looked in."""
    places = [Path(d) for d in search_dirs] + [encoders_home()]
    for place in places:
        candidate = place / folder_name(name)
        if (candidate / MANIFEST).is_file():
            return candidate
    raise FinetuneError(
        f"no fine-tuned encoder {name!r} in {', '.join(str(p) for p in places)}; train it with "
        "'lookalike finetune' or copy its folder into one of them"
    )


@dataclass(frozen=True)
class BaseInfo:
    """The encoder a fine-tune was trained on, as its identity described it."""

    model: str
    layer: str
    dim: int
    weights_sha256: str
    pooling: str = "avg"
    scales: tuple[float, ...] = (1.0,)
    # The arithmetic of the base's vectors the head was trained on (bf16 collections): the
    # base runs the same way, so the head sees the vectors it learned from.
    precision: str = "fp32"

    @classmethod
    def of(cls, identity: EncoderIdentity) -> BaseInfo:
        pooling = getattr(identity, "pooling", "avg")
        scales = tuple(getattr(identity, "scales", (1.0,)))
        precision = getattr(identity, "precision", "fp32")
        return cls(
            identity.model,
            identity.layer,
            identity.dim,
            identity.weights_sha256,
            pooling,
            scales,
            precision,
        )

    def described(self) -> dict[str, Any]:
        """The base as the manifest and the identity hash write it (fp32 left out, so
        fine-tunes saved before precision was recorded keep their identity)."""
        described: dict[str, Any] = {**self.__dict__, "scales": list(self.scales)}
        if self.precision == "fp32":
            del described["precision"]
        return described

    def encoder_options(self) -> dict[str, Any]:
        """Options that rebuild this base with ``create_encoder`` (pooling and scales only
        when not the defaults, so encoders without those options still build)."""
        options: dict[str, Any] = {"layer": self.layer}
        if self.pooling != "avg":
            options["pooling"] = self.pooling
        if self.scales != (1.0,):
            options["scales"] = list(self.scales)
        if self.precision != "fp32":
            options["precision"] = self.precision
        return options


@dataclass(frozen=True)
class SavedEncoder:
    """A fine-tuned encoder's folder, read and checked."""

    folder: Path
    name: str
    base: BaseInfo
    head: HeadConfig
    unfrozen_stages: int
    sha256: str
    manifest: dict[str, Any]

    def head_state(self) -> dict[str, torch.Tensor]:
        return _load_state(self.folder / HEAD_FILE)

    def backbone_state(self) -> dict[str, torch.Tensor]:
        return _load_state(self.folder / BACKBONE_FILE)


def _load_state(path: Path) -> dict[str, torch.Tensor]:
    try:
        state: dict[str, torch.Tensor] = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError) as error:
        raise FinetuneError(f"cannot read {path}: {error}") from error
    return state


def _identity_sha(
    name: str, base: BaseInfo, head: HeadConfig, unfrozen: int, files: dict[str, str]
) -> str:
    described = {
        "name": name,
        "base": base.described(),
        "head": head.to_dict(),
        "unfrozen_stages": unfrozen,
        "files": files,
    }
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()


def save_finetuned(
    folder: str | Path,
    name: str,
    base: BaseInfo,
    head: ProjectionHead,
    *,
    backbone_state: dict[str, torch.Tensor] | None = None,
    unfrozen_stages: int = 0,
    training: dict[str, Any] | None = None,
) -> SavedEncoder:
    """Write a fine-tuned encoder's folder (replacing any previous one atomically per file)
    and return it as loaded back."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    files = {HEAD_FILE: _save_state(folder / HEAD_FILE, head.state_dict())}
    if backbone_state is not None:
        files[BACKBONE_FILE] = _save_state(folder / BACKBONE_FILE, backbone_state)
    else:
        (folder / BACKBONE_FILE).unlink(missing_ok=True)
    manifest = {
        "format": FORMAT_VERSION,
        "name": name,
        "base": base.described(),
        "head": head.config.to_dict(),
        "unfrozen_stages": unfrozen_stages,
        "files": files,
        "sha256": _identity_sha(name, base, head.config, unfrozen_stages, files),
        "training": training or {},
    }
    temp = folder / f"{MANIFEST}.part"
    temp.write_text(json.dumps(manifest, indent=2))
    os.replace(temp, folder / MANIFEST)
    return load_saved(folder)


def _save_state(path: Path, state: dict[str, torch.Tensor]) -> str:
    temp = path.with_suffix(".part")
    torch.save({k: v.detach().cpu().contiguous() for k, v in state.items()}, temp)
    os.replace(temp, path)
    return file_sha256(path)


def load_saved(folder: str | Path) -> SavedEncoder:
    """Read a fine-tuned encoder's folder, checking its format and every file's SHA-256."""
    folder = Path(folder)
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise FinetuneError(f"cannot read {folder / MANIFEST}: {error}") from error
    if manifest.get("format") != FORMAT_VERSION:
        raise FinetuneError(
            f"{folder} holds a fine-tuned encoder of format {manifest.get('format')!r}; "
            f"this lookalike reads format {FORMAT_VERSION}"
        )
    try:
        raw_base = dict(manifest["base"])
        raw_base["scales"] = tuple(float(s) for s in raw_base.get("scales", (1.0,)))
        base = BaseInfo(**raw_base)
        head = HeadConfig(**manifest["head"])
        files: dict[str, str] = dict(manifest["files"])
        name, unfrozen, sha = manifest["name"], int(manifest["unfrozen_stages"]), manifest["sha256"]
    except (KeyError, TypeError, ValueError) as error:
        raise FinetuneError(f"{folder / MANIFEST} is incomplete: {error}") from error
    for file, expected in files.items():
        path = folder / file
        if not path.is_file() or file_sha256(path) != expected:
            raise FinetuneError(f"{path} is missing or changed since {name} was saved")
    if _identity_sha(name, base, head, unfrozen, files) != sha:
        raise FinetuneError(f"{folder / MANIFEST} was edited: its SHA-256 no longer matches")
    return SavedEncoder(folder, name, base, head, unfrozen, sha, manifest)


def install_finetuned(saved: SavedEncoder) -> Path:
    """Copy a fine-tuned encoder into the shared encoders folder, so every collection (and
    ``lookalike eval``) finds it by name. Returns the new folder."""
    target = encoders_home() / folder_name(saved.name)
    if target.resolve() != saved.folder.resolve():
        shutil.copytree(saved.folder, target, dirs_exist_ok=True)
    return target


class FinetunedEncoder(EncoderBase):
    """A base encoder followed by a trained projection head (and, when backbone stages were
    trained, with those stages' weights). Vectors are unit length.

    With a frozen backbone the base encoder runs as usual (ONNX Runtime on CPU) and the head
    is applied to its output; with trained stages the whole network plus head is one graph,
    exported to ONNX Runtime once per encoder version.
    """

    def __init__(
        self,
        saved: SavedEncoder,
        *,
        create_base: Callable[..., Encoder],
        normalize: bool = True,
        runtime: str = "auto",
        device: str = "auto",
        threads: int | None = None,
    ) -> None:
        self.saved = saved
        # The head's output is unit length already; normalising it again would only move the
        # last bits, and the same encoder must give the same vectors whatever it was asked.
        self.normalize = False
        self.head = ProjectionHead(saved.head)
        _load_into(self.head, saved.head_state(), saved.folder / HEAD_FILE)
        self.head.eval()
        self.base = None
        if saved.unfrozen_stages:
            preprocess = self._build_network(runtime, device, threads)
        else:
            self.base = create_base(
                saved.base.model,
                normalize=False,
                runtime=runtime,
                device=device,
                threads=threads,
                **saved.base.encoder_options(),
            )
            if self.base.identity.weights_sha256 != saved.base.weights_sha256:
                raise FinetuneError(
                    f"{saved.name} was trained on {saved.base.model} weights "
                    f"{saved.base.weights_sha256[:12]}, but the installed ones are "
                    f"{self.base.identity.weights_sha256[:12]}; train it again"
                )
            preprocess = self.base.preprocess
        self.identity = EncoderIdentity(
            saved.name,
            saved.base.layer,
            saved.head.dim,
            saved.sha256,
            preprocess,
            saved.base.pooling,
            saved.base.scales,
        )

    def _build_network(self, runtime: str, device: str, threads: int | None) -> PreprocessConfig:
        from lookalike.encoders.efficientnet_lite import (
            VARIANTS,
            PooledFeatures,
            lite_preprocess,
            load_pretrained,
            weights_path,
        )
        from lookalike.encoders.runtime import (
            OnnxRunner,
            TorchRunner,
            onnxruntime_available,
            resolve_device,
        )

        saved = self.saved
        variant = VARIANTS.get(saved.base.model)
        if variant is None:
            raise FinetuneError(f"{saved.name}: trained stages need an EfficientNet-Lite base")
        if file_sha256(weights_path(variant)) != saved.base.weights_sha256:
            raise FinetuneError(
                f"{saved.name} was trained on other {variant.name} weights than the installed "
                "ones; train it again"
            )
        network = load_pretrained(variant)
        state = network.state_dict()
        trained = saved.backbone_state()
        unknown = sorted(set(trained) - set(state))
        if unknown:
            raise FinetuneError(f"{saved.folder / BACKBONE_FILE} does not fit: {unknown[:3]}")
        state.update(trained)
        network.load_state_dict(state)
        preprocess = lite_preprocess(variant)
        pooled = PooledFeatures(network, "head", preprocess, pooling=saved.base.pooling)
        module = nn.Sequential(pooled, self.head).eval()
        resolved = resolve_device(device)
        if runtime == "auto":
            runtime = "onnx" if resolved.type == "cpu" and onnxruntime_available() else "torch"
        self._run: OnnxRunner | TorchRunner
        if runtime == "onnx":
            size = preprocess.resolution
            example = np.zeros((1, size, size, 3), dtype=np.uint8)
            key = f"{folder_name(saved.name)}-{saved.sha256[:16]}-torch{torch.__version__}"
            self._run = OnnxRunner(module, example=example, cache_key=key, threads=threads)
        elif runtime == "torch":
            self._run = TorchRunner(module, resolved)
        else:
            raise EncoderError(f"unknown runtime {runtime!r}; choose auto, onnx or torch")
        return preprocess

    def apply_head(self, base_vectors: np.ndarray) -> np.ndarray:
        """Project raw vectors of the base encoder (as a collection stores them) into this
        encoder's space; only for encoders whose backbone was not trained."""
        if self.saved.unfrozen_stages:
            raise FinetuneError(f"{self.saved.name} trained backbone stages; embed the images")
        with torch.inference_mode():
            features = torch.from_numpy(np.ascontiguousarray(base_vectors, dtype=np.float32))
            projected: np.ndarray = self.head(features).numpy()
            return projected

    def _forward(self, pixels: np.ndarray) -> np.ndarray:
        if self.base is None:
            return self._run(pixels)
        return self.apply_head(self.base.embed_pixels(pixels))


def _load_into(module: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    try:
        module.load_state_dict(state)
    except RuntimeError as error:
        raise FinetuneError(f"{path} does not fit its encoder.json: {error}") from error


def create_finetuned_encoder(
    name: str,
    *,
    create_base: Callable[..., Encoder],
    search_dirs: Sequence[str | Path] = (),
    layer: str | None = None,
    pooling: str | None = None,
    scales: Any = None,
    normalize: bool = True,
    runtime: str = "auto",
    device: str = "auto",
    threads: int | None = None,
) -> FinetunedEncoder:
    """The fine-tuned encoder ``name`` (``<base>+<name>``), found as :func:`find_finetuned`
    says. ``layer``, ``pooling`` and ``scales`` are accepted so a collection can pass its
    settings, and must match what the encoder was trained on."""
    saved = load_saved(find_finetuned(name, search_dirs))
    if saved.name != name:
        raise FinetuneError(f"{saved.folder} holds {saved.name!r}, not {name!r}")
    if layer is not None and layer != saved.base.layer:
        raise FinetuneError(
            f"{name} was trained on layer {saved.base.layer!r} of {saved.base.model}; "
            f"use --layer {saved.base.layer}, not {layer!r}"
        )
    if pooling is not None and pooling != saved.base.pooling:
        raise FinetuneError(f"{name} was trained with {saved.base.pooling} pooling, not {pooling}")
    if scales is not None:
        from lookalike.encoders.efficientnet_lite import parse_scales

        if parse_scales(scales) != saved.base.scales:
            raise FinetuneError(f"{name} was trained at scales {saved.base.scales}, not {scales}")
    return FinetunedEncoder(
        saved,
        create_base=create_base,
        normalize=normalize,
        runtime=runtime,
        device=device,
        threads=threads,
    )
