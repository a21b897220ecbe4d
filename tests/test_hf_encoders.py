"""Hugging Face encoders, offline: tiny random CLIP, DINOv2, ViT and BEiT checkpoints saved to
folders with their processor (and tokenizer) configs, loaded back through ``create_encoder``."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import transformers
from conftest import photo, unit

from lookalike.core.collection import Collection
from lookalike.encoders import create_encoder
from lookalike.encoders.hf import HFEncoder, _quiet_transformers, preprocess_from_processor
from lookalike.encoders.preprocess import resize_for_model
from lookalike.encoders.runtime import file_sha256
from lookalike.errors import EncoderError

TINY = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PROJECTION = 24
PATCHES = (32 // 8) ** 2


@dataclass
class Checkpoint:
    """A saved tiny checkpoint and the in-memory transformers model it was saved from."""

    folder: Path
    model: Any
    processor: Any | None


def _byte_vocab() -> dict[str, int]:
    """A CLIP BPE vocabulary of single bytes (no merges): tiny, yet any text tokenizes."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    chars = [chr(b) for b in printable]
    chars += [chr(256 + n) for n in range(256 - len(printable))]  # GPT-2's byte-to-unicode map
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({f"{c}</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return vocab


def _save(folder: Path, model: Any, processor: Any | None = None) -> Checkpoint:
    with _quiet_transformers():
        model.save_pretrained(folder)
        if processor is not None:
            processor.save_pretrained(folder)
    return Checkpoint(folder, model.eval(), processor)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Checkpoint]:
    from transformers.models.beit.image_processing_pil_beit import BeitImageProcessorPil
    from transformers.models.bit.image_processing_pil_bit import BitImageProcessorPil
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil

    root = tmp_path_factory.mktemp("hf")
    built: dict[str, Checkpoint] = {}

    vocab = _byte_vocab()
    bos, eos = vocab["<|startoftext|>"], vocab["<|endoftext|>"]
    torch.manual_seed(0)
    clip_config = transformers.CLIPConfig(
        text_config={
            "vocab_size": len(vocab),
            "max_position_embeddings": 16,
            "bos_token_id": bos,
            "eos_token_id": eos,
            "pad_token_id": eos,
            **TINY,
        },
        vision_config={"image_size": 32, "patch_size": 8, **TINY},
        projection_dim=PROJECTION,
    )
    built["clip"] = _save(
        root / "clip-tiny",
        transformers.CLIPModel(clip_config),
        CLIPImageProcessorPil(size={"shortest_edge": 40}, crop_size={"height": 32, "width": 32}),
    )
    with _quiet_transformers():
        transformers.CLIPTokenizer(vocab=vocab, merges=[]).save_pretrained(root / "clip-tiny")

    torch.manual_seed(1)
    dinov2 = transformers.Dinov2Model(
        transformers.Dinov2Config(image_size=32, patch_size=8, **TINY)
    )
    built["dinov2"] = _save(
        root / "dinov2-tiny",
        dinov2,
        BitImageProcessorPil(
            size={"shortest_edge": 36},
            crop_size={"height": 32, "width": 32},
            image_mean=IMAGENET_MEAN,
            image_std=IMAGENET_STD,
        ),
    )
    built["dinov2-bare"] = _save(root / "dinov2-bare", dinov2)

    torch.manual_seed(2)
    built["vit"] = _save(
        root / "vit-tiny",
        transformers.ViTModel(transformers.ViTConfig(image_size=32, patch_size=8, **TINY)),
        ViTImageProcessorPil(size={"height": 32, "width": 32}),
    )
    # Fed 48 px by its processor, this ViT interpolates its 32 px position embeddings.
    built["vit-48"] = _save(
        root / "vit-48", built["vit"].model, ViTImageProcessorPil(size={"height": 48, "width": 48})
    )
    torch.manual_seed(3)
    classifier = transformers.ViTForImageClassification(
        transformers.ViTConfig(image_size=32, patch_size=8, num_labels=3, **TINY)
    )
    built["vit-classifier"] = _save(root / "vit-classifier", classifier)

    torch.manual_seed(4)
    beit_config = transformers.BeitConfig(
        image_size=32, patch_size=8, use_mean_pooling=True, **TINY
    )
    built["beit"] = _save(
        root / "beit-tiny",
        transformers.BeitModel(beit_config),
        BeitImageProcessorPil(size={"height": 32, "width": 32}, resample=2),
    )
    return built


@pytest.fixture(scope="module")
def encoders(checkpoints: dict[str, Checkpoint]) -> dict[str, HFEncoder]:
    """One raw-vector encoder per checkpoint, each at its default layer."""
    return {
        name: create_encoder(f"hf:{c.folder}", normalize=False)  # type: ignore[misc]
        for name, c in checkpoints.items()
    }


def _pixels(count: int = 3, side: int = 32) -> np.ndarray:
    return np.random.default_rng(7).integers(0, 256, (count, side, side, 3), dtype=np.uint8)


def _pixel_values(checkpoint: Checkpoint, pixels: np.ndarray) -> torch.Tensor:
    """What transformers' own image processor feeds the model for already-sized pixels."""
    if checkpoint.processor is None:  # ViT's documented defaults
        return torch.from_numpy((pixels / 255.0 - 0.5) / 0.5).permute(0, 3, 1, 2).float()
    batch = checkpoint.processor(
        images=list(pixels), do_resize=False, do_center_crop=False, return_tensors="pt"
    )
    return batch["pixel_values"]


def _reference(name: str, checkpoint: Checkpoint, layer: str, x: torch.Tensor) -> np.ndarray:
    """The pooled vector computed straight from the transformers model."""
    model = checkpoint.model
    with torch.inference_mode():
        if name == "clip":
            if layer == "embeds":
                features = model.get_image_features(pixel_values=x)
                return getattr(features, "pooler_output", features).numpy()
            return model.vision_model(pixel_values=x).pooler_output.numpy()
        out = (model.vit if name == "vit-classifier" else model)(pixel_values=x)
        hidden = out.last_hidden_state
        pooled = {
            "cls": hidden[:, 0],
            "mean": hidden[:, 1:].mean(dim=1),
            "pooler": out.pooler_output,
            "cls+mean": torch.cat([hidden[:, 0], hidden[:, 1:].mean(dim=1)], dim=1),
        }
        if name == "beit":
            pooled["mean"] = out.pooler_output  # layer-normed mean of the patch tokens
        if name == "dinov2":
            assert torch.equal(out.pooler_output, hidden[:, 0])
        return pooled[layer].numpy()


LAYERS = [
    ("clip", "embeds", PROJECTION),
    ("clip", "cls", 32),
    ("dinov2", "cls", 32),
    ("dinov2", "mean", 32),
    ("dinov2", "cls+mean", 64),
    ("vit", "pooler", 32),
    ("vit", "cls", 32),
    ("vit", "mean", 32),
    ("vit-classifier", "cls", 32),
    ("beit", "mean", 32),
    ("beit", "cls", 32),
]


@pytest.mark.parametrize(("name", "layer", "dim"), LAYERS)
def test_pooled_vectors_equal_what_transformers_computes(
    checkpoints: dict[str, Checkpoint], name: str, layer: str, dim: int
) -> None:
    checkpoint = checkpoints[name]
    encoder = create_encoder(f"hf:{checkpoint.folder}", layer=layer, normalize=False)
    pixels = _pixels()
    vectors = encoder.embed_pixels(pixels)
    assert vectors.shape == (3, dim) and vectors.dtype == np.float32
    assert encoder.identity.layer == layer and encoder.dim == dim
    expected = _reference(name, checkpoint, layer, _pixel_values(checkpoint, pixels))
    np.testing.assert_allclose(vectors, expected, rtol=1e-4, atol=1e-5)
    assert not np.allclose(vectors[0], vectors[1], atol=1e-3)  # images are told apart


def test_other_input_sizes_interpolate_position_embeddings(
    checkpoints: dict[str, Checkpoint], encoders: dict[str, HFEncoder]
) -> None:
    encoder = encoders["vit-48"]
    assert encoder.preprocess.resolution == 48
    pixels = _pixels(side=48)
    with torch.inference_mode():
        x = _pixel_values(checkpoints["vit-48"], pixels)
        out = checkpoints["vit"].model(pixel_values=x, interpolate_pos_encoding=True)
    np.testing.assert_allclose(encoder.embed_pixels(pixels), out.pooler_output, atol=1e-5)
    assert encoder.patch_tokens_pixels(pixels).shape == (3, 36, 32)


@pytest.mark.parametrize(
    ("name", "model_type", "layer", "dim"),
    [
        ("clip", "clip", "embeds", PROJECTION),
        ("dinov2", "dinov2", "cls", 32),
        ("vit", "vit", "pooler", 32),
        ("vit-classifier", "vit", "cls", 32),  # no trained pooler in a classifier checkpoint
        ("beit", "beit", "mean", 32),
    ],
)
def test_family_default_layer_and_identity(
    checkpoints: dict[str, Checkpoint],
    encoders: dict[str, HFEncoder],
    name: str,
    model_type: str,
    layer: str,
    dim: int,
) -> None:
    encoder, folder = encoders[name], checkpoints[name].folder
    assert encoder.model_type == model_type
    assert encoder.identity.model == f"hf:{folder.name}"
    assert (encoder.identity.layer, encoder.dim) == (layer, dim)
    assert encoder.identity.weights_sha256 == file_sha256(folder / "model.safetensors")
    # "head" is the collection's default layer name: it picks the family's default pooling.
    head = create_encoder(f"hf:{folder}", layer="head", normalize=False)
    assert head.identity == encoder.identity


def test_preprocessing_is_read_from_the_folder(encoders: dict[str, HFEncoder]) -> None:
    clip = encoders["clip"].preprocess
    assert (clip.resolution, clip.resize, clip.interpolation) == (32, "center_crop", "bicubic")
    assert clip.crop_fraction == pytest.approx(32 / 40)
    assert clip.mean == pytest.approx(CLIP_MEAN) and clip.std == pytest.approx(CLIP_STD)

    dino = encoders["dinov2"].preprocess
    assert (dino.resolution, dino.resize, dino.interpolation) == (32, "center_crop", "bicubic")
    assert dino.crop_fraction == pytest.approx(32 / 36)
    assert dino.mean == pytest.approx(IMAGENET_MEAN) and dino.std == pytest.approx(IMAGENET_STD)

    for name in ("vit", "beit"):
        config = encoders[name].preprocess
        assert (config.resolution, config.resize, config.interpolation) == (
            32,
            "squash",
            "bilinear",
        )
        assert config.mean == pytest.approx((0.5,) * 3) and config.std == pytest.approx((0.5,) * 3)
    assert all(encoder.preprocess_exact for encoder in encoders.values())


def test_documented_defaults_without_a_processor_config(encoders: dict[str, HFEncoder]) -> None:
    dino = encoders["dinov2-bare"].preprocess  # resize 256, centre crop 224, ImageNet stats
    assert (dino.resolution, dino.resize, dino.interpolation) == (224, "center_crop", "bicubic")
    assert dino.crop_fraction == pytest.approx(224 / 256)
    assert dino.mean == pytest.approx(IMAGENET_MEAN)
    vit = encoders["vit-classifier"].preprocess  # the model's input size, mean/std 0.5
    assert (vit.resolution, vit.resize) == (32, "squash")
    assert vit.mean == pytest.approx((0.5,) * 3)
    # DINOv2 interpolates its position embeddings to the 224 input (28 x 28 patches).
    assert encoders["dinov2-bare"].patch_tokens([photo("coffee")]).shape == (1, 28 * 28, 32)


# Processor configs in the shapes the Hub's checkpoints use: older ones name a
# "FeatureExtractor" and give sizes as bare integers, read per processor class.
HUB_STYLE = [
    (
        "clip",  # openai/clip-vit-base-patch32
        {
            "feature_extractor_type": "CLIPFeatureExtractor",
            "size": 224,
            "crop_size": 224,
            "do_center_crop": True,
            "image_mean": CLIP_MEAN,
            "image_std": CLIP_STD,
            "resample": 3,
        },
        (224, "center_crop", 1.0, "bicubic", CLIP_MEAN),
    ),
    (
        "dinov2",  # facebook/dinov2-small
        {
            "image_processor_type": "BitImageProcessor",
            "size": {"shortest_edge": 256},
            "crop_size": {"height": 224, "width": 224},
            "do_center_crop": True,
            "image_mean": IMAGENET_MEAN,
            "image_std": IMAGENET_STD,
            "resample": 3,
            "rescale_factor": 0.00392156862745098,
        },
        (224, "center_crop", 0.875, "bicubic", IMAGENET_MEAN),
    ),
    (
        "vit",  # google/vit-base-patch16-224-in21k
        {
            "feature_extractor_type": "ViTFeatureExtractor",
            "size": 224,
            "image_mean": [0.5, 0.5, 0.5],
            "image_std": [0.5, 0.5, 0.5],
            "resample": 2,
        },
        (224, "squash", None, "bilinear", (0.5,) * 3),
    ),
    (
        "beit",  # microsoft/beit-base-patch16-224-pt22k-ft22k
        {
            "feature_extractor_type": "BeitFeatureExtractor",
            "size": 224,
            "crop_size": 224,
            "do_center_crop": False,
            "image_mean": [0.5, 0.5, 0.5],
            "image_std": [0.5, 0.5, 0.5],
            "resample": 2,
        },
        (224, "squash", None, "bilinear", (0.5,) * 3),
    ),
]


@pytest.mark.parametrize(("family", "processor", "expected"), HUB_STYLE)
def test_hub_style_processor_configs(family: str, processor: dict, expected: tuple) -> None:
    config, exact = preprocess_from_processor(processor, family)
    resolution, resize, fraction, interpolation, mean = expected
    assert (config.resolution, config.resize, config.interpolation) == (
        resolution,
        resize,
        interpolation,
    )
    if fraction is not None:
        assert config.crop_fraction == pytest.approx(fraction)
    assert config.mean == pytest.approx(mean)
    assert exact


def test_processor_rescaling_is_folded_into_mean_and_std() -> None:
    # Pixels left in 0..255 and normalised there equal x / 255 normalised by mean / 255.
    unscaled = {"do_rescale": False, "image_mean": [127.5] * 3, "image_std": [127.5] * 3}
    config, _ = preprocess_from_processor(unscaled, "vit")
    assert config.mean == pytest.approx((0.5,) * 3) and config.std == pytest.approx((0.5,) * 3)
    config, _ = preprocess_from_processor({"do_normalize": False}, "vit")
    assert config.mean == (0.0,) * 3 and config.std == (1.0,) * 3
    # Squashing to 256 then cropping 224 keeps the aspect ratio here: close, flagged inexact.
    squash_then_crop = {"size": {"height": 256, "width": 256}, "do_center_crop": True}
    config, exact = preprocess_from_processor(squash_then_crop, "beit")
    assert (config.resolution, config.resize, config.crop_fraction) == (224, "center_crop", 0.875)
    assert not exact
    with pytest.raises(EncoderError, match="non-square"):
        preprocess_from_processor({"size": {"height": 224, "width": 320}}, "vit")


@pytest.mark.parametrize("name", ["clip", "dinov2", "vit", "beit"])
def test_resizing_matches_the_image_processor(
    checkpoints: dict[str, Checkpoint], encoders: dict[str, HFEncoder], name: str
) -> None:
    processor = checkpoints[name].processor
    # Sizes whose scaled sides are whole numbers: transformers truncates where PIL-based
    # resizing here rounds, which only moves a crop by a pixel on other sizes.
    for image in (
        photo("astronaut"),
        photo("chelsea").resize((450, 300)),
        photo("rocket").resize((600, 400)),
    ):
        ours = resize_for_model(image, encoders[name].preprocess).astype(np.float32)
        theirs = processor(images=image, do_rescale=False, do_normalize=False, return_tensors="np")[
            "pixel_values"
        ][0].transpose(1, 2, 0)
        assert ours.shape == theirs.shape
        assert float(np.abs(ours - theirs).mean()) < 1.5, image.size


def test_embeddings_are_deterministic_and_batch_independent(
    checkpoints: dict[str, Checkpoint], encoders: dict[str, HFEncoder]
) -> None:
    images = [photo(n) for n in ("astronaut", "chelsea", "coffee")]
    for name in ("clip", "dinov2", "vit", "beit"):
        encoder = encoders[name]
        together = encoder.embed(images, batch_size=3)
        one_by_one = encoder.embed(images, batch_size=1)
        np.testing.assert_allclose(together, one_by_one, rtol=1e-4, atol=1e-5)
        again = create_encoder(f"hf:{checkpoints[name].folder}", normalize=False)
        np.testing.assert_array_equal(again.embed(images, batch_size=3), together)
    assert encoders["clip"].embed([]).shape == (0, PROJECTION)


def test_normalize_option_gives_unit_vectors(
    checkpoints: dict[str, Checkpoint], encoders: dict[str, HFEncoder]
) -> None:
    pixels = _pixels()
    normalized = create_encoder(f"hf:{checkpoints['dinov2'].folder}", layer="cls+mean")
    unit_vectors = normalized.embed_pixels(pixels)
    np.testing.assert_allclose(np.linalg.norm(unit_vectors, axis=1), 1.0, rtol=1e-5)
    raw = create_encoder(
        f"hf:{checkpoints['dinov2'].folder}", layer="cls+mean", normalize=False
    ).embed_pixels(pixels)
    np.testing.assert_allclose(unit(raw), unit_vectors, atol=1e-5)


def test_patch_tokens(checkpoints: dict[str, Checkpoint], encoders: dict[str, HFEncoder]) -> None:
    pixels = _pixels()
    for name in ("clip", "dinov2", "vit", "beit"):
        encoder = encoders[name]
        tokens = encoder.patch_tokens_pixels(pixels)
        assert tokens.shape == (3, PATCHES, encoder.token_dim) and tokens.dtype == np.float32
        from_images = encoder.patch_tokens([photo("coffee"), photo("rocket")], batch_size=1)
        assert from_images.shape == (2, PATCHES, 32)
        assert encoder.patch_tokens([]).shape == (0, PATCHES, 32)
    # DINOv2's mean pooling is the average of exactly these tokens.
    dino = create_encoder(f"hf:{checkpoints['dinov2'].folder}", layer="mean", normalize=False)
    tokens = dino.patch_tokens_pixels(pixels)
    np.testing.assert_allclose(tokens.mean(axis=1), dino.embed_pixels(pixels), atol=1e-5)
    # CLIP's tokens are normed by the same final LayerNorm as its class token.
    clip = checkpoints["clip"].model
    with torch.inference_mode():
        hidden = clip.vision_model(pixel_values=_pixel_values(checkpoints["clip"], pixels))
        expected = clip.vision_model.post_layernorm(hidden.last_hidden_state[:, 1:]).numpy()
    np.testing.assert_allclose(encoders["clip"].patch_tokens_pixels(pixels), expected, atol=1e-5)
    with pytest.raises(EncoderError, match="shape"):
        encoders["vit"].patch_tokens_pixels(np.zeros((1, 16, 16, 3), dtype=np.uint8))


def test_clip_text_embeddings(checkpoints: dict[str, Checkpoint]) -> None:
    folder = checkpoints["clip"].folder
    encoder = create_encoder(f"hf:{folder}")
    assert encoder.supports_text
    texts = ["a red dress", "a blue car parked outside", "a red dress"]
    vectors = encoder.encode_text(texts)
    assert vectors.shape == (3, encoder.dim) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(vectors[0], vectors[2], atol=1e-6)
    assert float(vectors[0] @ vectors[1]) < 0.999
    # Padding a short text next to a long one changes nothing.
    np.testing.assert_allclose(encoder.encode_text(texts, batch_size=1), vectors, atol=1e-5)

    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    batch = tokenizer(texts, padding=True, truncation=True, max_length=16, return_tensors="pt")
    with torch.inference_mode():
        features = checkpoints["clip"].model.get_text_features(**batch)
    expected = getattr(features, "pooler_output", features).numpy()
    np.testing.assert_allclose(vectors, unit(expected), atol=1e-5)
    assert encoder.encode_text([]).shape == (0, encoder.dim)


def test_text_is_refused_without_a_text_tower(
    checkpoints: dict[str, Checkpoint], encoders: dict[str, HFEncoder]
) -> None:
    assert not encoders["dinov2"].supports_text
    with pytest.raises(EncoderError, match="no text tower"):
        encoders["dinov2"].encode_text(["a cat"])
    clip_cls = create_encoder(f"hf:{checkpoints['clip'].folder}", layer="cls")
    with pytest.raises(EncoderError, match="layer 'cls'"):
        clip_cls.encode_text(["a cat"])


def test_text_search_over_a_collection(
    checkpoints: dict[str, Checkpoint], photo_dir: Path, tmp_path: Path, capsys
) -> None:
    from lookalike.cli.main import main

    path = tmp_path / "clip-collection"
    with Collection(path, model=f"hf:{checkpoints['clip'].folder}") as collection:
        report = collection.index(photo_dir, workers=0)
        assert report.added == 6 and not report.failed
        response = collection.search_text("a photo of a cat", k=3)
        assert len(response) == 3
        assert all(-1.0 <= r.score <= 1.0 + 1e-6 for r in response)
        expected = collection.search_vector(
            collection.encoder.encode_text(["a photo of a cat"])[0], k=3
        )
        assert [r.id for r in response] == [r.id for r in expected]
        assert collection.info().layer == "head"

    assert main(["-c", str(path), "search", "--text", "a cat", "-k", "2", "--json"]) == 0
    found = json.loads(capsys.readouterr().out)
    assert found["query"] == "a cat" and len(found["results"]) == 2

    with Collection(tmp_path / "dino", model=f"hf:{checkpoints['dinov2'].folder}") as dino:
        dino.index(photo_dir, workers=0)
        with pytest.raises(EncoderError, match="cannot embed text"):
            dino.search_text("a cat")


def test_bad_folders_and_names_are_clear_errors(
    checkpoints: dict[str, Checkpoint], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(EncoderError, match="no model folder"):
        create_encoder(f"hf:{tmp_path / 'missing'}")
    with pytest.raises(EncoderError, match=r"no config\.json"):
        create_encoder(f"hf:{tmp_path}")
    for kind, why in [
        ("bert", "not an image model"),
        ("blip", "image-text model"),
        ("no-such-type", "has no model for it"),
    ]:
        (tmp_path / kind).mkdir()
        config = {"model_type": kind, **({"text_config": {}} if kind == "blip" else {})}
        (tmp_path / kind / "config.json").write_text(json.dumps(config))
        (tmp_path / kind / "model.safetensors").write_bytes(b"")
        with pytest.raises(EncoderError, match=rf"unsupported model type '{kind}'.*{why}.*CLIP"):
            create_encoder(f"hf:{tmp_path / kind}")
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    shutil.copy(checkpoints["vit"].folder / "config.json", mixed)
    shutil.copy(checkpoints["beit"].folder / "model.safetensors", mixed)
    with pytest.raises(EncoderError, match="vit"):
        create_encoder(f"hf:{mixed}")
    (mixed / "model.safetensors").unlink()
    with pytest.raises(EncoderError, match="no weights"):
        create_encoder(f"hf:{mixed}")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(
        EncoderError, match=r"'lookalike-tests/no-such-model'.*HF_HUB_OFFLINE.*download it"
    ):
        create_encoder("hf:lookalike-tests/no-such-model")
    with pytest.raises(EncoderError, match="valid Hugging Face hub id"):
        create_encoder("hf:not a valid id!")
    with pytest.raises(EncoderError, match="empty"):
        create_encoder("hf:")


def test_bad_options_are_clear_errors(checkpoints: dict[str, Checkpoint]) -> None:
    folder = checkpoints["dinov2"].folder
    with pytest.raises(EncoderError, match=r"unknown layer 'pooler'.*cls, mean, cls\+mean"):
        create_encoder(f"hf:{folder}", layer="pooler")
    with pytest.raises(EncoderError, match="unknown layer 'pooler'"):
        create_encoder(f"hf:{checkpoints['vit-classifier'].folder}", layer="pooler")
    with pytest.raises(EncoderError, match="runtime 'onnx'"):
        create_encoder(f"hf:{folder}", runtime="onnx")
