"""The GPU path's CPU side, which every machine can run: ``--device cuda`` without a GPU is a
clear typed error, ``--device auto`` falls back to the CPU with the CPU's vectors, and the
worker-process decoder a GPU run uses gives exactly what the decoding threads give.

A GPU run itself is measured by ``benchmarks/gpu_index.py`` on a machine that has one.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import PHOTO_NAMES, photo

from lookalike.cli.main import main as lookalike_main
from lookalike.core.collection import Collection
from lookalike.core.ingest import ThreadExecutor, decode_all
from lookalike.encoders import create_encoder
from lookalike.encoders.devices import (
    gpu_backend,
    onnxruntime_has_cuda,
    runs_on_gpu,
    torch_sees_cuda,
)
from lookalike.encoders.prepared import PreparedEncoder
from lookalike.errors import EncoderError

GPU_HERE = torch_sees_cuda() or onnxruntime_has_cuda()
no_gpu = pytest.mark.skipif(GPU_HERE, reason="this machine has a usable CUDA GPU")


@no_gpu
def test_device_cuda_without_a_gpu_is_a_typed_error_naming_what_is_missing() -> None:
    with pytest.raises(EncoderError, match="no CUDA GPU can be used here"):
        gpu_backend("cuda")
    with pytest.raises(EncoderError, match="CUDAExecutionProvider"):
        create_encoder("efficientnet-lite0", device="cuda")
    assert gpu_backend("auto") is None and gpu_backend("cpu") is None


@no_gpu
def test_index_device_cuda_without_a_gpu_fails_cleanly(photo_dir: Path, tmp_path: Path) -> None:
    collection = tmp_path / "c"
    command = ["-c", str(collection), "index", str(photo_dir), "--device", "cuda", "-q"]
    done = subprocess.run(
        [sys.executable, "-m", "lookalike.cli", *command],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 1
    assert done.stderr.startswith("lookalike: error: device 'cuda' was asked for")
    assert "Traceback" not in done.stderr


def stored(collection: Path) -> dict[str, tuple[Any, ...]]:
    """Every image of a collection by file name: its record's fields and its vector."""
    with Collection(collection) as opened:
        catalog = opened.catalog
        ids, vectors = catalog.vectors(opened.model_id)
        records = catalog.images([int(i) for i in ids])
        found = {}
        for image_id, vector in zip(ids, vectors, strict=True):
            record = records[int(image_id)]
            fields = (record.content_hash, record.size, record.mtime, record.width, record.height)
            found[Path(record.path).name] = (*fields, record.metadata, vector)
        return found


def assert_same_images(a: dict[str, tuple[Any, ...]], b: dict[str, tuple[Any, ...]]) -> None:
    assert sorted(a) == sorted(b) == sorted(f"{name}.jpg" for name in PHOTO_NAMES)
    for name in a:
        assert a[name][:-1] == b[name][:-1], name
        np.testing.assert_array_equal(a[name][-1], b[name][-1])


@no_gpu
def test_device_auto_falls_back_to_the_cpu_with_the_same_vectors(
    photo_dir: Path, tmp_path: Path
) -> None:
    for device in ("auto", "cpu"):
        command = ["-c", str(tmp_path / device), "index", str(photo_dir), "--device", device]
        assert lookalike_main([*command, "-q", "--runtime", "onnx", "--precision", "fp32"]) == 0
    assert_same_images(stored(tmp_path / "auto"), stored(tmp_path / "cpu"))


def test_the_process_pool_decoder_gives_what_the_threads_give(
    photo_dir: Path, tmp_path: Path, collection_encoder: Any
) -> None:
    for name, processes in (("threads", False), ("processes", True)):
        with Collection(tmp_path / name, encoder=collection_encoder) as collection:
            report = collection.index(
                photo_dir, executor=ThreadExecutor(workers=2, processes=processes), batch_size=4
            )
            assert report.added == len(PHOTO_NAMES) and not report.failed
    assert_same_images(stored(tmp_path / "threads"), stored(tmp_path / "processes"))


def test_the_process_pool_decoder_keeps_the_order_and_reports_failures(
    photo_dir: Path, tmp_path: Path
) -> None:
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a JPEG at all")
    paths = sorted(str(p) for p in photo_dir.rglob("*.jpg"))
    paths.insert(2, str(broken))
    config = create_encoder("efficientnet-lite0", runtime="onnx").preprocess
    by_threads = list(decode_all(paths, config, workers=2, chunk=2))
    by_processes = list(decode_all(paths, config, workers=2, chunk=2, processes=True))
    assert [d.path for d in by_processes] == paths
    assert by_processes[2].error is not None and by_processes[2].error == by_threads[2].error
    for a, b in zip(by_threads, by_processes, strict=True):
        assert a.record == b.record
        if a.pixels is not None:
            np.testing.assert_array_equal(a.pixels, b.pixels)


def test_an_encoder_on_a_gpu_is_told_apart_from_one_on_the_cpu() -> None:
    import torch

    cpu = create_encoder("efficientnet-lite0", runtime="onnx", normalize=False)
    assert not runs_on_gpu(cpu)
    assert runs_on_gpu(type("OnGpu", (), {"device": torch.device("cuda")})())
    assert runs_on_gpu(type("OnGpu", (), {"device": "cuda:1"})())
    if isinstance(cpu, PreparedEncoder):
        assert cpu.device == "cpu"
    assert not runs_on_gpu(photo("coffee"))  # anything without a device runs on the CPU
