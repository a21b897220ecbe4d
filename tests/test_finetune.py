"""Fine-tuning: the losses against hand-computed values, training on a separable toy set, and
fine-tuned encoders saved, reloaded, used by a collection and driven from the command line."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import photo, variants
from PIL import ImageEnhance, ImageOps

from lookalike.cli.main import main
from lookalike.core.collection import Collection
from lookalike.encoders import create_encoder
from lookalike.encoders.projection import HeadConfig, ProjectionHead
from lookalike.errors import FinetuneError
from lookalike.evaluation.metrics import mean_average_precision
from lookalike.finetune.losses import ArcFaceLoss, ContrastiveLoss, SupConLoss, TripletLoss
from lookalike.finetune.mining import ClassBalancedSampler
from lookalike.finetune.train import TrainConfig, embed_inputs, train_embedding

# Four 2-d points, two classes; every distance is easy to check on paper.
POINTS = [(0.0, 0.0), (0.0, 1.0), (1.0, 0.0), (0.0, 3.0)]
LABELS = [0, 0, 1, 1]


def _points() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor(POINTS), torch.tensor(LABELS)


def _dist(i: int, j: int) -> float:
    return math.dist(POINTS[i], POINTS[j])


def _positive_pairs() -> list[tuple[int, int]]:
    return [(i, j) for i in range(4) for j in range(4) if i != j and LABELS[i] == LABELS[j]]


def _negatives(i: int) -> list[int]:
    return [j for j in range(4) if LABELS[j] != LABELS[i]]


def test_contrastive_loss_by_hand() -> None:
    margin = 2.0
    pos = [_dist(i, j) ** 2 / 2 for i, j in _positive_pairs()]
    neg_all = [max(0.0, margin - _dist(i, j)) ** 2 / 2 for i in range(4) for j in _negatives(i)]
    # hard: each anchor has one positive, so it keeps its one closest negative
    neg_hard = [
        max(0.0, margin - min(_dist(i, j) for j in _negatives(i))) ** 2 / 2 for i in range(4)
    ]
    x, y = _points()
    expected_all = sum(pos) / len(pos) + sum(neg_all) / len(neg_all)
    expected_hard = sum(pos) / len(pos) + sum(neg_hard) / len(neg_hard)
    assert ContrastiveLoss(margin, "all")(x, y).item() == pytest.approx(expected_all, rel=1e-5)
    assert ContrastiveLoss(margin, "hard")(x, y).item() == pytest.approx(expected_hard, rel=1e-5)
    assert expected_hard > expected_all  # the mined negatives are the harder ones


def test_triplet_loss_by_hand() -> None:
    margin = 0.5
    hard = []
    semi = []
    for a in range(4):
        positives = [p for p in range(4) if p != a and LABELS[p] == LABELS[a]]
        d_ap = max(_dist(a, p) for p in positives)
        hard.append(max(0.0, d_ap - min(_dist(a, n) for n in _negatives(a)) + margin))
        for p in positives:
            d = _dist(a, p)
            farther = [_dist(a, n) for n in _negatives(a) if _dist(a, n) > d]
            d_an = min(farther) if farther else max(_dist(a, n) for n in _negatives(a))
            semi.append(max(0.0, d - d_an + margin))
    x, y = _points()
    assert TripletLoss(margin, "batch-hard")(x, y).item() == pytest.approx(np.mean(hard), 1e-5)
    assert TripletLoss(margin, "semi-hard")(x, y).item() == pytest.approx(np.mean(semi), 1e-5)


def test_supcon_loss_by_hand() -> None:
    temperature = 0.5
    unit = [tuple(v / max(math.hypot(*p), 1e-12) for v in p) for p in POINTS[1:]]
    unit = [(1.0, 0.0), *unit]  # any direction for the origin: give it one explicitly
    labels = LABELS
    total = 0.0
    for i in range(4):
        sims = {j: np.dot(unit[i], unit[j]) / temperature for j in range(4)}
        denominator = sum(math.exp(s) for j, s in sims.items() if j != i)
        positives = [j for j in range(4) if j != i and labels[j] == labels[i]]
        total += -sum(math.log(math.exp(sims[j]) / denominator) for j in positives) / len(positives)
    loss = SupConLoss(temperature)(torch.tensor(unit), torch.tensor(labels))
    assert loss.item() == pytest.approx(total / 4, rel=1e-5)


def test_arcface_loss_by_hand() -> None:
    margin, scale = 0.4, 10.0
    arcface = ArcFaceLoss(2, 2, margin=margin, scale=scale)
    with torch.no_grad():
        arcface.centres.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0]]))
    points = [(1.0, 1.0), (0.0, 1.0), (3.0, 1.0)]
    labels = [0, 1, 1]
    total = 0.0
    for point, label in zip(points, labels, strict=True):
        angles = [
            math.atan2(point[1], point[0]) - 0.0,
            math.pi / 2 - math.atan2(point[1], point[0]),
        ]
        logits = [scale * math.cos(abs(t)) for t in angles]
        logits[label] = scale * math.cos(abs(angles[label]) + margin)
        total += -math.log(math.exp(logits[label]) / sum(math.exp(v) for v in logits))
    loss = arcface(torch.tensor(points), torch.tensor(labels))
    assert loss.item() == pytest.approx(total / 3, rel=1e-5)


def test_class_balanced_batches() -> None:
    labels = np.array([0] * 50 + [1] * 3 + [2] * 7 + [3] * 20)
    sampler = ClassBalancedSampler(labels, classes_per_batch=3, per_class=4, seed=1)
    batches = list(sampler.epoch())
    assert len(batches) == len(labels) // 12
    for batch in batches:
        counts = np.bincount(labels[batch], minlength=4)
        assert sorted(counts[counts > 0].tolist()) == [4, 4, 4]
    with pytest.raises(FinetuneError, match="at least 2 classes"):
        ClassBalancedSampler(np.zeros(10, dtype=int))


@pytest.mark.parametrize("loss", ["contrastive", "triplet", "supcon", "arcface"])
def test_training_separates_a_toy_set(loss: str) -> None:
    # Four classes, each marked in its own dimension, under large shared noise in all 32:
    # cosine in the input space ranks poorly, a learned projection separates them.
    rng = np.random.default_rng(0)
    classes, per_class, dim = 4, 80, 32
    labels = np.repeat(np.arange(classes), per_class)
    features = rng.normal(0, 2.0, (len(labels), dim))
    features[:, :classes] = rng.normal(0, 0.5, (len(labels), classes))
    features[np.arange(len(labels)), labels] += 4.0
    features = features.astype(np.float32)
    train = np.arange(len(labels)) % 4 != 0
    before = mean_average_precision(
        _unit(features[~train]) @ _unit(features[train]).T, labels[~train], labels[train]
    )
    head = ProjectionHead(HeadConfig(in_dim=dim, dim=8, hidden=0, dropout=0.0))
    head.fit_input(features[train])
    config = TrainConfig(
        loss=loss, epochs=40, patience=40, learning_rate=1e-2, scale=16.0,
        classes_per_batch=4, per_class=8,
    )  # fmt: skip
    result = train_embedding(
        head,
        torch.from_numpy(features[train]),
        labels[train],
        torch.from_numpy(features[~train]),
        labels[~train],
        config,
        embedding_dim=8,
    )
    assert before < 0.5
    assert result.best_validation_map > 0.97
    # The model holds the best epoch's weights: recomputing gives the reported mAP.
    vectors = embed_inputs(head, torch.from_numpy(features))
    again = mean_average_precision(
        vectors[~train] @ vectors[train].T, labels[~train], labels[train]
    )
    assert again == pytest.approx(result.best_validation_map)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _edits(name: str) -> list:
    image = photo(name)
    edited = list(variants(image).values())
    edited += [
        ImageEnhance.Contrast(image).enhance(0.7),
        image.rotate(8, expand=False),
        ImageOps.grayscale(image).convert("RGB"),
        image.crop((0, 0, image.width * 3 // 4, image.height * 3 // 4)),
    ]
    return edited


@pytest.fixture(scope="module")
def labelled_photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Real photos as a split dataset: each photo is a class, its edits are its images."""
    root = tmp_path_factory.mktemp("labelled")
    for name in ("astronaut", "chelsea", "coffee", "rocket"):
        for i, image in enumerate(_edits(name)):
            split = "validation" if i in (2, 5) else "train"
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            image.save(folder / f"{i}.jpg", quality=90)
    return root


