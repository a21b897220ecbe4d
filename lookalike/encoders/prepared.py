"""Prepared encoders: a model ONNX Runtime already optimised for this machine, loaded without
torch.

Building an EfficientNet-Lite encoder imports torch (over a second), reads and hashes the
weights, and lets ONNX Runtime optimise the graph: nothing next to an indexing run or a
server's start, but most of a one-off ``lookalike search``. So the first build of an encoder
that runs on ONNX Runtime's CPU provider also saves the graph as ONNX Runtime optimised it
(``optimized_model_filepath``) under the cache folder, with a manifest: the encoder's identity
and capabilities, the files it was made from with their sizes and modification times, and the
ONNX Runtime version and CPU it was optimised for (the optimised graph may use this CPU's
instructions and layouts). Later builds with the same options load that graph with
optimisation off: no torch, no weights read, a fraction of the session's start.

Nothing is trusted that cannot be checked cheaply: a manifest whose source files changed,
whose versions or CPU differ, or whose model file does not match its recorded SHA-256 or does
not load, is ignored (the full build runs and prepares it again). The prepared graph is only
saved after it gave the same vectors as the encoder it was made from on a probe batch.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import platform
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lookalike.encoders.base import Encoder, EncoderBase, EncoderCapabilities, EncoderIdentity
from lookalike.encoders.openvino_runtime import (
    cache_stem,
    file_state,
    files_unchanged,
)

if TYPE_CHECKING:
    import onnxruntime

_log = logging.getLogger(__name__)

# Bump when the manifest or the way the graph is prepared changes.
PREPARED_VERSION = 2
PREPARED_FOLDER = "prepared"
# The prepared graph must reproduce its source's vectors this closely on the probe batch.
_PROBE_TOLERANCE = 1e-4


def cache_dir() -> Path:
    """Where prepared models are kept: $LOOKALIKE_CACHE, else ~/.cache/lookalike (the folder
    :func:`lookalike.encoders.runtime.cache_dir` names; repeated here so that finding a
    prepared model imports no torch)."""
    root = os.environ.get("LOOKALIKE_CACHE") or Path.home() / ".cache" / "lookalike"
    return Path(root)


def prepared_folder() -> Path:
    """The folder of prepared models and their manifests."""
    return cache_dir() / PREPARED_FOLDER


@functools.cache
def cpu_fingerprint() -> str:
    """A short digest naming this machine's CPU kind (architecture, model, instruction set
    flags): an optimised graph is only loaded on the kind of CPU it was optimised for."""
    parts = [platform.machine(), platform.system()]
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
            wanted = {"model name", "flags", "Features", "CPU implementer", "CPU part"}
            seen: set[str] = set()
            for line in handle:
                name, _, value = line.partition(":")
                name = name.strip()
                if name in wanted and name not in seen:
                    seen.add(name)
                    parts.append(f"{name}={' '.join(sorted(value.split()))}")
                if not line.strip() and seen:
                    break  # the first processor's block is enough
    except OSError:
        parts.append(platform.processor())
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def prepared_key(fields: Mapping[str, Any], ort_version: str) -> str:
    """The file name stem of the prepared model of an encoder built with ``fields`` (its
    family, name and the options that shape its graph), for this ONNX Runtime and CPU."""
    text = json.dumps(
        {
            "fields": dict(fields),
            "version": PREPARED_VERSION,
            "ort": ort_version,
            "cpu": cpu_fingerprint(),
        },
        sort_keys=True,
        default=str,
    )
    return cache_stem(fields, text)


def _session_options(ort: Any, threads: int | None, *, optimise: bool) -> Any:
    options = ort.SessionOptions()
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if optimise
        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    options.intra_op_num_threads = threads or os.cpu_count() or 1
    # As the encoder's own runner: spinning threads would steal the cores decoding needs.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3  # the hardware-specific-graph warning is expected here
    return options


class PreparedEncoder(EncoderBase):
    """An encoder whose graph ONNX Runtime optimised earlier, with the identity and
    capabilities of the encoder it was prepared from."""

    runtime = "onnx"
    device = "cpu"  # where batches run (lookalike.encoders.devices may put one on CUDA)

    def __init__(
        self,
        identity: EncoderIdentity,
        capabilities: EncoderCapabilities,
        session: onnxruntime.InferenceSession,
        *,
        normalize: bool,
        path: Path,
    ) -> None:
        self.identity = identity
        self.normalize = normalize
        self._capabilities = capabilities
        self.session = session
        self.path = path
        self.input_name = session.get_inputs()[0].name

    @property
    def capabilities(self) -> EncoderCapabilities:
        return self._capabilities

    def _forward(self, pixels: np.ndarray) -> np.ndarray:
        features: np.ndarray = self.session.run(None, {self.input_name: pixels})[0]
        return features


def load_prepared(
    fields: Mapping[str, Any], *, normalize: bool, threads: int | None = None
) -> PreparedEncoder | None:
    """The prepared encoder for ``fields``, or None when there is none that can be trusted
    (then the caller builds the encoder the full way and calls :func:`save_prepared`). A
    damaged manifest or model file is deleted."""
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    key = prepared_key(fields, ort.__version__)
    folder = prepared_folder()
    manifest_path = folder / f"{key}.json"
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        model = manifest["model"]
        if manifest.get("key") != key or not files_unchanged(manifest["sources"]):
            return None  # made from other files: the full build prepares it again
        model_path = folder / str(model["file"])
        data = model_path.read_bytes()
        if len(data) != model["size"] or hashlib.sha256(data).hexdigest() != model["sha256"]:
            raise ValueError(f"{model_path} does not match its manifest")
        identity = EncoderIdentity.from_json(manifest["identity"])
        capabilities = EncoderCapabilities.from_json(manifest["capabilities"])
        session = ort.InferenceSession(
            data, _session_options(ort, threads, optimise=False), providers=["CPUExecutionProvider"]
        )
    except FileNotFoundError:
        return None
    except Exception as error:  # a damaged file; onnxruntime raises its own untyped errors
        _log.debug("prepared model %s is unusable (%s); it is prepared again", key, error)
        discard_prepared(key)
        return None
    return PreparedEncoder(identity, capabilities, session, normalize=normalize, path=model_path)


def discard_prepared(key: str) -> None:
    """Delete one prepared model and its manifest (the manifest first, so no reader finds a
    manifest without its model)."""
    folder = prepared_folder()
    for path in (folder / f"{key}.json", folder / f"{key}.onnx"):
        path.unlink(missing_ok=True)


def save_prepared(
    fields: Mapping[str, Any], encoder: Encoder, onnx_source: Path, sources: Iterable[Path]
) -> Path | None:
    """Optimise the ONNX file ``encoder`` runs (``onnx_source``) for this machine and save
    it as the prepared model of ``fields``, valid while the ``sources`` files (weights, the
    code that shapes the graph) stay as they are now. Returns the manifest's path, or None
    when it could not be prepared (never an error: the encoder works without it)."""
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    key = prepared_key(fields, ort.__version__)
    folder = prepared_folder()
    model_path = folder / f"{key}.onnx"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        states = [file_state(Path(p)) for p in [onnx_source, *sources]]
        temporary = _temporary(folder, ".onnx")
        try:
            options = _session_options(ort, None, optimise=True)
            options.optimized_model_filepath = str(temporary)
            ort.InferenceSession(str(onnx_source), options, providers=["CPUExecutionProvider"])
            data = temporary.read_bytes()
            if not _same_vectors(ort, data, encoder):
                _log.warning("the optimised graph of %s differs from its source", key)
                return None
            os.replace(temporary, model_path)
        finally:
            temporary.unlink(missing_ok=True)
        manifest = {
            "key": key,
            "version": PREPARED_VERSION,
            "ort": ort.__version__,
            "cpu": cpu_fingerprint(),
            "fields": dict(fields),
            "identity": encoder.identity.to_json(),
            "capabilities": encoder.capabilities.to_json(),
            "model": {
                "file": model_path.name,
                "size": len(data),
                "sha256": hashlib.sha256(data).hexdigest(),
            },
            "sources": states,
        }
        manifest_path = folder / f"{key}.json"
        temporary = _temporary(folder, ".json")
        try:
            temporary.write_text(json.dumps(manifest, indent=1, default=str), encoding="utf-8")
            os.replace(temporary, manifest_path)
        finally:
            temporary.unlink(missing_ok=True)
    except Exception as error:  # a full or read-only cache only costs the next start time
        _log.debug("could not prepare %s: %s", key, error)
        return None
    return manifest_path


def _temporary(folder: Path, suffix: str) -> Path:
    handle, name = tempfile.mkstemp(dir=folder, prefix=".", suffix=f"{suffix}.part")
    os.close(handle)
    return Path(name)


def _same_vectors(ort: Any, data: bytes, encoder: Encoder) -> bool:
    """Whether the optimised graph ``data`` gives ``encoder``'s vectors on a probe batch."""
    session = ort.InferenceSession(
        data, _session_options(ort, None, optimise=False), providers=["CPUExecutionProvider"]
    )
    size = encoder.preprocess.resolution
    probe = np.random.default_rng(0).integers(0, 256, (2, size, size, 3), dtype=np.uint8)
    expected = np.asarray(encoder.embed_pixels(probe), dtype=np.float32)
    got = np.asarray(session.run(None, {session.get_inputs()[0].name: probe})[0], np.float32)
    if encoder.normalize:
        got = got / np.maximum(np.linalg.norm(got, axis=1, keepdims=True), 1e-12)
    scale = max(float(np.abs(expected).max()), 1.0)
    return got.shape == expected.shape and bool(
        np.abs(got - expected).max() <= _PROBE_TOLERANCE * scale
    )
