"""OpenVINO: the fast CPU runtime for exported encoders, and the bf16 arithmetic it enables.

On the CPU this project is measured on (AVX-512 with VNNI and BF16, AMX), OpenVINO runs the
exported EfficientNet-Lite graph in fp32 about 1.7x faster than ONNX Runtime, with the same
vectors (the largest difference on unit vectors is about 3e-7). In bf16, with the first
stage kept in fp32, it is about 3x faster than ONNX Runtime in fp32 (3.9 against 12.3 CPU-ms
per image inside ingest), with vectors at a mean cosine of 0.9995 to fp32
(benchmarks/results/index_throughput.md). fp32 on either runtime is one encoder identity, and
bf16 is another (``EncoderIdentity.precision``): a bf16 collection is never searched or
extended with fp32 vectors, or the reverse.

Nothing here imports torch: an encoder built once leaves a manifest (its identity, the ONNX
file it runs, the files that made it), and later builds with the same options load it with
OpenVINO alone (:func:`load_openvino_prepared`); OpenVINO's own cache keeps the compiled
model, so a later start compiles nothing.

``LOOKALIKE_OPENVINO=0`` makes OpenVINO count as absent (the automatic choice then takes ONNX
Runtime and fp32), the way a machine without it behaves.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import platform
import queue
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from lookalike.encoders.base import Encoder, EncoderBase, EncoderCapabilities, EncoderIdentity
from lookalike.errors import EncoderError

_log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "bf16")
# "auto" picks bf16 where this CPU does it natively and OpenVINO runs, else fp32.
PRECISION_CHOICES = ("auto", *PRECISIONS)
DISABLE_ENV = "LOOKALIKE_OPENVINO"
# Bump when the manifest or the way the model is compiled changes.
MANIFEST_VERSION = 2
_OV_HINTS = {"fp32": "f32", "bf16": "bf16"}


def _cache_root() -> Path:
    """$LOOKALIKE_CACHE, else ~/.cache/lookalike (the folder every exported model is kept in;
    repeated here so that finding a prepared model imports no torch)."""
    return Path(os.environ.get("LOOKALIKE_CACHE") or Path.home() / ".cache" / "lookalike")


def openvino_folder() -> Path:
    """OpenVINO's compiled-model cache and the manifests of prepared encoders."""
    return _cache_root() / "openvino"


def openvino_disabled() -> bool:
    """Whether ``LOOKALIKE_OPENVINO`` turns OpenVINO off (0, off, false, no)."""
    return os.environ.get(DISABLE_ENV, "").strip().lower() in ("0", "off", "false", "no")


@functools.cache
def _core() -> Any:
    # openvino's __init__ also imports its model converter (and that its telemetry), about a
    # third of a second that a cold start pays for nothing: that import is skipped here (the
    # package catches the ImportError) and left importable for anyone who wants it later.
    skip = "openvino" not in sys.modules and "openvino.tools.ovc" not in sys.modules
    if skip:
        sys.modules["openvino.tools.ovc"] = None  # type: ignore[assignment]
    try:
        import openvino
    finally:
        if skip:
            del sys.modules["openvino.tools.ovc"]
    return openvino.Core()


def openvino_core() -> Any | None:
    """The process's OpenVINO ``Core``, or None when OpenVINO is turned off, missing or
    broken (its import or its CPU plugin fails)."""
    if openvino_disabled():
        return None
    try:
        return _core()
    except Exception as error:  # ImportError, or OpenVINO's own untyped errors
        _log.debug("OpenVINO is unusable: %s", error)
        return None


def openvino_available() -> bool:
    """True when OpenVINO can run models here (installed, working, not turned off)."""
    return openvino_core() is not None