@pytest.fixture(scope="module")
def finetuned(labelled_photos: Path, tmp_path_factory: pytest.TempPathFactory):
    """A collection with a fine-tuned encoder trained by the command line, and its output."""
    collection = tmp_path_factory.mktemp("collection")
    argv = ["--collection", str(collection), "finetune", str(labelled_photos), "--name", "photos"]
    argv += ["--epochs", "4", "--per-class", "4", "--dim", "32", "-q"]
    return collection, argv


def test_cli_trains_saves_and_the_collection_uses_it(
    finetuned, labelled_photos: Path, capsys: pytest.CaptureFixture
) -> None:
    collection, argv = finetuned
    assert main(argv) == 0
    out = capsys.readouterr().out
    epochs = [line for line in out.splitlines() if line.startswith("epoch")]
    assert len(epochs) == 4 and all("validation mAP 0." in line for line in epochs)
    assert "trained efficientnet-lite0+photos with supcon on 24 images of 4 classes" in out
    folder = collection / "encoders" / "efficientnet-lite0+photos"
    assert (folder / "encoder.json").is_file() and (folder / "head.pt").is_file()
    with pytest.raises(SystemExit):
        main(["finetune", "--help"])
    capsys.readouterr()
    # A second run under the same name refuses to overwrite silently.
    assert main(argv) == 1
    assert "--overwrite" in capsys.readouterr().err

    with Collection(collection) as coll:  # training left the base active
        assert coll.model_name == "efficientnet-lite0"
        base_key = coll.encoder.identity.key
        base_ids, base_vectors = coll.catalog.vectors(coll.model_id)

    name = "efficientnet-lite0+photos"
    assert (
        main(
            ["--collection", str(collection), "index", str(labelled_photos), "--model", name, "-q"]
        )
        == 0
    )
    assert "0 added, 32 updated" in capsys.readouterr().out  # every image re-embedded
    query = labelled_photos / "validation" / "chelsea" / "2.jpg"
    assert main(["--collection", str(collection), "search", str(query), "-k", "3"]) == 0
    hits = capsys.readouterr().out.splitlines()
    assert all("chelsea" in line for line in hits), hits

    with Collection(collection) as coll:
        identity = coll.encoder.identity
        assert coll.model_name == name and identity.dim == 32
        assert identity.key != base_key and identity.weights_sha256 != base_key
        ids, vectors = coll.catalog.vectors(coll.model_id)
        assert len(ids) == 32 and vectors.shape == (32, 32)
        keys = {m["key"]: m["vectors"] for m in coll.catalog.models()}
        # Re-indexing replaced the base vectors: one model's vectors per image, never mixed.
        assert keys == {base_key: 0, identity.key: 32}
        # The stored fine-tuned vectors are the head applied to the stored base vectors.
        order = np.searchsorted(base_ids, ids)
        projected = coll.encoder.apply_head(base_vectors[order])
        assert np.allclose(projected, vectors, atol=1e-5)

    # Switching back re-embeds with the base, and search uses its 1280-d vectors again.
    with Collection(collection, model="efficientnet-lite0") as coll:
        assert coll.index(labelled_photos).updated == 32
        assert coll.search(query, k=1)[0].path.endswith("chelsea/2.jpg")
        assert coll.vector_index().index.dim == 1280


