"""The fast CPU path: OpenVINO (fp32 and bf16), its cache, its identities and its fallbacks.

Everything runs for real: the shipped Lite0 weights, OpenVINO and ONNX Runtime, real photos,
real cache files on disk. OpenVINO's absence is the ``LOOKALIKE_OPENVINO=0`` switch the code
honours; its failure is a real one (its compiled-model cache folder cannot be created).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lookalike.core.collection import Collection
from lookalike.encoders import create_encoder
from lookalike.encoders.efficientnet_lite import EfficientNetLiteEncoder
from lookalike.encoders.openvino_runtime import (
    DISABLE_ENV,
    OpenVinoEncoder,
    bf16_native,
    load_lite_prepared,
    openvino_available,
    openvino_folder,
    record_fp32_runtime,
    recorded_fp32_runtime,
)
from lookalike.errors import EncoderError
from tests.conftest import PHOTO_NAMES, photo, unit

pytestmark = pytest.mark.skipif(not openvino_available(), reason="OpenVINO is not usable here")
needs_bf16 = pytest.mark.skipif(not bf16_native(), reason="this CPU has no native bf16")
LITE = "efficientnet-lite0"


@pytest.fixture(scope="module")
def photos() -> list:
    return [photo(name) for name in PHOTO_NAMES]


@pytest.fixture(scope="module")
def fp32_onnx():
    """The seed path: fp32 on ONNX Runtime, GeM as collections use it."""
    return create_encoder(LITE, pooling="gem", normalize=False, runtime="onnx", precision="fp32")


@pytest.fixture
def own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A cache folder of this test's own, so what it damages no other test sees."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("LOOKALIKE_CACHE", str(cache))
    return cache


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(unit(a) * unit(b), axis=1)


def test_openvino_fp32_is_the_same_encoder_as_onnx_runtime(photos, fp32_onnx) -> None:
    openvino = create_encoder(
        LITE, pooling="gem", normalize=False, runtime="openvino", precision="fp32"
    )
    assert openvino.runtime == "openvino" and fp32_onnx.runtime == "onnx"
    # Interchangeable within float rounding, so one identity: collections indexed on one
    # runtime are searched on the other.
    assert openvino.identity == fp32_onnx.identity
    a, b = fp32_onnx.embed(photos), openvino.embed(photos)
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4)
    assert cosines(a, b).min() > 0.99999


@needs_bf16
def test_bf16_vectors_are_close_to_fp32_but_another_identity(photos, fp32_onnx) -> None:
    bf16 = create_encoder(LITE, pooling="gem", normalize=False, precision="bf16")
    assert bf16.runtime == "openvino"
    assert bf16.identity.precision == "bf16" and fp32_onnx.identity.precision == "fp32"
    assert bf16.identity.key == fp32_onnx.identity.key + "/bf16"
    similarity = cosines(fp32_onnx.embed(photos), bf16.embed(photos))
    assert similarity.min() > 0.99
    # Close is not equal: that is why the identities differ.
    assert similarity.min() < 0.99999


def test_identity_keys_of_fp32_vectors_do_not_change(fp32_onnx) -> None:
    # Collections indexed before precision existed keep finding their vectors.
    assert fp32_onnx.identity.key == "efficientnet-lite0/head/1280/" + (
        fp32_onnx.identity.weights_sha256[:12] + "/gem"
    )


@needs_bf16
def test_prepared_encoder_is_reused_without_torch(own_cache: Path, photos) -> None:
    code = (
        "import sys, json\n"
        "from lookalike.encoders import create_encoder\n"
        "e = create_encoder('efficientnet-lite0', pooling='gem', precision='auto')\n"
        "v = e.embed_pixels(__import__('numpy').zeros((1, 224, 224, 3), 'uint8'))\n"
        "print(json.dumps([type(e).__name__, e.identity.key, 'torch' in sys.modules,"
        " v[0, :4].tolist()]))\n"
    )
    env = dict(os.environ, LOOKALIKE_CACHE=str(own_cache))

    def run() -> list:
        done = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
        )
        return json.loads(done.stdout.strip().splitlines()[-1])

    first = run()
    assert first[0] == "EfficientNetLiteEncoder" and first[2]  # built the full way
    exported = sorted((own_cache / "onnx").glob("*.onnx"))
    manifests = sorted(openvino_folder().glob("*.json"))
    stamps = [p.stat().st_mtime_ns for p in (*exported, *manifests)]
    second = run()
    assert second[0] == "OpenVinoEncoder" and not second[2]  # no torch this time
    assert second[1] == first[1] and second[1].endswith("/bf16")
    np.testing.assert_allclose(second[3], first[3], rtol=1e-5, atol=1e-6)
    # Nothing was exported or recorded again.
    assert [p.stat().st_mtime_ns for p in (*exported, *manifests)] == stamps


@needs_bf16
def test_damaged_cache_files_are_rebuilt(own_cache: Path, photos) -> None:
    options = {"pooling": "gem", "normalize": False, "precision": "bf16"}
    expected = create_encoder(LITE, **options).embed(photos[:2])
    (exported,) = (own_cache / "onnx").glob("*.onnx")
    (manifest,) = openvino_folder().glob("*.json")

    exported.write_bytes(exported.read_bytes()[:5000])  # a truncated export
    assert load_lite_prepared(LITE, **options) is None  # the manifest no longer vouches
    rebuilt = create_encoder(LITE, **options)
    assert isinstance(rebuilt, EfficientNetLiteEncoder)
    assert exported.stat().st_size > 1_000_000  # exported again
    np.testing.assert_allclose(rebuilt.embed(photos[:2]), expected, rtol=1e-5, atol=1e-5)

    manifest.write_text("{not json", encoding="utf-8")
    assert load_lite_prepared(LITE, **options) is None
    assert not manifest.exists()  # a damaged manifest is dropped ...
    create_encoder(LITE, **options)
    assert json.loads(manifest.read_text(encoding="utf-8"))["identity"]["precision"] == "bf16"
    prepared = load_lite_prepared(LITE, **options)  # ... and written again
    assert isinstance(prepared, OpenVinoEncoder)
    np.testing.assert_allclose(prepared.embed(photos[:2]), expected, rtol=1e-5, atol=1e-5)


def test_automatic_choice_without_openvino(
    own_cache: Path, monkeypatch: pytest.MonkeyPatch, photos, fp32_onnx
) -> None:
    monkeypatch.setenv(DISABLE_ENV, "0")
    assert not openvino_available()
    encoder = create_encoder(LITE, pooling="gem", normalize=False, precision="auto")
    assert encoder.runtime == "onnx"
    assert encoder.identity == fp32_onnx.identity  # fp32: the only precision left
    with pytest.raises(EncoderError, match="OpenVINO"):
        create_encoder(LITE, pooling="gem", precision="bf16")
    with pytest.raises(EncoderError, match="turned off"):
        create_encoder(LITE, pooling="gem", runtime="openvino")


def test_automatic_choice_when_openvino_fails(own_cache: Path, photos, fp32_onnx) -> None:
    # OpenVINO cannot create its compiled-model cache: it refuses to compile.
    own_cache.mkdir()
    (own_cache / "openvino").write_text("a file where OpenVINO wants a folder")
    encoder = create_encoder(LITE, pooling="gem", normalize=False, precision="auto")
    assert encoder.runtime == "onnx" and encoder.identity == fp32_onnx.identity
    np.testing.assert_allclose(encoder.embed(photos[:2]), fp32_onnx.embed(photos[:2]), atol=1e-4)
    # Asked for explicitly, the failure is reported, never swapped for other vectors.
    with pytest.raises(EncoderError, match="OpenVINO could not compile"):
        create_encoder(LITE, pooling="gem", runtime="openvino")
    if bf16_native():
        with pytest.raises(EncoderError, match="OpenVINO could not compile"):
            create_encoder(LITE, pooling="gem", precision="bf16")


def test_fp32_runtime_choice_is_measured_once_and_honoured(own_cache: Path) -> None:
    assert recorded_fp32_runtime() is None
    first = create_encoder(LITE, pooling="gem", precision="fp32")
    recorded = recorded_fp32_runtime()
    assert recorded in ("openvino", "onnx") and first.runtime == recorded
    figures = json.loads((openvino_folder() / "fp32-runtime.json").read_text())
    assert set(figures["cpu_ms_per_image"]) == {"openvino", "onnx"}
    # Where ONNX Runtime measured faster, auto takes it (same vectors either way).
    assert record_fp32_runtime({"openvino": 9.0, "onnx": 3.0}) == "onnx"
    assert create_encoder(LITE, pooling="gem", precision="fp32").runtime == "onnx"
    assert record_fp32_runtime({"openvino": 3.0, "onnx": 9.0}) == "openvino"
    assert create_encoder(LITE, pooling="gem", precision="fp32").runtime == "openvino"


@needs_bf16
def test_collection_records_its_precision_and_keeps_it(
    tmp_path: Path, photo_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "c"
    with Collection(path, index_spec="exact") as collection:
        collection.index(photo_dir, workers=0)
        assert collection.catalog.get_setting("precision") == "bf16"
        assert collection.encoder.identity.key.endswith("/bf16")
        query = photo_dir / "astronaut.jpg"
        assert collection.search(query, k=1).results[0].path == str(query)

    # Without OpenVINO the bf16 collection is refused, not searched with fp32 vectors.
    monkeypatch.setenv(DISABLE_ENV, "0")
    with Collection(path) as collection, pytest.raises(EncoderError, match="OpenVINO"):
        collection.search(query, k=1)
    monkeypatch.delenv(DISABLE_ENV)

    # Another precision is a model switch: every image is embedded again, then it answers.
    with Collection(path, precision="fp32") as collection:
        assert collection.switching_to is not None
        report = collection.index(photo_dir, workers=0)
        assert report.switch == "done" and report.updated + report.added == len(PHOTO_NAMES)
    with Collection(path) as collection:
        assert collection.catalog.get_setting("precision") == "fp32"
        assert not collection.encoder.identity.key.endswith("/bf16")
        assert collection.search(query, k=1).results[0].path == str(query)


def test_collection_made_before_precision_existed_stays_fp32(
    tmp_path: Path, photo_dir: Path, collection_encoder
) -> None:
    path = tmp_path / "old"
    with Collection(path, index_spec="exact", encoder=collection_encoder) as collection:
        collection.index(photo_dir, workers=0)
    with Collection(path) as collection:
        collection.catalog.set_settings({"precision": None})  # as an older version left it
    with Collection(path) as collection:
        assert collection.switching_to is None
        assert collection.encoder.identity == collection_encoder.identity
        report = collection.index(photo_dir, workers=0)
        assert report.unchanged == len(PHOTO_NAMES) and report.embedded == 0


@needs_bf16
def test_bf16_keeps_the_first_stages_in_fp32(photos, fp32_onnx) -> None:
    from lookalike.encoders.openvino_runtime import OpenVinoRunner

    mixed = create_encoder(LITE, pooling="gem", normalize=False, precision="bf16")
    runner = mixed.openvino_runner()
    assert runner is not None and runner.fp32_until == "/_blocks.0/"  # the end of stage 1
    assert len(runner.compiled) == 2
    # The same graph in bf16 throughout is measurably further from fp32.
    plain = OpenVinoRunner(runner.path, precision="bf16")
    pixels = np.stack([np.asarray(p.resize((224, 224))) for p in photos])
    reference = fp32_onnx.embed_pixels(pixels)
    error_mixed = 1 - cosines(reference, mixed.embed_pixels(pixels))
    error_plain = 1 - cosines(reference, plain(pixels))
    # Measured on these photos: mean 0.00037 against 0.00091, worst 0.00053 against 0.0018.
    assert error_mixed.mean() < error_plain.mean() / 1.5
    assert error_mixed.max() < error_plain.max() / 1.5


def test_multi_scale_extraction_stays_fp32(fp32_onnx) -> None:
    encoder = create_encoder(LITE, scales="1,0.707", precision="auto")
    assert encoder.identity.precision == "fp32"
    with pytest.raises(EncoderError, match="single-scale"):
        create_encoder(LITE, scales="1,0.707", precision="bf16")


def test_runtimes_without_bf16_compute_fp32(fp32_onnx) -> None:
    eager = create_encoder(LITE, pooling="gem", normalize=False, runtime="torch", precision="auto")
    assert eager.runtime == "torch" and eager.identity == fp32_onnx.identity
    with pytest.raises(EncoderError, match="OpenVINO"):
        create_encoder(LITE, pooling="gem", runtime="onnx", precision="bf16")
