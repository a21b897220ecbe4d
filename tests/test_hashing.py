"""Learned binary hashing: losses against hand computation, training, packed Hamming search,
head files, model checks, and the ``lookalike hash`` command on real photos."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import photo, variants

from lookalike.cli.main import main
from lookalike.core.collection import Collection
from lookalike.errors import HashingError, HashModelMismatchError, ModelMismatchError
from lookalike.hashing import train_head
from lookalike.hashing.dch import cauchy_cross_entropy, cauchy_quantization
from lookalike.hashing.evaluate import hamming_map
from lookalike.hashing.hashnet import hashnet_pair_loss
from lookalike.hashing.head import HashHead
from lookalike.knn import create_index

KEY = "toy-model/head/64/000000000000"


# -- losses -----------------------------------------------------------------------------------

CODES = [[0.9, -0.5, 0.2], [0.7, -0.1, 0.4], [-0.3, 0.8, -0.6], [0.1, 0.2, -0.9]]
LABELS = [0, 0, 1, 2]


def _pairs() -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    pairs = [(i, j) for i in range(len(CODES)) for j in range(len(CODES)) if i != j]
    return (
        [p for p in pairs if LABELS[p[0]] == LABELS[p[1]]],
        [p for p in pairs if LABELS[p[0]] != LABELS[p[1]]],
    )


def _similar() -> torch.Tensor:
    labels = torch.tensor(LABELS)
    return (labels[:, None] == labels[None, :]).float()


def test_hashnet_loss_matches_hand_computation() -> None:
    alpha = 0.7

    def inner(i: int, j: int) -> float:
        return alpha * sum(a * b for a, b in zip(CODES[i], CODES[j], strict=True))

    similar, dissimilar = _pairs()
    # Negative log-likelihood of the sigmoid model: -log sigma(x) if similar, else
    # -log(1 - sigma(x)); weights |S|/|S1| and |S|/|S0| over |S| pairs give two means.
    positive = [-math.log(1 / (1 + math.exp(-inner(i, j)))) for i, j in similar]
    negative = [-math.log(1 - 1 / (1 + math.exp(-inner(i, j)))) for i, j in dissimilar]
    expected = sum(positive) / len(positive) + sum(negative) / len(negative)

    got = hashnet_pair_loss(torch.tensor(CODES, dtype=torch.float64), _similar(), alpha)
    assert float(got) == pytest.approx(expected, rel=1e-9)


def test_dch_losses_match_hand_computation() -> None:
    gamma, bits = 2.0, len(CODES[0])

    def cosine(a: list[float], b: list[float]) -> float:
        dot = sum(x * y for x, y in zip(a, b, strict=True))
        return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))

    def distance(a: list[float], b: list[float]) -> float:
        return bits / 2 * (1 - min(cosine(a, b), 0.99))

    def probability(i: int, j: int) -> float:  # Cauchy: gamma / (gamma + d)
        return gamma / (gamma + distance(CODES[i], CODES[j]))

    similar, dissimilar = _pairs()
    positive = [-math.log(probability(i, j)) for i, j in similar]
    negative = [-math.log(1 - probability(i, j)) for i, j in dissimilar]
    expected = sum(positive) / len(positive) + sum(negative) / len(negative)
    got = cauchy_cross_entropy(torch.tensor(CODES, dtype=torch.float64), _similar(), gamma)
    assert float(got) == pytest.approx(expected, rel=1e-9)

    ones = [1.0] * bits
    quantization = [math.log(1 + distance([abs(x) for x in code], ones) / gamma) for code in CODES]
    got = cauchy_quantization(torch.tensor(CODES, dtype=torch.float64), gamma)
    assert float(got) == pytest.approx(sum(quantization) / len(CODES), rel=1e-9)


def test_the_pairs_loss_falls_as_codes_agree_with_labels() -> None:
    """Codes equal within a class and opposite across classes score better than shuffled."""
    good = torch.tensor([[1.0, 1, 1, 1], [1, 1, 1, 1], [-1, -1, -1, -1], [-1, -1, -1, -1]])
    bad = good[[0, 2, 1, 3]]
    similar = (torch.tensor([0, 0, 1, 1])[:, None] == torch.tensor([0, 0, 1, 1])).float()
    assert float(hashnet_pair_loss(good, similar, 1.0)) < float(
        hashnet_pair_loss(bad, similar, 1.0)
    )
    assert float(cauchy_cross_entropy(good, similar, 2.0)) < float(
        cauchy_cross_entropy(bad, similar, 2.0)
    )


# -- training ---------------------------------------------------------------------------------


def _toy(n_per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Four well separated Gaussian classes in 64 dimensions, off the origin like real
    embeddings (all coordinates positive on average)."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(99).normal(size=(4, 64)) * 2.0 + 3.0
    labels = np.repeat(np.arange(4), n_per_class)
    vectors = centres[labels] + rng.normal(size=(len(labels), 64))
    return vectors.astype(np.float32), labels


@pytest.mark.parametrize("method", ["hashnet", "dch"])
def test_training_on_a_separable_toy_set_reaches_near_perfect_map(method: str) -> None:
    train, train_labels = _toy(60, seed=1)
    queries, query_labels = _toy(15, seed=2)
    head, log = train_head(
        method, train, train_labels, 16, KEY, epochs=30, batch_size=64, hidden=64
    )
    assert log.losses[-1] < log.losses[0]
    score = hamming_map(
        head.encode(queries, model_key=KEY),
        query_labels,
        head.encode(train, model_key=KEY),
        train_labels,
    )
    assert score >= 0.97


def test_hashnet_continuation_raises_beta_during_training() -> None:
    train, labels = _toy(30, seed=3)
    _, log = train_head("hashnet", train, labels, 8, KEY, epochs=10, batch_size=40, hidden=0)
    betas = log.schedule["beta"]
    assert betas[0] >= 1.0
    assert betas == sorted(betas)
    assert betas[-1] > 1.5 * betas[0]


@pytest.mark.parametrize("method", ["itq", "lsh"])
def test_baselines_give_codes_of_the_asked_width(method: str) -> None:
    train, labels = _toy(30, seed=4)
    head, _ = train_head(method, train, labels, 12, KEY)
    codes = head.encode(train, model_key=KEY)
    assert codes.shape == (len(train), 2) and codes.dtype == np.uint8
    assert not (codes[:, 1] & 0x0F).any()  # the 4 padding bits stay clear
    bits = np.unpackbits(codes, axis=1)[:, :12]
    assert 0.1 < bits.mean() < 0.9  # centred data: both signs occur


def test_bad_training_requests_raise_typed_errors() -> None:
    train, labels = _toy(10, seed=5)
    with pytest.raises(HashingError, match="unknown hashing method"):
        train_head("pq", train, labels, 16, KEY)
    with pytest.raises(HashingError, match="bits"):
        train_head("lsh", train, labels, 0, KEY)
    with pytest.raises(HashingError, match="no option"):
        train_head("lsh", train, labels, 16, KEY, gamma=3.0)
    with pytest.raises(HashingError, match="two distinct labels"):
        train_head("dch", train, np.zeros(len(train)), 16, KEY, epochs=1)
    with pytest.raises(HashingError, match="ITQ needs"):
        train_head("itq", train[:8], labels[:8], 16, KEY)


# -- Hamming search over packed codes ---------------------------------------------------------


@pytest.mark.parametrize("engine", ["numpy", "faiss"])
def test_packed_hamming_search_matches_brute_force(engine: str) -> None:
    rng = np.random.default_rng(7)
    bits = 48
    database = rng.integers(0, 256, size=(2000, bits // 8), dtype=np.uint8)
    queries = rng.integers(0, 256, size=(25, bits // 8), dtype=np.uint8)
    ids = rng.permutation(10_000)[:2000].astype(np.int64)
    index = create_index(f"binary:packed=true,engine={engine}", dim=bits, metric="hamming")
    index.add(ids, database)
    hits = index.search(queries, 10)

    unpacked_db = np.unpackbits(database, axis=1).astype(np.int32)
    unpacked_q = np.unpackbits(queries, axis=1).astype(np.int32)
    reference = np.abs(unpacked_q[:, None, :] - unpacked_db[None, :, :]).sum(axis=2)
    by_id = dict(zip(ids.tolist(), range(len(ids)), strict=True))
    for row in range(len(queries)):
        expected = np.sort(reference[row])[:10]
        np.testing.assert_array_equal(hits.scores[row], expected)
        found = [reference[row, by_id[i]] for i in hits.ids[row].tolist()]
        np.testing.assert_array_equal(found, hits.scores[row])  # each id has its distance


# -- head files and model identity ------------------------------------------------------------


def test_save_and_load_reproduce_codes_bit_for_bit(tmp_path: Path) -> None:
    train, labels = _toy(30, seed=6)
    head, _ = train_head("dch", train, labels, 24, KEY, epochs=3, hidden=32)
    path = head.save(tmp_path / "dch.npz")
    loaded = HashHead.load(path)
    assert (loaded.method, loaded.bits, loaded.model_key) == ("dch", 24, KEY)
    assert loaded.fingerprint == head.fingerprint
    assert loaded.info["gamma"] == head.info["gamma"]
    fresh, _ = _toy(50, seed=8)
    np.testing.assert_array_equal(
        loaded.encode(fresh, model_key=KEY), head.encode(fresh, model_key=KEY)
    )
    np.testing.assert_array_equal(
        loaded.project(fresh, model_key=KEY), head.project(fresh, model_key=KEY)
    )


def test_a_head_refuses_vectors_of_another_model_and_bad_files(tmp_path: Path) -> None:
    train, labels = _toy(10, seed=9)
    head, _ = train_head("lsh", train, labels, 16, KEY)
    with pytest.raises(HashModelMismatchError, match="trained on vectors of"):
        head.encode(train, model_key="efficientnet-lite1/head/1280/abc")
    with pytest.raises(ModelMismatchError):  # also caught as the catalog's model error
        head.encode(train, model_key="other")
    with pytest.raises(HashingError, match="dimension 64"):
        head.encode(np.ones((2, 32), dtype=np.float32), model_key=KEY)

    broken = tmp_path / "broken.npz"
    broken.write_bytes(b"not a zip file")
    with pytest.raises(HashingError, match="unreadable"):
        HashHead.load(broken)
    with pytest.raises(HashingError, match="no hash head"):
        HashHead.load(tmp_path / "missing.npz")


# -- the command line on real photos ----------------------------------------------------------

CLASSES = ("astronaut", "chelsea", "coffee", "rocket")


@pytest.fixture(scope="module")
def labelled_photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """root/<split>/<label>/*.jpg: each photo and mild edits of it, labelled by photo."""
    root = tmp_path_factory.mktemp("labelled")
    for label in CLASSES:
        image = photo(label)
        edits = {"original": image, **variants(image)}
        for i, (name, edit) in enumerate(edits.items()):
            split = "validation" if i == 4 else "train"
            folder = root / split / label
            folder.mkdir(parents=True, exist_ok=True)
            edit.save(folder / f"{label}-{name}.jpg", quality=90)
    return root


def _run(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    code = main(list(args))
    out, err = capsys.readouterr()
    assert code == 0, err
    return out


def test_cli_trains_searches_and_keeps_codes_in_step_with_the_catalog(
    labelled_photos: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    collection = str(tmp_path / "c")
    trained = json.loads(
        _run(capsys, "-c", collection, "hash", "train", str(labelled_photos), "--method",
             "dch", "--bits", "16", "--epochs", "40", "--hidden", "0", "--json", "-q")
    )  # fmt: skip
    assert (trained["name"], trained["bits"], trained["train_images"]) == ("dch-16", 16, 16)
    assert trained["model"].startswith("efficientnet-lite0/head/1280/")
    assert trained["validation_split"] == "validation"
    assert trained["validation_map"] >= 0.75
    assert Path(trained["path"]).is_file()
    assert "dch-16" in _run(capsys, "-c", collection, "hash", "list")

    # A new edit of the astronaut, never indexed: its nearest codes are astronauts.
    query = tmp_path / "query.jpg"
    photo("astronaut").rotate(4).crop((30, 30, 480, 480)).save(query, quality=85)
    found = json.loads(
        _run(capsys, "-c", collection, "hash", "search", str(query), "--name", "dch-16",
             "-k", "3", "--json")
    )  # fmt: skip
    assert found["metric"] == "hamming"
    assert ["astronaut" in r["path"] for r in found["results"]] == [True, True, True]
    distances = [r["score"] for r in found["results"]]
    assert distances == sorted(distances) and all(d == int(d) for d in distances)

    reranked = json.loads(
        _run(capsys, "-c", collection, "hash", "search", str(query), "--name", "dch-16",
             "-k", "2", "--rerank", "8", "--json")
    )  # fmt: skip
    assert reranked["metric"] == "cosine"
    assert len(reranked["results"]) == 2
    assert reranked["results"][0]["score"] >= reranked["results"][1]["score"]
    assert "astronaut" in reranked["results"][0]["path"]

    # Indexing a new image makes the stored codes stale: the next search includes it.
    everything = ("-c", collection, "hash", "search", str(query), "--name", "dch-16", "-k", "50")
    assert len(json.loads(_run(capsys, *everything, "--json"))["results"]) == 20
    extra = tmp_path / "extra"
    extra.mkdir()
    photo("astronaut").rotate(4).crop((30, 30, 480, 480)).save(extra / "copy.jpg", quality=85)
    _run(capsys, "-c", collection, "index", str(extra), "-q")
    again = json.loads(_run(capsys, *everything, "--json"))["results"]
    assert len(again) == 21
    copy = str((extra / "copy.jpg").resolve())
    assert [r["score"] for r in again if r["path"] == copy] == [0.0]
    best = json.loads(_run(capsys, *everything, "--rerank", "50", "--json"))["results"][0]
    assert best["path"] == copy and best["score"] == pytest.approx(1.0, abs=1e-5)


def test_cli_explains_a_missing_head_and_refuses_a_foreign_one(
    labelled_photos: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], collection_encoder
) -> None:
    collection = tmp_path / "c"
    query = labelled_photos / "train" / "coffee" / "coffee-original.jpg"
    code = main(["-c", str(collection), "hash", "search", str(query), "--name", "nope"])
    assert code == 1  # searching creates no collection
    assert "no collection at" in capsys.readouterr().err and not collection.exists()
    with Collection(collection, encoder=collection_encoder) as created:
        created.index(query.parent, workers=0)
    code = main(["-c", str(collection), "hash", "search", str(query), "--name", "nope"])
    assert code == 1
    assert "no hash head 'nope'" in capsys.readouterr().err

    # A head of another model copied into this model's folder is refused, not applied.
    train, labels = _toy(10, seed=10)
    foreign, _ = train_head("lsh", train, labels, 16, KEY)
    key = collection_encoder.identity.key  # the model the CLI's new collection uses
    folder = collection / "hashing" / re.sub(r"[^A-Za-z0-9._-]+", "_", key)
    foreign.save(folder / "foreign.npz")
    code = main(["-c", str(collection), "hash", "search", str(query), "--name", "foreign"])
    assert code == 1
    assert f"trained on vectors of {KEY}" in capsys.readouterr().err