def test_a_reloaded_encoder_reproduces_its_vectors_exactly(finetuned, labelled_photos) -> None:
    collection, argv = finetuned
    if not (collection / "encoders").exists():
        main(argv)
    name = "efficientnet-lite0+photos"
    search = [collection / "encoders"]
    files = sorted(labelled_photos.rglob("*.jpg"))[:6]
    first = create_encoder(name, search_dirs=search).embed(files)
    second = create_encoder(name, search_dirs=search, normalize=False).embed(files)
    assert first.shape == (6, 32)
    assert np.array_equal(first, second)
    assert (
        create_encoder(name, search_dirs=search).identity
        == create_encoder(name, search_dirs=search).identity
    )

    # The name resolves from $LOOKALIKE_HOME/encoders too, after --install or a copy.
    with pytest.raises(FinetuneError, match="no fine-tuned encoder"):
        create_encoder(name)
    with pytest.raises(FinetuneError, match="trained on layer 'head'"):
        create_encoder(name, search_dirs=search, layer="stage6")


def test_a_changed_weights_file_is_refused(finetuned, tmp_path: Path) -> None:
    import shutil

    collection, argv = finetuned
    if not (collection / "encoders").exists():
        main(argv)
    copy = tmp_path / "efficientnet-lite0+photos"
    shutil.copytree(collection / "encoders" / "efficientnet-lite0+photos", copy)
    data = bytearray((copy / "head.pt").read_bytes())
    data[-40] ^= 0xFF
    (copy / "head.pt").write_bytes(bytes(data))
    with pytest.raises(FinetuneError, match="changed since"):
        create_encoder("efficientnet-lite0+photos", search_dirs=[tmp_path])


