"""More Hugging Face models, offline, with tiny random checkpoints saved to folders: image
backbones through the one generic path (ResNet-18/-50 as microsoft/resnet-* are built,
ConvNeXt, Swin, EfficientNet, MobileNetV2, DeiT), SigLIP with its text tower, and a
sentence-transformers text model paired with a CLIP collection for queries in other languages."""

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
from conftest import PHOTO_NAMES, photo, unit
from safetensors.torch import save_file

from lookalike.cli.main import main
from lookalike.core.collection import Collection
from lookalike.encoders import create_encoder
from lookalike.encoders.hf import GENERIC, _quiet_transformers, preprocess_from_processor
from lookalike.encoders.preprocess import resize_for_model
from lookalike.encoders.runtime import file_sha256
from lookalike.encoders.text import SentenceTextModel, create_text_model, pool
from lookalike.errors import EncoderError, ModelMismatchError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# google/efficientnet-b0's own std (its processor divides by it twice: include_top).
EFFICIENTNET_STD = (0.47853944, 0.4732864, 0.47434163)
TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2}
TINY |= {"intermediate_size": 64}
CLIP_DIM = 24
TEXTS = ["Ein rotes Kleid", "una foto de un gato", "猫の写真", "un chat"]


@dataclass
class Checkpoint:
    """A saved tiny checkpoint, the backbone it was saved from, and its image processor."""

    folder: Path
    model: Any
    processor: Any | None


def _save(folder: Path, model: Any, processor: Any | None = None, tokenizer: Any = None) -> Path:
    with _quiet_transformers():
        model.save_pretrained(folder)
        for part in (processor, tokenizer):
            if part is not None:
                part.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def backbones(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Checkpoint]:
    """One tiny checkpoint per backbone family, each with the processor its hub ones ship."""
    from transformers.models.convnext.image_processing_pil_convnext import (
        ConvNextImageProcessorPil,
    )
    from transformers.models.efficientnet.image_processing_pil_efficientnet import (
        EfficientNetImageProcessorPil,
    )
    from transformers.models.mobilenet_v2.image_processing_pil_mobilenet_v2 import (
        MobileNetV2ImageProcessorPil,
    )
    from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil

    root = tmp_path_factory.mktemp("backbones")
    built: dict[str, Checkpoint] = {}

    def add(name: str, model: Any, processor: Any, backbone: Any = None) -> None:
        with torch.no_grad():
            # Some inits draw conv and norm weights with std 0.02: through a deep CNN the
            # signal would vanish and every image would get the same (zero) vector.
            for module in model.modules():
                if isinstance(module, torch.nn.BatchNorm2d):
                    module.weight.fill_(1.0)
                elif isinstance(module, torch.nn.Conv2d):
                    torch.nn.init.kaiming_normal_(module.weight)
        folder = _save(root / name, model, processor)
        built[name] = Checkpoint(folder, (backbone or model).eval(), processor)

    # microsoft/resnet-18 and -50 are ResNetForImageClassification checkpoints with ConvNeXt's
    # processor (shorter side to 224 / 0.875, centre crop 224, ImageNet statistics).
    resnet_processor = ConvNextImageProcessorPil(
        size={"shortest_edge": 32},
        crop_pct=0.875,
        image_mean=IMAGENET_MEAN,
        image_std=IMAGENET_STD,
    )
    for seed, (name, layer_type, widths) in enumerate(
        [("resnet-18", "basic", [8, 16]), ("resnet-50", "bottleneck", [16, 32])]
    ):
        torch.manual_seed(seed)
        config = transformers.ResNetConfig(
            embedding_size=8, hidden_sizes=widths, depths=[1, 1], layer_type=layer_type
        )
        classifier = transformers.ResNetForImageClassification(config)
        add(name, classifier, resnet_processor, classifier.resnet)
    torch.manual_seed(2)
    add(
        "convnext",
        transformers.ConvNextModel(
            transformers.ConvNextConfig(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2)
        ),
        ConvNextImageProcessorPil(size={"shortest_edge": 32}, crop_pct=0.8),
    )
    torch.manual_seed(3)
    swin = transformers.SwinConfig(
        image_size=32, patch_size=4, embed_dim=8, depths=[1, 1], num_heads=[1, 2], window_size=4
    )
    add(
        "swin",
        transformers.SwinModel(swin),
        ViTImageProcessorPil(
            size={"height": 32, "width": 32},
            resample=3,
            image_mean=IMAGENET_MEAN,
            image_std=IMAGENET_STD,
        ),
    )
    torch.manual_seed(4)
    efficientnet = transformers.EfficientNetConfig(
        image_size=32, width_coefficient=0.1, depth_coefficient=0.1, hidden_dim=128
    )
    add(
        "efficientnet",
        transformers.EfficientNetModel(efficientnet),
        EfficientNetImageProcessorPil(
            size={"height": 32, "width": 32},
            resample=2,
            image_mean=IMAGENET_MEAN,
            image_std=EFFICIENTNET_STD,
            include_top=True,
        ),
    )
    torch.manual_seed(5)
    mobilenet = transformers.MobileNetV2Config(
        image_size=32, depth_multiplier=0.25, finegrained_output=False
    )
    add(
        "mobilenet_v2",
        transformers.MobileNetV2Model(mobilenet),
        MobileNetV2ImageProcessorPil(
            size={"shortest_edge": 36}, crop_size={"height": 32, "width": 32}
        ),
    )
    # A classifier checkpoint of a token model whose backbone pooler has weights it lacks.
    torch.manual_seed(6)
    deit = transformers.DeiTForImageClassification(
        transformers.DeiTConfig(image_size=32, patch_size=8, num_labels=3, **TINY)
    )
    add("deit", deit, ViTImageProcessorPil(size={"height": 32, "width": 32}), deit.deit)
    return built