@functools.cache
def _capabilities(core: Any) -> tuple[str, ...]:
    try:
        return tuple(core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
    except Exception:  # no CPU plugin: nothing is native
        return ()


def bf16_native() -> bool:
    """Whether this CPU computes bf16 natively through OpenVINO (AVX512-BF16 or AMX)."""
    core = openvino_core()
    return core is not None and "BF16" in _capabilities(core)


def check_precision(precision: str) -> None:
    """``EncoderError`` for a precision that is not one of ``PRECISION_CHOICES``."""
    if precision not in PRECISION_CHOICES:
        raise EncoderError(
            f"unknown precision {precision!r}; choose one of {', '.join(PRECISION_CHOICES)}"
        )


def default_precision(runtime: str = "auto") -> str:
    """What ``precision="auto"`` means for a CPU encoder on ``runtime`` here: bf16 where
    OpenVINO runs and the CPU has bf16 instructions, else fp32."""
    if runtime in ("auto", "openvino") and bf16_native():
        return "bf16"
    return "fp32"


def planned_cpu_runtime(runtime: str, precision: str) -> str:
    """The runtime a CPU encoder asked for ``runtime`` and ``precision`` runs on: for ``auto``,
    OpenVINO for bf16 (nothing else runs it) and, for fp32, whichever of OpenVINO and ONNX
    Runtime measured faster on this machine (:func:`recorded_fp32_runtime`; OpenVINO until
    measured), ONNX Runtime where OpenVINO is unusable; else ``runtime`` itself."""
    if runtime != "auto":
        return runtime
    if precision == "bf16":
        return "openvino"
    if not openvino_available():
        return "onnx"
    return recorded_fp32_runtime() or "openvino"


@functools.cache
def _machine() -> str:
    """This CPU's model and instruction flags, and the runtimes' versions, as a digest: a
    speed comparison holds only for the machine and versions it was made on."""
    parts = [platform.machine()]
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
            for line in handle:
                name, _, value = line.partition(":")
                if name.strip() in ("model name", "flags"):
                    parts.append(" ".join(sorted(value.split())))
                if not line.strip():
                    break  # the first processor is enough
    except OSError:
        parts.append(platform.processor())
    for package in ("openvino", "onnxruntime"):
        try:
            parts.append(f"{package}={metadata.version(package)}")
        except metadata.PackageNotFoundError:
            parts.append(f"{package}=none")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def _choice_path() -> Path:
    return openvino_folder() / "fp32-runtime.json"


def recorded_fp32_runtime() -> str | None:
    """The fp32 CPU runtime measured faster on this machine ("openvino" or "onnx"), or None
    when not measured yet (or measured on another CPU or other runtime versions)."""
    try:
        data = json.loads(_choice_path().read_text(encoding="utf-8"))
        if data["machine"] == _machine() and data["choice"] in ("openvino", "onnx"):
            return str(data["choice"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def record_fp32_runtime(cpu_ms: Mapping[str, float]) -> str:
    """Record the faster of the runtimes timed in ``cpu_ms`` (CPU milliseconds per image) for
    this machine; returns it."""
    choice = min(cpu_ms, key=lambda name: cpu_ms[name])
    data = {"machine": _machine(), "choice": choice, "cpu_ms_per_image": dict(cpu_ms)}
    try:
        _write_json(_choice_path(), data)
    except OSError as error:
        _log.debug("could not record the runtime choice: %s", error)
    return choice


def cpu_ms_per_image(run: Callable[[np.ndarray], np.ndarray], pixels: np.ndarray) -> float:
    """CPU time (every thread of the process) ``run`` takes per image of ``pixels``, the best
    of three after a warm-up: CPU time, not wall time, because ingest keeps every core busy
    and a busy machine stretches wall time for both runtimes alike."""
    run(pixels)
    best = float("inf")
    for _ in range(3):
        started = time.process_time()
        run(pixels)
        best = min(best, time.process_time() - started)
    return 1000.0 * best / len(pixels)


def _write_json(path: Path, data: Any) -> None:
    """Write ``data`` as JSON atomically (readers in other processes see all or nothing)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(dir=path.parent, suffix=".json.part")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            json.dump(data, out, indent=1)
        os.replace(temp, path)
    finally:
        Path(temp).unlink(missing_ok=True)


class OpenVinoRunner:
    """Runs an ONNX file with OpenVINO on the CPU in fp32 or bf16 arithmetic.

    bf16 with ``fp32_until`` is mixed: the graph is cut after the last node whose name starts
    with ``fp32_until``; what comes before runs in fp32, the rest in bf16. bf16's largest
    errors come from the first, high-resolution layers (benchmarks/results/
    index_throughput.md), so keeping those fp32 buys most of the accuracy back cheaply.

    Compiled models are cached by OpenVINO under :func:`openvino_folder` (keyed by the model,
    the settings and the OpenVINO version), so only the first start compiles. Calls may come
    from several threads: each takes idle sets of inference requests (or makes them).
    """

    def __init__(
        self,
        path: Path,
        *,
        precision: str,
        threads: int | None = None,
        fp32_until: str | None = None,
    ) -> None:
        if precision not in PRECISIONS:
            raise EncoderError(f"OpenVINO runs fp32 or bf16, not {precision!r}")
        core = openvino_core()
        if core is None:
            why = "turned off by LOOKALIKE_OPENVINO" if openvino_disabled() else "not usable"
            raise EncoderError(f"OpenVINO is {why} here")
        if precision == "bf16" and not bf16_native():
            raise EncoderError(
                "bf16 needs a CPU with bf16 instructions (AVX512-BF16 or AMX); this one has none"
            )
        self.path = path
        self.precision = precision
        self.fp32_until = fp32_until if precision == "bf16" else None
        threads = threads or os.cpu_count() or 1
        # One stream per thread, each single-threaded: a batch is cut into that many chunks
        # run at once. Threads that share one stream meet at barriers after every layer and
        # spin there while the decoding threads hold the cores: measured 7.0-7.4 CPU-ms per
        # image in ingest this way, 7.8-8.0 with one two-thread stream.
        self.streams = threads
        try:
            if self.fp32_until is None:
                parts: list[tuple[Any, str]] = [(str(path), precision)]
            else:
                head, tail = _parts(core, path, self.fp32_until)
                parts = [(head, "fp32"), (tail, "bf16")]
            self.compiled = [
                core.compile_model(model, "CPU", _config(part_precision, threads, self.streams))
                for model, part_precision in parts
            ]
        except EncoderError:
            raise
        except Exception as error:  # OpenVINO raises its own untyped errors
            raise EncoderError(f"OpenVINO could not compile {path}: {error}") from error
        self._idle: queue.SimpleQueue[list[Any]] = queue.SimpleQueue()

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        chunks = np.array_split(pixels, max(1, min(self.streams, len(pixels))))
        lanes = [self._lane() for _ in chunks]
        try:
            inputs: list[np.ndarray] = chunks
            for part in range(len(self.compiled)):
                # Each chunk on its own stream (one thread each), all at once; a cut's
                # activations go from one part to the next without a copy.
                for lane, data in zip(lanes, inputs, strict=True):
                    lane[part].start_async({0: data}, share_inputs=True)
                for lane in lanes:
                    lane[part].wait()
                inputs = [lane[part].get_output_tensor(0).data for lane in lanes]
            features = np.concatenate(inputs).astype(np.float32, copy=True)
        finally:
            for lane in lanes:
                self._idle.put(lane)
        return features

    def _lane(self) -> list[Any]:
        """An idle set of requests, one per part (made when none is idle)."""
        try:
            return self._idle.get_nowait()
        except queue.Empty:
            return [compiled.create_infer_request() for compiled in self.compiled]


def _config(precision: str, threads: int, streams: int) -> dict[str, Any]:
    return {
        "INFERENCE_PRECISION_HINT": _OV_HINTS[precision],
        "INFERENCE_NUM_THREADS": threads,
        "NUM_STREAMS": streams,
        # Pinned threads would fight the decoding threads for the same cores.
        "ENABLE_CPU_PINNING": False,
        "CACHE_DIR": str(openvino_folder() / "compiled"),
    }


def _parts(core: Any, path: Path, prefix: str) -> tuple[Any, Any]:
    """The two parts of the model at ``path`` cut after ``prefix`` (:func:`_cut`), as files
    made once next to the compiled-model cache: a later start compiles them from there
    without reading or cutting the graph (OpenVINO's cache then skips even the reading). Where
    they cannot be written, the parts in memory."""
    info = path.stat()
    text = f"{path.name}|{info.st_size}|{info.st_mtime_ns}|{prefix}|{MANIFEST_VERSION}"
    tag = hashlib.sha256(text.encode()).hexdigest()[:20]
    folder = openvino_folder() / "parts"
    files = (folder / f"{tag}-fp32.xml", folder / f"{tag}-bf16.xml")
    if all(f.exists() and f.with_suffix(".bin").exists() for f in files):
        return str(files[0]), str(files[1])
    models = _cut(core, path, prefix)
    try:
        import openvino

        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=folder) as temp:
            for model, target in zip(models, files, strict=True):
                staged = Path(temp) / target.name
                openvino.save_model(model, str(staged), compress_to_fp16=False)
                # The weights first: a reader that finds the .xml finds its .bin.
                os.replace(staged.with_suffix(".bin"), target.with_suffix(".bin"))
                os.replace(staged, target)
    except (OSError, RuntimeError) as error:
        _log.debug("could not keep the cut model in %s: %s", folder, error)
    return models


def _cut(core: Any, path: Path, prefix: str) -> tuple[Any, Any]:
    """The model at ``path`` as two: up to the output of the last node named ``prefix...``
    (in execution order), and from there on, reading that output as its input."""
    import openvino

    def last_node(model: Any) -> Any:
        named = [o for o in model.get_ordered_ops() if o.get_friendly_name().startswith(prefix)]
        if not named or len(named[-1].outputs()) != 1:
            raise EncoderError(f"{path} has no single node to cut the graph after ({prefix})")
        return named[-1]

    full = core.read_model(str(path))
    head = openvino.Model([last_node(full).output(0)], full.get_parameters(), "fp32 part")
    rest = core.read_model(str(path))
    cut = last_node(rest).output(0)
    maps = openvino.opset13.parameter(
        cut.get_partial_shape(), cut.get_element_type(), name="activations"
    )
    for target in list(cut.get_target_inputs()):
        target.replace_source_output(maps.output(0))
    tail = openvino.Model(rest.get_results(), [maps], "bf16 part")
    return head, tail


class OpenVinoEncoder(EncoderBase):
    """A prepared encoder: the identity and capabilities of the encoder it was made from,
    running that encoder's ONNX file on OpenVINO (loaded without torch)."""

    runtime = "openvino"

    def __init__(
        self,
        identity: EncoderIdentity,
        capabilities: EncoderCapabilities,
        runner: OpenVinoRunner,
        *,
        normalize: bool,
    ) -> None:
        self.identity = identity
        self.normalize = normalize
        self._capabilities = capabilities
        self._run = runner

    @property
    def capabilities(self) -> EncoderCapabilities:
        return self._capabilities

    @property
    def precision(self) -> str:
        return self.identity.precision

    def openvino_runner(self) -> OpenVinoRunner:
        """The runner (as on the encoder this one was prepared from)."""
        return self._run

    def model_file(self) -> Path:
        """The exported graph OpenVINO runs."""
        return self._run.path

    def _forward(self, pixels: np.ndarray) -> np.ndarray:
        return self._run(pixels)


def manifest_key(fields: Mapping[str, Any]) -> str:
    """The manifest's file stem for an encoder built with ``fields`` (its family, name and
    the options that shape its graph and arithmetic)."""
    text = json.dumps({"fields": dict(fields), "version": MANIFEST_VERSION}, sort_keys=True)
    return cache_stem(fields, text)


def cache_stem(fields: Mapping[str, Any], described: str) -> str:
    """A cache file's stem: the model's name made file-safe, and a hash of ``described``
    (everything that decides the cached file's content)."""
    name = str(fields.get("name", "model"))
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
    return f"{safe}-{hashlib.sha256(described.encode()).hexdigest()[:20]}"


def file_state(path: Path) -> list[Any]:
    """What tells a source file changed since a cache was built: path, size, mtime."""
    info = path.stat()
    return [str(path), info.st_size, info.st_mtime_ns]


def files_unchanged(states: Iterable[Any]) -> bool:
    """Whether every file :func:`file_state` recorded is still as it was."""
    for path, size, mtime_ns in states:
        try:
            info = os.stat(path)
        except OSError:
            return False
        if info.st_size != size or info.st_mtime_ns != mtime_ns:
            return False
    return True


def load_openvino_prepared(
    fields: Mapping[str, Any], *, normalize: bool, threads: int | None = None
) -> OpenVinoEncoder | None:
    """The encoder prepared for ``fields``, loaded without torch, or None when there is none
    that can be trusted (OpenVINO off, no manifest, its sources changed, its model file
    differs or does not compile): then the caller builds it the full way and calls
    :func:`save_openvino_prepared`. A damaged manifest is deleted."""
    if not openvino_available():
        return None
    path = openvino_folder() / f"{manifest_key(fields)}.json"
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        model = manifest["model"]
        if manifest.get("fields") != json.loads(json.dumps(dict(fields))):
            raise ValueError("made for other options")
        if not files_unchanged([*manifest["sources"], model["state"]]):
            return None  # made from other files: the full build prepares it again
        identity = EncoderIdentity.from_json(manifest["identity"])
        capabilities = EncoderCapabilities.from_json(manifest["capabilities"])
        runner = OpenVinoRunner(
            Path(model["state"][0]),
            precision=identity.precision,
            threads=threads,
            fp32_until=model["fp32_until"],
        )
    except FileNotFoundError:
        return None
    except Exception as error:  # a damaged manifest, or a model OpenVINO refuses
        _log.debug("prepared OpenVINO model %s is unusable (%s); prepared again", path, error)
        with contextlib.suppress(OSError):  # the folder itself may be what is broken
            path.unlink(missing_ok=True)
        return None
    return OpenVinoEncoder(identity, capabilities, runner, normalize=normalize)


def save_openvino_prepared(
    fields: Mapping[str, Any], encoder: Encoder, model_file: Path, sources: Iterable[Path]
) -> Path | None:
    """Record that ``encoder`` (built the full way, running ``model_file`` on OpenVINO: its
    ``openvino_runner()`` says how) is what ``fields`` build, valid while ``model_file`` and
    the ``sources`` files stay as they are. Returns the manifest's path, or None when it
    could not be written or the encoder does not run that file on OpenVINO (never an error:
    the encoder works without it)."""
    folder = openvino_folder()
    runner = getattr(encoder, "openvino_runner", lambda: None)()
    if not isinstance(runner, OpenVinoRunner) or runner.path != model_file:
        return None
    try:
        manifest = {
            "version": MANIFEST_VERSION,
            "fields": json.loads(json.dumps(dict(fields))),
            "identity": encoder.identity.to_json(),
            "capabilities": encoder.capabilities.to_json(),
            "model": {"state": file_state(runner.path), "fp32_until": runner.fp32_until},
            "sources": [file_state(Path(s)) for s in sources],
        }
        path = folder / f"{manifest_key(fields)}.json"
        _write_json(path, manifest)
    except (OSError, TypeError, ValueError) as error:
        _log.debug("could not record the prepared OpenVINO model: %s", error)
        return None
    return path


def lite_fields(
    name: str,
    layer: str,
    pooling: str | None,
    scales: str | Sequence[float] | None,
    precision: str,
    runtime: str,
) -> dict[str, Any]:
    """What names a prepared EfficientNet-Lite encoder: the factory's options that shape its
    graph and its arithmetic (not threads, not normalisation)."""
    return {
        "family": "efficientnet-lite",
        "name": name,
        "layer": layer,
        "pooling": pooling,
        "scales": scales if scales is None or isinstance(scales, str) else list(scales),
        "precision": precision,
        "runtime": runtime,
    }


def load_lite_prepared(
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
) -> OpenVinoEncoder | None:
    """The EfficientNet-Lite encoder these options build, loaded without torch when an
    earlier build ran it on OpenVINO and left its manifest; None otherwise (then build it
    with ``create_lite_encoder``, which leaves the manifest for next time)."""
    if device not in ("cpu", "auto") or runtime not in ("auto", "openvino"):
        return None
    if device == "auto" and cuda_possible():
        return None  # the full build decides whether torch sees a GPU
    check_precision(precision)
    chosen = default_precision(runtime) if precision == "auto" else precision
    if planned_cpu_runtime(runtime, chosen) != "openvino":
        return None
    fields = lite_fields(name, layer, pooling, scales, precision, runtime)
    return load_openvino_prepared(fields, normalize=normalize, threads=threads)


def cuda_possible() -> bool:
    """Whether this machine may have a GPU that torch would use for ``device="auto"``,
    decided without importing torch (a driver's device files): when it may, an ``auto``
    encoder is built the full way, which picks the GPU if there is one."""
    if os.name == "nt":
        system = os.environ.get("SYSTEMROOT", r"C:\Windows")
        return os.path.exists(os.path.join(system, "System32", "nvcuda.dll"))
    return any(os.path.exists(p) for p in ("/dev/nvidiactl", "/proc/driver/nvidia", "/dev/kfd"))
