"""Where an encoder runs its batches: ``device`` ``auto``, ``cpu`` or ``cuda``.

``auto`` takes a CUDA GPU when one can be used (torch sees one, or ONNX Runtime has its CUDA
execution provider), else the CPU; ``cuda`` insists, and is an :class:`EncoderError` naming
what is missing on a machine without one; ``cpu`` never looks. Deciding costs nothing where no
GPU driver is installed (its device files are absent), so a CPU machine never imports torch
to find out.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from lookalike.encoders.openvino_runtime import cuda_possible
from lookalike.encoders.prepared import PreparedEncoder
from lookalike.errors import EncoderError

if TYPE_CHECKING:
    from lookalike.encoders.base import Encoder

DEVICES = ("auto", "cpu", "cuda")
GpuBackend = Literal["torch", "onnxruntime"]


def torch_sees_cuda() -> bool:
    """Whether torch is installed with CUDA and sees a GPU."""
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def onnxruntime_has_cuda() -> bool:
    """Whether ONNX Runtime here has its CUDA execution provider (onnxruntime-gpu)."""
    try:
        import onnxruntime
    except ImportError:
        return False
    return "CUDAExecutionProvider" in onnxruntime.get_available_providers()


def gpu_backend(device: str) -> GpuBackend | None:
    """What runs batches on the GPU for ``device`` (``auto``, ``cpu``, ``cuda`` or ``cuda:N``):
    torch, else ONNX Runtime's CUDA provider, or None for the CPU. ``cuda`` without a usable
    GPU is an EncoderError."""
    if device == "cpu":
        return None
    if device == "auto" and not cuda_possible():
        return None
    if torch_sees_cuda():
        return "torch"
    if device in ("auto", "cuda") and onnxruntime_has_cuda():
        return "onnxruntime"
    if device == "auto":
        return None
    raise EncoderError(
        f"device {device!r} was asked for, but no CUDA GPU can be used here: torch sees none "
        "and ONNX Runtime has no CUDAExecutionProvider (install a CUDA build of torch or "
        "onnxruntime-gpu); use device 'cpu' or 'auto'"
    )


def onnx_cuda_encoder(cpu_encoder: Encoder, onnx_file: Any) -> PreparedEncoder:
    """``cpu_encoder``'s graph (the ONNX file it runs) on ONNX Runtime's CUDA provider, with
    its identity and capabilities: for machines whose torch has no CUDA."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    try:
        session = ort.InferenceSession(
            str(onnx_file), options, providers=["CUDAExecutionProvider", "CPUExecutionProvider"]
        )
    except Exception as error:  # onnxruntime raises its own untyped errors
        raise EncoderError(f"ONNX Runtime could not load {onnx_file} on CUDA: {error}") from error
    if "CUDAExecutionProvider" not in session.get_providers():
        raise EncoderError(
            "ONNX Runtime did not start its CUDA provider (check the CUDA libraries)"
        )
    encoder = PreparedEncoder(
        cpu_encoder.identity,
        cpu_encoder.capabilities,
        session,
        normalize=cpu_encoder.normalize,
        path=onnx_file,
    )
    encoder.device = "cuda"
    encoder.runtime = "onnx-cuda"
    return encoder


def runs_on_gpu(encoder: object) -> bool:
    """Whether ``encoder`` runs its batches on a GPU (its ``device``, a name or a torch
    device, is CUDA)."""
    device = getattr(encoder, "device", "cpu")
    return str(getattr(device, "type", device)).startswith("cuda")