BACKBONES = ["resnet-18", "resnet-50", "convnext", "swin", "efficientnet", "mobilenet_v2"]
# Default layer and width of each tiny backbone.
EXPECTED = {
    "resnet-18": ("pooler", 16),
    "resnet-50": ("pooler", 32),
    "convnext": ("pooler", 16),
    "swin": ("pooler", 16),
    "efficientnet": ("pooler", 128),
    "mobilenet_v2": ("pooler", 320),
    "deit": ("mean", 32),
}


def _pixels(count: int = 3, side: int = 32) -> np.ndarray:
    return np.random.default_rng(7).integers(0, 256, (count, side, side, 3), dtype=np.uint8)


def _reference(checkpoint: Checkpoint, pixels: np.ndarray, layer: str) -> np.ndarray:
    """The vector straight from transformers: its processor (no resize) and its model."""
    batch = checkpoint.processor(
        images=list(pixels), do_resize=False, do_center_crop=False, return_tensors="pt"
    )
    with torch.inference_mode():
        out = checkpoint.model(pixel_values=batch["pixel_values"])
    if layer == "pooler":
        return out.pooler_output.flatten(1).numpy()
    hidden = out.last_hidden_state
    return (hidden.mean(dim=(2, 3)) if hidden.dim() == 4 else hidden.mean(dim=1)).numpy()


@pytest.mark.parametrize("name", [*BACKBONES, "deit"])
def test_backbone_vectors_equal_what_transformers_computes(
    backbones: dict[str, Checkpoint], name: str
) -> None:
    checkpoint = backbones[name]
    layer, dim = EXPECTED[name]
    encoder = create_encoder(f"hf:{checkpoint.folder}", normalize=False)
    assert (encoder.identity.layer, encoder.dim) == (layer, dim)
    assert encoder.family == GENERIC and encoder.preprocess_exact
    pixels = _pixels()
    vectors = encoder.embed_pixels(pixels)
    assert vectors.shape == (3, dim) and vectors.dtype == np.float32
    np.testing.assert_allclose(vectors, _reference(checkpoint, pixels, layer), atol=1e-5, rtol=1e-4)
    assert not np.allclose(vectors[0], vectors[1], atol=1e-4)
    mean = create_encoder(f"hf:{checkpoint.folder}", layer="mean", normalize=False)
    np.testing.assert_allclose(
        mean.embed_pixels(pixels), _reference(checkpoint, pixels, "mean"), atol=1e-5, rtol=1e-4
    )


def test_layers_and_identities(backbones: dict[str, Checkpoint]) -> None:
    keys = set()
    for name in [*BACKBONES, "deit"]:
        folder = backbones[name].folder
        encoder = create_encoder(f"hf:{folder}", normalize=False)
        assert encoder.identity.model == f"hf:{name}"
        assert encoder.identity.weights_sha256 == file_sha256(folder / "model.safetensors")
        assert create_encoder(f"hf:{folder}", layer="head").identity == encoder.identity
        keys.add(encoder.identity.key)
        if name != "deit":
            keys.add(create_encoder(f"hf:{folder}", layer="mean").identity.key)
    assert len(keys) == 2 * len(BACKBONES) + 1  # every model and layer is told apart
    # ResNet's pooler is the global average of its last map: the same vector as "mean".
    resnet = backbones["resnet-18"].folder
    pixels = _pixels()
    np.testing.assert_allclose(
        create_encoder(f"hf:{resnet}", layer="pooler").embed_pixels(pixels),
        create_encoder(f"hf:{resnet}", layer="mean").embed_pixels(pixels),
        atol=1e-6,
    )
    # DeiT's classifier checkpoint has no trained pooler: only "mean" is offered.
    with pytest.raises(EncoderError, match=r"unknown layer 'pooler' for deit; choose one of mean"):
        create_encoder(f"hf:{backbones['deit'].folder}", layer="pooler")
    with pytest.raises(EncoderError, match=r"unknown layer 'cls' for resnet.*pooler, mean"):
        create_encoder(f"hf:{resnet}", layer="cls")