def test_bad_options_are_typed_errors(labelled_photos: Path, tmp_path: Path, capsys) -> None:
    base = ["--collection", str(tmp_path / "c"), "finetune", str(labelled_photos)]
    assert main([*base, "--name", "bad/name"]) == 1
    assert "must start with a letter" in capsys.readouterr().err
    assert main([*base, "--name", "x", "--loss", "supcon", "--mining", "hard"]) == 1
    assert "--mining applies" in capsys.readouterr().err
    assert main([*base, "--name", "x", "--epochs", "0"]) == 1
    assert "epochs must be at least 1" in capsys.readouterr().err


def test_backbone_split_runs_the_same_network(encoder) -> None:
    from lookalike.encoders.efficientnet_lite import VARIANTS, load_pretrained

    network = load_pretrained(VARIANTS["efficientnet-lite0"])
    x = torch.randn(1, 3, 224, 224)
    with torch.inference_mode():
        whole = network.features(x)[-1]
        for stage in (1, 6, 7):
            split = network.forward_from(network.forward_until(x, stage), stage)
            assert torch.allclose(split, whole, atol=1e-5)


@pytest.mark.slow
def test_unfrozen_stages_are_trained_saved_and_reloaded(
    labelled_photos: Path, tmp_path: Path, capsys
) -> None:
    collection = tmp_path / "c"
    argv = ["--collection", str(collection), "finetune", str(labelled_photos), "--name", "deep"]
    argv += ["--unfreeze-last", "1", "--epochs", "1", "--per-class", "4", "--dim", "16", "-q"]
    assert main(argv) == 0
    assert "trained efficientnet-lite0+deep" in capsys.readouterr().out
    folder = collection / "encoders" / "efficientnet-lite0+deep"
    trained = torch.load(folder / "backbone.pt", weights_only=True)
    assert any(k.startswith("_blocks.15.") for k in trained)  # stage 7 of Lite0
    assert not any(k.startswith("_blocks.14.") for k in trained)  # stage 6 stayed frozen
    search = [collection / "encoders"]
    files = sorted(labelled_photos.rglob("*.jpg"))[:3]
    name = "efficientnet-lite0+deep"
    first = create_encoder(name, search_dirs=search, runtime="torch").embed(files)
    second = create_encoder(name, search_dirs=search, runtime="torch").embed(files)
    assert first.shape == (3, 16) and np.array_equal(first, second)
    with pytest.raises(FinetuneError, match="trained backbone stages"):
        create_encoder(name, search_dirs=search, runtime="torch").apply_head(np.zeros((1, 1280)))
