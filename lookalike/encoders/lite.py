"""The EfficientNet-Lite family as the registry sees it: its names and its factory, without
torch.

The network, its weights and its runners live in :mod:`lookalike.encoders.efficientnet_lite`,
which imports torch. The registry reads a factory's signature to know the options it takes,
and a cold ``lookalike search`` needs only a prepared model, so the factory is here: it loads
the prepared encoder of the runtime the full build would choose when one can be trusted (an
OpenVINO one, :mod:`lookalike.encoders.openvino_runtime`, or an ONNX Runtime graph optimised
for this machine, :mod:`lookalike.encoders.prepared`), and otherwise builds the encoder the
full way, which prepares it for next time. Its signature and ``LITE_NAMES`` are kept equal to
``create_lite_encoder``'s and ``VARIANTS``' (a test checks).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lookalike.encoders import openvino_runtime
from lookalike.encoders.base import Encoder
from lookalike.encoders.devices import (
    DEVICES,
    GpuBackend,
    gpu_backend,
    onnx_cuda_encoder,
    onnxruntime_has_cuda,
)
from lookalike.encoders.prepared import load_prepared, save_prepared
from lookalike.errors import EncoderError

LITE_NAMES = ("efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2")


def _onnx_planned(runtime: str, precision: str) -> bool:
    """Whether a CPU build of ``runtime`` and ``precision`` runs fp32 on ONNX Runtime."""
    if runtime not in ("auto", "onnx"):
        return False
    if precision == "auto":
        precision = openvino_runtime.default_precision(runtime)
    return precision == "fp32" and openvino_runtime.planned_cpu_runtime(runtime, "fp32") == "onnx"


def create_lite(
    name: str,
    *,
    layer: str = "head",
    pooling: str | None = None,
    scales: str | Sequence[float] | None = None,
    precision: str = "fp32",
    normalize: bool = True,
    runtime: str = "auto",
    device: str = "auto",
    threads: int | None = None,
) -> Encoder:
    """The registry's factory for ``efficientnet-lite0/1/2``: the prepared encoder when there
    is one, else :func:`lookalike.encoders.efficientnet_lite.create_lite_encoder`."""
    options: dict[str, Any] = {"layer": layer, "pooling": pooling, "scales": scales}
    options |= {"precision": precision, "normalize": normalize, "runtime": runtime}
    options |= {"device": device, "threads": threads}
    if device not in DEVICES and not device.startswith("cuda:"):
        from lookalike.encoders.efficientnet_lite import create_lite_encoder

        return create_lite_encoder(name, **options)  # another torch device, e.g. "mps"
    backend = gpu_backend(device)  # None: the CPU (decided without torch where no GPU is)
    if backend is not None:
        return _on_gpu(name, backend, options)
    options["device"] = "cpu"
    fast = openvino_runtime.load_lite_prepared(name, **options)
    if fast is not None:
        return fast
    onnx = _onnx_planned(runtime, precision)
    fields = prepared_fields(name, layer=layer, pooling=pooling, scales=scales, precision=precision)
    if onnx:
        prepared = load_prepared(fields, normalize=normalize, threads=threads)
        if prepared is not None:
            return prepared
    from lookalike.encoders.efficientnet_lite import create_lite_encoder, lite_sources

    encoder = create_lite_encoder(name, **options)
    took = encoder.identity.precision
    # Prepared under the precision asked for and, for an "auto" build, the one it took: the
    # collection records that one, and its next open (a cold search) asks for it by name.
    source = encoder.onnx_source() if onnx else None
    if source is not None:
        for asked in dict.fromkeys((precision, took)):
            fields = prepared_fields(
                name, layer=layer, pooling=pooling, scales=scales, precision=asked
            )
            save_prepared(fields, encoder, source, lite_sources(name))
    model_file = encoder.model_file()
    if took != precision and model_file is not None:
        fields = openvino_runtime.lite_fields(name, layer, pooling, scales, took, runtime)
        openvino_runtime.save_openvino_prepared(fields, encoder, model_file, lite_sources(name))
    return encoder


def _on_gpu(name: str, backend: GpuBackend, options: dict[str, Any]) -> Encoder:
    """The encoder running its batches on the GPU: PyTorch (channels-last, as on the CPU
    fallback path), or the exported graph on ONNX Runtime's CUDA provider where torch has no
    CUDA. Vectors are fp32 there (bf16 is OpenVINO's, on the CPU)."""
    from lookalike.encoders.efficientnet_lite import create_lite_encoder

    precision, runtime = options["precision"], options["runtime"]
    if precision not in ("auto", "fp32"):
        raise EncoderError(f"precision {precision} runs on the CPU (OpenVINO); a GPU runs fp32")
    fp32 = {**options, "precision": "fp32"}
    device = options["device"] if options["device"] != "auto" else "cuda"
    if backend == "torch" and runtime in ("auto", "torch"):
        return create_lite_encoder(name, **{**fp32, "device": device, "runtime": "torch"})
    if runtime in ("auto", "onnx") and onnxruntime_has_cuda():
        cpu = create_lite_encoder(name, **{**fp32, "device": "cpu", "runtime": "onnx"})
        source = cpu.onnx_source()
        if source is None:
            raise EncoderError("the model has no ONNX graph to run on ONNX Runtime's CUDA provider")
        return onnx_cuda_encoder(cpu, source)
    raise EncoderError(f"runtime {runtime!r} cannot run on the GPU here; use runtime 'auto'")


def prepared_fields(
    name: str,
    *,
    layer: str,
    pooling: str | None,
    scales: str | Sequence[float] | None,
    precision: str,
) -> dict[str, Any]:
    """What names the prepared ONNX Runtime graph of a Lite encoder: the options that shape
    it (``normalize`` is applied after it, ``threads`` when loading it)."""
    return {
        "family": "efficientnet-lite",
        "name": name,
        "layer": layer,
        "pooling": pooling,
        "scales": scales if scales is None or isinstance(scales, str) else list(scales),
        "precision": precision,
    }