@pytest.mark.parametrize("name", BACKBONES)
def test_real_photos_give_unit_vectors(backbones: dict[str, Checkpoint], name: str) -> None:
    encoder = create_encoder(f"hf:{backbones[name].folder}")
    images = [photo(n) for n in PHOTO_NAMES]
    vectors = encoder.embed(images, batch_size=4)
    assert vectors.shape == (len(images), EXPECTED[name][1]) and vectors.dtype == np.float32
    assert np.isfinite(vectors).all()
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)
    assert len({v.round(4).tobytes() for v in vectors}) == len(images)
    np.testing.assert_allclose(encoder.embed(images, batch_size=1), vectors, atol=1e-5)


@pytest.mark.parametrize("name", ["resnet-18", "convnext", "swin", "efficientnet", "mobilenet_v2"])
def test_resizing_matches_the_image_processor(backbones: dict[str, Checkpoint], name: str) -> None:
    checkpoint = backbones[name]
    encoder = create_encoder(f"hf:{checkpoint.folder}")
    # EfficientNet's second division by std (include_top) ignores do_normalize.
    raw = {"include_top": False} if name == "efficientnet" else {}
    # Sizes whose scaled sides are whole numbers (see test_hf_encoders).
    for image in (photo("astronaut"), photo("chelsea").resize((450, 300))):
        ours = resize_for_model(image, encoder.preprocess).astype(np.float32)
        theirs = checkpoint.processor(
            images=image, do_rescale=False, do_normalize=False, return_tensors="np", **raw
        )["pixel_values"][0].transpose(1, 2, 0)
        assert ours.shape == theirs.shape
        assert float(np.abs(ours - theirs).mean()) < 1.5, image.size


def test_backbones_have_no_patch_tokens_or_text(backbones: dict[str, Checkpoint]) -> None:
    encoder = create_encoder(f"hf:{backbones['resnet-50'].folder}")
    assert not encoder.capabilities.patch_tokens and not encoder.capabilities.text
    with pytest.raises(EncoderError, match="no patch tokens"):
        encoder.patch_tokens([photo("coffee")])
    with pytest.raises(EncoderError, match="no text tower"):
        encoder.encode_text(["a cat"])


@pytest.mark.parametrize("name", BACKBONES)
def test_each_photo_finds_itself_first(
    backbones: dict[str, Checkpoint], photo_dir: Path, tmp_path: Path, name: str
) -> None:
    with Collection(tmp_path / name, model=f"hf:{backbones[name].folder}") as collection:
        report = collection.index(photo_dir, workers=0)
        assert report.added == len(PHOTO_NAMES) and not report.failed
        for path in sorted(photo_dir.rglob("*.jpg")):
            best = collection.search(path, k=2).results[0]
            assert Path(best.path) == path and best.score == pytest.approx(1.0, abs=1e-4)
        models = collection.info().models
        assert [(m["name"], m["dim"], m["vectors"]) for m in models] == [
            (f"hf:{name}", EXPECTED[name][1], len(PHOTO_NAMES))
        ]


