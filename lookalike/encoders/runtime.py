"""Running a torch feature module: eagerly in PyTorch, or exported once to ONNX Runtime.

On two cores ONNX Runtime runs EfficientNet-Lite about 2.5x faster than channels-last
PyTorch. The same exported file is what OpenVINO compiles
(:mod:`lookalike.encoders.openvino_runtime`, the faster of the two on the CPUs measured).
PyTorch stays the fallback, and the path for GPUs.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import warnings
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from lookalike.errors import EncoderError

Runtime = Literal["auto", "onnx", "openvino", "torch"]


def cache_dir() -> Path:
    """Where exported models are kept: $LOOKALIKE_CACHE, else ~/.cache/lookalike."""
    root = os.environ.get("LOOKALIKE_CACHE") or Path.home() / ".cache" / "lookalike"
    return Path(root)


def file_sha256(path: Path) -> str:
    """Hex digest of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def resolve_device(device: str) -> torch.device:
    """``auto`` picks CUDA when present, else CPU; anything else is passed to torch."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as error:
        raise EncoderError(f"unknown device {device!r}") from error
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise EncoderError("device 'cuda' was requested but no CUDA GPU is available")
    return resolved


def onnxruntime_available() -> bool:
    """True when the onnxruntime package can be imported."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


class TorchRunner:
    """Runs the module eagerly, channels-last, without autograd."""

    def __init__(self, module: torch.nn.Module, device: torch.device) -> None:
        self.device = device
        # Module.to accepts memory_format at runtime, but torch's overloads do not declare it.
        self.module = module.to(device).eval().to(memory_format=torch.channels_last)  # type: ignore[call-overload]

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            batch = torch.from_numpy(pixels).to(self.device)
            features: np.ndarray = self.module(batch).float().cpu().numpy()
            return features


class OnnxRunner:
    """Exports the module to an ONNX file once (cached by key) and runs it with ONNX Runtime."""

    def __init__(
        self,
        module: torch.nn.Module,
        *,
        example: np.ndarray,
        cache_key: str,
        threads: int | None = None,
    ) -> None:
        import onnxruntime as ort

        path = cache_dir() / "onnx" / f"{cache_key}.onnx"
        if not path.exists():
            export_onnx(module, example, path)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads or os.cpu_count() or 1
        # Spinning threads would steal the cores that decode images between batches.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(
                str(path), options, providers=["CPUExecutionProvider"]
            )
        except Exception as error:  # onnxruntime raises its own untyped errors
            path.unlink(missing_ok=True)  # a corrupt cache entry is re-exported next time
            raise EncoderError(f"ONNX Runtime could not load {path}: {error}") from error
        self.path = path
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        features: np.ndarray = self.session.run(None, {self.input_name: pixels})[0]
        return features


def ensure_exported(module: torch.nn.Module, example: np.ndarray, cache_key: str) -> Path:
    """The cached ONNX export of ``module`` under ``cache_key`` (the file OnnxRunner uses),
    exported now if missing: what OpenVINO compiles (lookalike.encoders.openvino_runtime)."""
    path = cache_dir() / "onnx" / f"{cache_key}.onnx"
    if not path.exists():
        export_onnx(module, example, path)
    return path


def export_onnx(module: torch.nn.Module, example: np.ndarray, path: Path) -> None:
    """Write ``module`` as ONNX with a dynamic batch axis, atomically (safe across processes)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(dir=path.parent, suffix=".onnx.part")
    os.close(handle)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the exporter's own chatter is not for our users
            torch.onnx.export(
                module.eval(),
                (torch.from_numpy(example),),
                temp,
                dynamo=False,
                input_names=["pixels"],
                output_names=["features"],
                dynamic_axes={"pixels": {0: "batch"}, "features": {0: "batch"}},
                opset_version=17,
            )
        os.replace(temp, path)
    except Exception as error:
        raise EncoderError(f"could not export the model to ONNX: {error}") from error
    finally:
        Path(temp).unlink(missing_ok=True)