def test_cli_indexes_and_searches_with_a_backbone(
    backbones: dict[str, Checkpoint], photo_dir: Path, tmp_path: Path, capsys
) -> None:
    path = str(tmp_path / "resnet")
    model = f"hf:{backbones['resnet-50'].folder}"
    assert (
        main(["-c", path, "index", str(photo_dir), "--model", model, "--workers", "0", "-q"]) == 0
    )
    assert "6 added" in capsys.readouterr().out
    query = next(photo_dir.rglob("coffee.jpg"))
    assert main(["-c", path, "search", str(query), "-k", "3", "--json"]) == 0
    found = json.loads(capsys.readouterr().out)
    assert Path(found["results"][0]["path"]) == query
    assert main(["-c", path, "info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["model"] == model
    assert [(m["name"], m["layer"], m["dim"]) for m in info["models"]] == [
        ("hf:resnet-50", "pooler", 32)
    ]


# Processor configs as the Hub's checkpoints ship them: (family, settings, expected
# resolution, resize, crop fraction, interpolation, mean, std, exact).
HUB_STYLE = [
    (  # microsoft/resnet-50 (and -18), facebook/convnext-tiny-224
        {
            "feature_extractor_type": "ConvNextFeatureExtractor",
            "crop_pct": 0.875,
            "size": 224,
            "resample": 3,
            "image_mean": IMAGENET_MEAN,
            "image_std": IMAGENET_STD,
        },
        (224, "center_crop", 224 / 256, "bicubic", IMAGENET_MEAN, IMAGENET_STD, True),
    ),
    (  # facebook/convnext-large-224-22k-1k at 384: ConvNeXt squashes from 384 px on
        {"image_processor_type": "ConvNextImageProcessor", "size": {"shortest_edge": 384}},
        (384, "squash", None, "bicubic", (0.5,) * 3, (0.5,) * 3, True),
    ),
    (  # google/efficientnet-b0: nearest resampling and std applied twice (include_top)
        {
            "image_processor_type": "EfficientNetImageProcessor",
            "size": {"height": 224, "width": 224},
            "crop_size": {"height": 289, "width": 289},
            "do_center_crop": False,
            "include_top": True,
            "rescale_offset": False,
            "resample": 0,
            "image_mean": IMAGENET_MEAN,
            "image_std": EFFICIENTNET_STD,
        },
        (
            224,
            "squash",
            None,
            "bilinear",
            IMAGENET_MEAN,
            tuple(s * s for s in EFFICIENTNET_STD),
            False,
        ),
    ),
    (  # google/mobilenet_v2_1.0_224
        {
            "image_processor_type": "MobileNetV2ImageProcessor",
            "crop_pct": 0.875,
            "crop_size": {"height": 224, "width": 224},
            "size": {"shortest_edge": 256},
            "resample": 2,
            "image_mean": (0.5,) * 3,
            "image_std": (0.5,) * 3,
        },
        (224, "center_crop", 0.875, "bilinear", (0.5,) * 3, (0.5,) * 3, True),
    ),
    (  # microsoft/swin-tiny-patch4-window7-224
        {
            "feature_extractor_type": "ViTFeatureExtractor",
            "size": 224,
            "resample": 3,
            "image_mean": IMAGENET_MEAN,
            "image_std": IMAGENET_STD,
        },
        (224, "squash", None, "bicubic", IMAGENET_MEAN, IMAGENET_STD, True),
    ),
    (  # a processor this module does not know: its listed settings, flagged inexact
        {"image_processor_type": "SomeNewImageProcessor", "size": {"height": 256, "width": 256}},
        (256, "squash", None, "bilinear", IMAGENET_MEAN, IMAGENET_STD, False),
    ),
]


@pytest.mark.parametrize(("processor", "expected"), HUB_STYLE)
def test_hub_style_backbone_processors(processor: dict, expected: tuple) -> None:
    config, exact = preprocess_from_processor(processor, GENERIC)
    resolution, resize, fraction, interpolation, mean, std, is_exact = expected
    assert (config.resolution, config.resize, config.interpolation) == (
        resolution,
        resize,
        interpolation,
    )
    if fraction is not None:
        assert config.crop_fraction == pytest.approx(fraction)
    assert config.mean == pytest.approx(mean) and config.std == pytest.approx(std)
    assert exact is is_exact


def test_efficientnet_rescale_offset_is_folded_into_the_mean() -> None:
    # rescale_offset maps x / 255 to x * 2/255 - 1: mean' = (mean + 1) / 2, std' = std / 2.
    settings = {
        "image_processor_type": "EfficientNetImageProcessor",
        "size": {"height": 32, "width": 32},
        "rescale_factor": 2 / 255,
        "rescale_offset": True,
        "include_top": False,
        "image_mean": (0.5,) * 3,
        "image_std": (0.25,) * 3,
    }
    config, _ = preprocess_from_processor(settings, GENERIC)
    assert config.mean == pytest.approx((0.75,) * 3) and config.std == pytest.approx((0.125,) * 3)


def test_folders_without_a_processor_get_imagenet_statistics(
    backbones: dict[str, Checkpoint], tmp_path: Path
) -> None:
    bare = tmp_path / "swin-bare"
    shutil.copytree(backbones["swin"].folder, bare)
    (bare / "preprocessor_config.json").unlink()
    encoder = create_encoder(f"hf:{bare}")
    config = encoder.preprocess
    assert (config.resolution, config.resize) == (32, "squash")  # the model's image_size
    assert config.mean == pytest.approx(IMAGENET_MEAN)
    assert not encoder.preprocess_exact


# -- SigLIP ---------------------------------------------------------------------------------


def _unigram_tokenizer(max_length: int) -> Any:
    """A tiny sentencepiece-style (Unigram, ▁ word marks) fast tokenizer, built offline, that
    ends every text with </s> as SigLIP's does."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    chars = "abcdefghijklmnopqrstuvwxyz0123456789äöüßéèàçñ猫の写真"
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [(c, -2.0) for c in chars] + [("▁" + c, -1.0) for c in chars]
    tokenizer = Tokenizer(models.Unigram(pieces, unk_id=2))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", 1)]
    )
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=max_length,
    )


@pytest.fixture(scope="module")
def siglip(tmp_path_factory: pytest.TempPathFactory) -> Checkpoint:
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    tokenizer = _unigram_tokenizer(16)
    torch.manual_seed(7)
    config = transformers.SiglipConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "max_position_embeddings": 16,
            "projection_size": CLIP_DIM,
            "pad_token_id": 0,
            "bos_token_id": 1,
            "eos_token_id": 1,
            **TINY,
        },
        vision_config={
            "image_size": 32,
            "patch_size": 8,
            "hidden_size": CLIP_DIM,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "intermediate_size": 48,
        },
    )
    model = transformers.SiglipModel(config)
    processor = SiglipImageProcessorPil(size={"height": 32, "width": 32})
    folder = _save(tmp_path_factory.mktemp("siglip") / "siglip-tiny", model, processor, tokenizer)
    return Checkpoint(folder, model.eval(), processor)


def test_siglip_image_vectors_and_patch_tokens(siglip: Checkpoint) -> None:
    encoder = create_encoder(f"hf:{siglip.folder}", normalize=False)
    assert (encoder.model_type, encoder.identity.layer, encoder.dim) == ("siglip", "embeds", 24)
    assert encoder.capabilities.text and encoder.capabilities.patch_tokens
    config = encoder.preprocess
    assert (config.resolution, config.resize, config.interpolation) == (32, "squash", "bicubic")
    assert encoder.preprocess_exact
    pixels = _pixels()
    x = siglip.processor(images=list(pixels), do_resize=False, return_tensors="pt")
    with torch.inference_mode():
        features = siglip.model.get_image_features(pixel_values=x["pixel_values"])
        hidden = siglip.model.vision_model(pixel_values=x["pixel_values"]).last_hidden_state
    np.testing.assert_allclose(
        encoder.embed_pixels(pixels), features.pooler_output.numpy(), atol=1e-5, rtol=1e-4
    )
    mean = create_encoder(f"hf:{siglip.folder}", layer="mean", normalize=False)
    np.testing.assert_allclose(mean.embed_pixels(pixels), hidden.mean(dim=1), atol=1e-5)
    # No class token: every output token is a patch (4 x 4 of 8 px).
    np.testing.assert_allclose(encoder.patch_tokens_pixels(pixels), hidden.numpy(), atol=1e-5)
    assert encoder.patch_tokens([]).shape == (0, 16, 24)
    assert not mean.supports_text
    with pytest.raises(EncoderError, match="layer 'mean' is not in the text space"):
        mean.encode_text(["a cat"])


def test_siglip_text_pads_to_full_length_without_a_mask(siglip: Checkpoint) -> None:
    encoder = create_encoder(f"hf:{siglip.folder}")
    vectors = encoder.encode_text(TEXTS)
    assert vectors.shape == (len(TEXTS), 24) and np.isfinite(vectors).all()
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)
    tokenizer = transformers.AutoTokenizer.from_pretrained(siglip.folder)
    ids = tokenizer(TEXTS, padding="max_length", max_length=16, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        expected = siglip.model.get_text_features(input_ids=ids).pooler_output.numpy()
    np.testing.assert_allclose(vectors, unit(expected), atol=1e-5)
    # Alone, each text is still padded to the full length: batches change nothing.
    np.testing.assert_allclose(encoder.encode_text(TEXTS[1:2]), vectors[1:2], atol=1e-5)
    # Padding only to the longest text (CLIP's way) would read another position.
    short = tokenizer(TEXTS[3:], padding=True, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        unpadded = siglip.model.get_text_features(input_ids=short).pooler_output.numpy()
    assert not np.allclose(unit(unpadded)[0], vectors[3], atol=1e-3)


def test_siglip_text_search_through_collection_and_cli(
    siglip: Checkpoint, photo_dir: Path, tmp_path: Path, capsys
) -> None:
    path = tmp_path / "siglip"
    with Collection(path, model=f"hf:{siglip.folder}") as collection:
        collection.index(photo_dir, workers=0)
        response = collection.search_text("a photo of a cat", k=3)
        expected = collection.search_vector(
            collection.encoder.encode_text(["a photo of a cat"])[0], k=3
        )
        assert [r.id for r in response] == [r.id for r in expected] and len(response) == 3
        first = next(photo_dir.rglob("rocket.jpg"))
        assert Path(collection.search(first, k=1).results[0].path) == first
    assert main(["-c", str(path), "search", "--text", "a cat", "-k", "2", "--json"]) == 0
    found = json.loads(capsys.readouterr().out)
    assert found["query"] == "a cat" and len(found["results"]) == 2
    assert [r["id"] for r in found["results"]] == [
        r.id for r in Collection(path).search_text("a cat", k=2)
    ]


# -- multilingual text models ---------------------------------------------------------------


def _wordpiece_vocab() -> dict[str, int]:
    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])}
    for c in "abcdefghijklmnopqrstuvwxyzäöüßéèàçñ猫の写真":
        vocab.setdefault(c, len(vocab))
        vocab.setdefault("##" + c, len(vocab))
    return vocab


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2), encoding="utf-8")


def _sentence_model(
    folder: Path,
    backbone: Any,
    tokenizer: Any,
    *,
    pooling: dict[str, bool],
    dense: list[tuple[torch.Tensor, torch.Tensor | None, str, str]],
    normalize: bool = False,
    max_seq_length: int = 16,
) -> Path:
    """A sentence-transformers folder: the transformer at the top, 1_Pooling, then one
    <n>_Dense per entry (weight, bias, activation class, weights file name)."""
    _save(folder, backbone, tokenizer=tokenizer)
    _write_json(folder / "sentence_bert_config.json", {"max_seq_length": max_seq_length})
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {
            "idx": 1,
            "name": "1",
            "path": "1_Pooling",
            "type": "sentence_transformers.models.Pooling",
        },
    ]
    width = int(backbone.config.hidden_size)
    pooling_config = {"word_embedding_dimension": width}
    pooling_config |= {f"pooling_mode_{m}": False for m in ("cls_token", "max_tokens")}
    pooling_config |= {"pooling_mode_mean_tokens": False, **pooling}
    _write_json(folder / "1_Pooling" / "config.json", pooling_config)
    for n, (weight, bias, activation, file) in enumerate(dense, start=2):
        where = folder / f"{n}_Dense"
        _write_json(
            where / "config.json",
            {
                "in_features": weight.shape[1],
                "out_features": weight.shape[0],
                "bias": bias is not None,
                "activation_function": activation,
            },
        )
        state = {"linear.weight": weight} | ({"linear.bias": bias} if bias is not None else {})
        if file.endswith(".safetensors"):
            save_file(state, str(where / file))
        else:
            torch.save(state, where / file)
        modules.append(
            {
                "idx": n,
                "name": str(n),
                "path": where.name,
                "type": "sentence_transformers.models.Dense",
            }
        )
    if normalize:
        modules.append(
            {
                "idx": len(modules),
                "name": "n",
                "path": "n",
                "type": "sentence_transformers.models.Normalize",
            }
        )
    _write_json(folder / "modules.json", modules)
    return folder


@dataclass
class TextModels:
    distilbert: Path  # like clip-ViT-B-32-multilingual-v1: mean pooling, dense without bias
    xlmr: Path  # cls + mean pooling, tanh dense with bias (.bin weights), normalised
    narrow: Path  # a 16-d output that fits no 24-d image model
    clip: Path
    backbones: dict[str, Any]
    dense: dict[str, list[tuple[torch.Tensor, torch.Tensor | None]]]


@pytest.fixture(scope="module")
def text_models(tmp_path_factory: pytest.TempPathFactory) -> TextModels:
    root = tmp_path_factory.mktemp("text")
    torch.manual_seed(8)
    vocab = _wordpiece_vocab()
    distilbert = transformers.DistilBertModel(
        transformers.DistilBertConfig(
            vocab_size=len(vocab),
            dim=32,
            n_layers=2,
            n_heads=2,
            hidden_dim=64,
            max_position_embeddings=32,
        )
    ).eval()
    word_tokenizer = transformers.DistilBertTokenizer(vocab=vocab)
    w1 = torch.randn(CLIP_DIM, 32)
    _sentence_model(
        root / "mclip-distilbert",
        distilbert,
        word_tokenizer,
        pooling={"pooling_mode_mean_tokens": True},
        dense=[(w1, None, "torch.nn.modules.linear.Identity", "model.safetensors")],
    )
    w3 = torch.randn(16, 32)
    _sentence_model(
        root / "narrow",
        distilbert,
        word_tokenizer,
        pooling={"pooling_mode_mean_tokens": True},
        dense=[(w3, None, "torch.nn.modules.linear.Identity", "model.safetensors")],
    )

    chars = "abcdefghijklmnopqrstuvwxyzäöüßéèàçñ猫の写真"
    pieces = [("<s>", 0.0), ("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [("▁" + c, -1.0) for c in chars] + [(c, -2.0) for c in chars] + [("<mask>", 0.0)]
    xlmr = transformers.XLMRobertaModel(
        transformers.XLMRobertaConfig(
            vocab_size=len(pieces), max_position_embeddings=40, pad_token_id=1, **TINY
        ),
        add_pooling_layer=False,
    ).eval()
    w2, b2 = torch.randn(CLIP_DIM, 64), torch.randn(CLIP_DIM)
    _sentence_model(
        root / "mclip-xlmr",
        xlmr,
        transformers.XLMRobertaTokenizer(vocab=pieces),
        pooling={"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": True},
        dense=[(w2, b2, "torch.nn.modules.activation.Tanh", "pytorch_model.bin")],
        normalize=True,
    )

    torch.manual_seed(9)
    clip = transformers.CLIPModel(
        transformers.CLIPConfig(
            text_config={"vocab_size": 99, "max_position_embeddings": 16, **TINY},
            vision_config={"image_size": 32, "patch_size": 8, **TINY},
            projection_dim=CLIP_DIM,
        )
    )
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    processor = CLIPImageProcessorPil(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    )
    clip_folder = _save(root / "clip-tiny", clip, processor)
    return TextModels(
        root / "mclip-distilbert",
        root / "mclip-xlmr",
        root / "narrow",
        clip_folder,
        {"distilbert": distilbert, "xlmr": xlmr},
        {"distilbert": [(w1, None)], "xlmr": [(w2, b2)]},
    )


def _by_hand(models: TextModels, kind: str, texts: list[str]) -> np.ndarray:
    """The text vectors computed from the saved pieces, as sentence-transformers does."""
    folder = models.distilbert if kind == "distilbert" else models.xlmr
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    batch = tokenizer(texts, padding=True, truncation=True, max_length=16, return_tensors="pt")
    mask = batch["attention_mask"].unsqueeze(-1).float()
    with torch.inference_mode():
        hidden = models.backbones[kind](
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).last_hidden_state
        mean = (hidden * mask).sum(dim=1) / mask.sum(dim=1)
        if kind == "distilbert":
            ((weight, _),) = models.dense["distilbert"]
            return (mean @ weight.T).numpy()
        ((weight, bias),) = models.dense["xlmr"]
        pooled = torch.cat([hidden[:, 0], mean], dim=1)
        return unit(torch.tanh(pooled @ weight.T + bias).numpy())


@pytest.mark.parametrize("kind", ["distilbert", "xlmr"])
def test_text_vectors_equal_the_saved_modules_by_hand(text_models: TextModels, kind: str) -> None:
    folder = text_models.distilbert if kind == "distilbert" else text_models.xlmr
    model = create_text_model(f"hf:{folder}")
    assert isinstance(model, SentenceTextModel) and model.dim == CLIP_DIM
    assert model.name == f"hf:{folder.name}"
    vectors = model.encode_text(TEXTS)
    assert vectors.shape == (len(TEXTS), CLIP_DIM) and vectors.dtype == np.float32
    np.testing.assert_allclose(vectors, _by_hand(text_models, kind, TEXTS), atol=1e-5, rtol=1e-4)
    # Padding next to a longer text changes nothing; leading and trailing blanks are dropped.
    np.testing.assert_allclose(model.encode_text([f" {TEXTS[2]} "]), vectors[2:3], atol=1e-5)
    assert not np.allclose(vectors[0], vectors[1], atol=1e-3)
    assert model.encode_text([]).shape == (0, CLIP_DIM)


def test_pooling_modes_follow_sentence_transformers() -> None:
    hidden = torch.tensor([[[1.0, 2.0], [3.0, -4.0], [100.0, 100.0]]])
    mask = torch.tensor([[1, 1, 0]])  # the last token is padding and never counts
    pooled = pool(hidden, mask, ["cls_token", "max_tokens", "mean_tokens", "lasttoken"])
    np.testing.assert_allclose(pooled[0], [1, 2, 3, 2, 2, -1, 3, -4])
    sqrt = pool(hidden, mask, ["mean_sqrt_len_tokens", "weightedmean_tokens"])
    np.testing.assert_allclose(sqrt[0], [4 / 2**0.5, -2 / 2**0.5, 7 / 3, -6 / 3], rtol=1e-6)


def test_multilingual_queries_over_a_clip_collection(
    text_models: TextModels, photo_dir: Path, tmp_path: Path, capsys
) -> None:
    path = tmp_path / "clip"
    clip, text_model = f"hf:{text_models.clip}", f"hf:{text_models.distilbert}"
    with Collection(path, model=clip, text_model=text_model) as collection:
        collection.index(photo_dir, workers=0)
        assert collection.text_model == text_model
        response = collection.search_text("una foto de un gato", k=6)
        by_hand = _by_hand(text_models, "distilbert", ["una foto de un gato"])[0]
        expected = collection.search_vector(by_hand, k=6)
        assert [r.id for r in response] == [r.id for r in expected] and len(response) == 6
        np.testing.assert_allclose(
            [r.score for r in response], [r.score for r in expected], atol=1e-5
        )
        # The image model still embeds images, and image queries do not change.
        query = next(photo_dir.rglob("coffee.jpg"))
        assert Path(collection.search(query, k=1).results[0].path) == query
        assert collection.encoder.dim == CLIP_DIM
        # Combined queries take the text model's vector too.
        both = collection.search_many([query], text="猫の写真", k=2)
        assert len(both) == 2

    # Remembered: a later open (and the CLI) uses it.
    with Collection(path) as reopened:
        assert reopened.text_model == text_model
        again = reopened.search_text("una foto de un gato", k=6)
        assert [r.id for r in again] == [r.id for r in response]
    assert main(["-c", str(path), "search", "--text", "猫の写真", "-k", "3", "--json"]) == 0
    found = json.loads(capsys.readouterr().out)
    cat = _by_hand(text_models, "distilbert", ["猫の写真"])[0]
    with Collection(path) as reopened:
        assert [r["id"] for r in found["results"]] == [
            r.id for r in reopened.search_vector(cat, k=3)
        ]

    # --text-model on search: another text model for this search only.
    args = ["-c", str(path), "search", "--text", "ein rotes kleid", "-k", "3", "--json"]
    assert main([*args, "--text-model", f"hf:{text_models.xlmr}"]) == 0
    found = json.loads(capsys.readouterr().out)
    dress = _by_hand(text_models, "xlmr", ["ein rotes kleid"])[0]
    with Collection(path) as reopened:
        assert [r["id"] for r in found["results"]] == [
            r.id for r in reopened.search_vector(dress, k=3)
        ]
        assert reopened.text_model == text_model

    # index --text-model none forgets it: CLIP's own text tower answers again.
    index = ["-c", str(path), "index", str(photo_dir), "--workers", "0", "-q"]
    assert main([*index, "--text-model", "none"]) == 0
    capsys.readouterr()
    with Collection(path) as reopened:
        assert reopened.text_model is None
        with pytest.raises(EncoderError, match="no tokenizer files"):  # this tiny CLIP has none
            reopened.search_text("a cat")


def test_text_model_dimensions_must_match(
    text_models: TextModels, photo_dir: Path, tmp_path: Path, capsys
) -> None:
    path = tmp_path / "clip"
    clip, narrow = f"hf:{text_models.clip}", f"hf:{text_models.narrow}"
    with pytest.raises(ModelMismatchError, match=r"gives 16-d vectors.*gives 24-d"):
        Collection(path, model=clip, text_model=narrow)
    with Collection(path, model=clip) as collection:
        collection.index(photo_dir, workers=0)
        assert collection.text_model is None  # the refused one was not remembered
        with pytest.raises(ModelMismatchError, match="not one space"):
            collection.use_text_model(narrow)
    args = ["-c", str(path), "search", "--text", "un chat", "--text-model", narrow]
    assert main(args) == 1
    assert "gives 16-d vectors" in capsys.readouterr().err
    # A remembered one that no longer fits (a model switch) fails text queries only.
    with Collection(path) as collection:
        collection.catalog.set_setting("text_model", narrow)
        query = next(photo_dir.rglob("rocket.jpg"))
        assert Path(collection.search(query, k=1).results[0].path) == query
        with pytest.raises(ModelMismatchError):
            collection.search_text("un chat")


def test_text_models_load_only_for_text_queries(
    text_models: TextModels, photo_dir: Path, tmp_path: Path
) -> None:
    copy = tmp_path / "mclip-copy"
    shutil.copytree(text_models.distilbert, copy)
    path = tmp_path / "clip"
    with Collection(path, model=f"hf:{text_models.clip}", text_model=f"hf:{copy}") as collection:
        collection.index(photo_dir, workers=0)
    shutil.rmtree(copy)
    with Collection(path) as collection:
        query = next(photo_dir.rglob("chelsea.jpg"))
        assert Path(collection.search(query, k=1).results[0].path) == query
        with pytest.raises(EncoderError, match="no model folder"):
            collection.search_text("un chat")


def test_bad_text_models_are_clear_errors(text_models: TextModels, tmp_path: Path) -> None:
    with pytest.raises(EncoderError, match="not a sentence-transformers model"):
        create_text_model(f"hf:{text_models.clip}")
    with pytest.raises(EncoderError, match="unknown text model 'clip'"):
        create_text_model("clip")
    broken = tmp_path / "broken"
    shutil.copytree(text_models.distilbert, broken)
    config = json.loads((broken / "2_Dense" / "config.json").read_text())
    (broken / "2_Dense" / "config.json").write_text(
        json.dumps(config | {"activation_function": "torch.nn.modules.activation.Softmax"})
    )
    with pytest.raises(EncoderError, match="unsupported activation"):
        create_text_model(f"hf:{broken}")
    (broken / "2_Dense" / "config.json").write_text(json.dumps(config | {"in_features": 31}))
    with pytest.raises(EncoderError, match="do not fit its config"):
        create_text_model(f"hf:{broken}")
    modules = json.loads((broken / "modules.json").read_text())
    modules[1]["type"] = "sentence_transformers.models.LSTM"
    (broken / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(EncoderError, match="needs a Transformer first, then a Pooling"):
        create_text_model(f"hf:{broken}")


def test_rest_text_search_uses_the_remembered_text_model(
    text_models: TextModels, photo_dir: Path, tmp_path: Path
) -> None:
    import httpx
    from test_rest import LiveServer

    from lookalike.server.rest import create_app
    from lookalike.server.service import SearchService

    clip, text_model = f"hf:{text_models.clip}", f"hf:{text_models.distilbert}"
    with Collection(tmp_path / "clip", model=clip, text_model=text_model) as collection:
        collection.index(photo_dir, workers=0)
    collection = Collection(tmp_path / "clip")
    try:
        with (
            LiveServer(create_app(SearchService(collection))) as live,
            httpx.Client(base_url=live.url, timeout=120) as http,
        ):
            reply = http.post("/search", data={"text": "una foto de un gato", "k": "3"})
            assert reply.status_code == 200, reply.text
            cat = _by_hand(text_models, "distilbert", ["una foto de un gato"])[0]
            expected = [r.id for r in collection.search_vector(cat, k=3)]
            assert [r["id"] for r in reply.json()["results"]] == expected
            # A text model that no longer fits the image model is the client's conflict.
            collection.catalog.set_setting("text_model", f"hf:{text_models.narrow}")
            reply = http.post("/search", data={"text": "un chat", "k": "3"})
            assert reply.status_code == 409 and "16-d" in reply.text
    finally:
        collection.close()
