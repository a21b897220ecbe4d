"""The evaluation suite: metrics on hand-computed cases, dataset layouts and protocols, image
attacks, copy detection with the real encoder, and ``lookalike eval`` end to end."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import PHOTO_NAMES, photo, variants
from PIL import Image

from lookalike.cli.evaluation import add_eval_arguments, run_eval
from lookalike.errors import LookalikeError
from lookalike.evaluation import (
    ATTACKS,
    apply_attack,
    evaluate_vectors,
    f1_at_k,
    generate_copies,
    leave_one_out_protocol,
    load_csv_dataset,
    load_dataset,
    load_folder_dataset,
    make_task,
    map_at_k,
    mean_average_precision,
    micro_average_precision,
    precision_at_k,
    precision_recall_curve,
    recall_at_k,
    retrieval_metrics,
    run_copy_detection,
    run_evaluation,
    same_item_mask,
    score_matrix,
    split_protocol,
)
from lookalike.evaluation.copydetect import parse_attacks, sample_sources
from lookalike.evaluation.metrics import micro_precision_recall, recall_at_precision

# -- metrics ----------------------------------------------------------------------------------

# Query 1 ("a") ranks database items 0(a) 1(b) 3(c) 2(a) 4(a): relevant at ranks 1, 4, 5 (R=3).
# Query 2 ("b") ranks 2(a) 3(c) 4(a) 0(a) 1(b): relevant at rank 5 only (R=1).
SCORES = np.array([[0.9, 0.8, 0.3, 0.7, 0.1], [0.2, 0.1, 0.5, 0.4, 0.3]])
QUERIES = np.array(["a", "b"])
DATABASE = np.array(["a", "b", "a", "c", "a"])


def test_precision_recall_f1_at_k_by_hand() -> None:
    args = (SCORES, QUERIES, DATABASE)
    assert precision_at_k(*args, 1) == pytest.approx((1 + 0) / 2)
    assert precision_at_k(*args, 3) == pytest.approx((1 / 3 + 0) / 2)
    assert precision_at_k(*args, 5) == pytest.approx((3 / 5 + 1 / 5) / 2)
    assert recall_at_k(*args, 1) == pytest.approx((1 / 3 + 0) / 2)
    assert recall_at_k(*args, 4) == pytest.approx((2 / 3 + 0) / 2)
    assert recall_at_k(*args, 5) == pytest.approx(1.0)
    # Per-query F1, then the mean: query 1 at k=1 has P=1, R=1/3 -> 0.5; query 2 has 0.
    assert f1_at_k(*args, 1) == pytest.approx(0.25)
    # At k=5: query 1 P=3/5 R=1 -> 0.75; query 2 P=1/5 R=1 -> 1/3.
    assert f1_at_k(*args, 5) == pytest.approx((0.75 + 1 / 3) / 2)
    # k beyond the database: precision is over the 5 candidates that exist.
    assert precision_at_k(*args, 100) == pytest.approx(precision_at_k(*args, 5))


def test_map_and_map_at_k_by_hand() -> None:
    args = (SCORES, QUERIES, DATABASE)
    ap1 = (1 / 1 + 2 / 4 + 3 / 5) / 3
    ap2 = 1 / 5
    assert map_at_k(*args) == pytest.approx((ap1 + ap2) / 2)
    assert map_at_k(*args) == pytest.approx(mean_average_precision(*args))
    # AP@k divides by min(k, R): query 1 at k=3 has one hit of a possible 3.
    assert map_at_k(*args, 1) == pytest.approx((1 + 0) / 2)
    assert map_at_k(*args, 3) == pytest.approx((1 / 3 + 0) / 2)
    assert map_at_k(*args, 4) == pytest.approx(((1 + 2 / 4) / 3 + 0) / 2)
    assert map_at_k(*args, 5) == pytest.approx((ap1 + ap2) / 2)
    # Distances rank the other way round and give the same numbers.
    assert map_at_k(-SCORES, QUERIES, DATABASE, 3, higher_is_better=False) == pytest.approx(
        map_at_k(*args, 3)
    )


def test_map_at_k_with_more_relevant_than_k() -> None:
    # Four relevant items, the top 2 both relevant: a perfect AP@2 even though R = 4 > k.
    scores = np.array([[0.9, 0.8, 0.7, 0.6, 0.5, 0.4]])
    database = np.array(["a", "a", "b", "a", "b", "a"])
    assert map_at_k(scores, np.array(["a"]), database, 2) == pytest.approx(1.0)
    assert map_at_k(scores, np.array(["a"]), database, 3) == pytest.approx((1 + 1) / 3)


def test_precision_recall_curve_by_hand() -> None:
    levels, precision = precision_recall_curve(SCORES, QUERIES, DATABASE, recall_levels=11)
    np.testing.assert_allclose(levels, np.linspace(0, 1, 11))
    # Query 1: precision 1 up to recall 1/3, then max(2/4, 3/5) = 0.6 up to recall 1.
    # Query 2: its only hit is at rank 5, precision 0.2 at every recall level.
    q1 = np.array([1, 1, 1, 1, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6])
    np.testing.assert_allclose(precision, (q1 + 0.2) / 2)
    # Recall 0.3 of 10 relevant needs the 3rd hit, not a 4th (floating point: 0.3*10 > 3).
    ranks = np.array([[1.0 - i / 100 for i in range(20)]])
    labels = np.array(["x", "y"] * 10)
    _, curve = precision_recall_curve(ranks, np.array(["x"]), labels, recall_levels=[0.3])
    assert curve[0] == pytest.approx(3 / 5)


def test_leave_one_out_excludes_the_query_itself() -> None:
    # Item 0 ("a") is most similar to itself, then to item 1 ("b"), then to item 2 ("a").
    scores = np.array([[1.0, 0.8, 0.5], [0.8, 1.0, 0.3], [0.5, 0.3, 1.0]])
    labels = np.array(["a", "b", "a"])
    with_self = retrieval_metrics(scores, labels, labels, ks=(1, 5))
    assert with_self.precision_at_k[1] == 1.0  # every query finds itself first
    exclude = same_item_mask(np.arange(3), np.arange(3))
    np.testing.assert_array_equal(exclude, np.eye(3, dtype=bool))
    loo = retrieval_metrics(scores, labels, labels, ks=(1, 5), exclude=exclude)
    # Query 0 ranks 1(b), 2(a): AP 1/2; query 2 ranks 0(a), 1(b): AP 1; query 1 ("b") has no
    # other "b", so it is left out of every mean.
    assert loo.queries_without_relevant == 1
    assert loo.mean_ap == pytest.approx((0.5 + 1.0) / 2)
    assert loo.precision_at_k[1] == pytest.approx((0 + 1) / 2)
    # Two candidates are left per query, so precision@5 divides by 2.
    assert loo.precision_at_k[5] == pytest.approx(0.5)
    assert loo.recall_at_k[5] == pytest.approx(1.0)


def test_metrics_match_a_brute_force_reference() -> None:
    rng = np.random.default_rng(7)
    scores = rng.integers(0, 6, size=(40, 60)).astype(float)  # many ties
    queries, database = rng.integers(0, 4, 40), rng.integers(0, 4, 60)
    exclude = rng.random((40, 60)) < 0.1
    metrics = retrieval_metrics(scores, queries, database, ks=(3, 10), exclude=exclude)
    aps, p10 = [], []
    for i in range(40):
        keep = ~exclude[i]
        order = np.argsort(-scores[i, keep], kind="stable")
        relevant = (database[keep][order] == queries[i]).astype(float)
        if relevant.sum() == 0:
            continue
        precision = np.cumsum(relevant) / np.arange(1, len(relevant) + 1)
        aps.append((precision * relevant).sum() / relevant.sum())
        p10.append(relevant[:10].sum() / 10)
    assert metrics.mean_ap == pytest.approx(np.mean(aps))
    assert metrics.precision_at_k[10] == pytest.approx(np.mean(p10))
    no_exclusion = retrieval_metrics(scores, queries, database)
    assert no_exclusion.mean_ap == pytest.approx(mean_average_precision(scores, queries, database))


def test_metric_input_errors() -> None:
    with pytest.raises(LookalikeError, match="do not match"):
        retrieval_metrics(SCORES, QUERIES[:1], DATABASE)
    with pytest.raises(LookalikeError, match="positive"):
        precision_at_k(SCORES, QUERIES, DATABASE, 0)
    with pytest.raises(LookalikeError, match="exclude"):
        retrieval_metrics(SCORES, QUERIES, DATABASE, exclude=np.zeros((2, 2), dtype=bool))
    with pytest.raises(LookalikeError, match="unknown metric"):
        score_matrix(np.ones((1, 2)), np.ones((1, 2)), "hamming")


def test_score_matrix_metrics() -> None:
    queries = np.array([[3.0, 4.0]])
    database = np.array([[3.0, 4.0], [0.0, 2.0], [-6.0, -8.0]])
    cosine, higher = score_matrix(queries, database, "cosine")
    assert higher and np.allclose(cosine, [[1.0, 0.8, -1.0]])
    dot, _ = score_matrix(queries, database, "dot")
    assert np.allclose(dot, [[25.0, 8.0, -50.0]])
    distance, higher = score_matrix(queries, database, "euclidean")
    assert not higher and np.allclose(distance, [[0.0, np.sqrt(9 + 4), 15.0]], atol=1e-3)


def test_micro_average_precision_by_hand() -> None:
    # Pooled ranking: match, miss, match, miss; 3 ground-truth pairs (one never retrieved).
    scores = np.array([0.9, 0.8, 0.7, 0.6])
    matches = np.array([True, False, True, False])
    assert micro_average_precision(scores, matches, 3) == pytest.approx((1 + 2 / 3) / 3)
    # Ties rank misses first (the worst case), so equal scores cannot buy precision.
    assert micro_average_precision(np.array([0.5, 0.5]), np.array([True, False]), 1) == 0.5
    precision, recall, thresholds = micro_precision_recall(scores, matches, 3)
    np.testing.assert_allclose(precision, [1, 1 / 2, 2 / 3, 2 / 4])
    np.testing.assert_allclose(recall, [1 / 3, 1 / 3, 2 / 3, 2 / 3])
    np.testing.assert_allclose(thresholds, scores)
    assert recall_at_precision(precision, recall, 0.9) == pytest.approx(1 / 3)
    assert recall_at_precision(precision, recall, 0.6) == pytest.approx(2 / 3)


def test_evaluate_vectors_takes_precomputed_features() -> None:
    database = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    labels = np.array(["x", "x", "y", "y"])
    queries = np.array([[1.0, 0.05], [0.05, 1.0]])
    for metric in ("cosine", "euclidean", "dot"):
        result = evaluate_vectors(queries, ["x", "y"], database, labels, metric=metric)
        assert result.mean_ap == pytest.approx(1.0), metric
        assert result.precision_at_k[1] == 1.0 and result.recall_at_k[5] == 1.0
    swapped = evaluate_vectors(queries, ["y", "x"], database, labels)
    assert swapped.precision_at_k[1] == 0.0 and swapped.mean_ap == pytest.approx(
        (1 / 3 + 2 / 4) / 2
    )


# -- datasets ---------------------------------------------------------------------------------


def _write_split_dataset(root: Path) -> None:
    """root/<split>/<photo name>/: the photo and two edits in train, two other edits in test."""
    for name in PHOTO_NAMES:
        image = photo(name)
        edits = variants(image)
        for split, items in (
            ("train", {"original": image, "half": edits["half"], "crop": edits["crop"]}),
            ("test", {"bright": edits["bright"], "mirror": edits["mirror"]}),
        ):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for stem, picture in items.items():
                picture.thumbnail((256, 256))  # small files keep the test fast
                picture.save(folder / f"{stem}.jpg", quality=90)


@pytest.fixture(scope="module")
def split_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("split-dataset")
    _write_split_dataset(root)
    return root


def test_folder_per_class_layout(tmp_path: Path) -> None:
    for label in ("cat", "coffee"):
        (tmp_path / label / "more").mkdir(parents=True)
    photo("chelsea").save(tmp_path / "cat" / "a.jpg")
    photo("chelsea").save(tmp_path / "cat" / "more" / "b.png")  # sub-folders keep the class
    photo("coffee").save(tmp_path / "coffee" / "c.jpg")
    (tmp_path / "coffee" / "notes.txt").write_text("not an image")
    dataset = load_folder_dataset(tmp_path)
    assert [p.relative_to(tmp_path).as_posix() for p in dataset.paths] == [
        "cat/a.jpg",
        "cat/more/b.png",
        "coffee/c.jpg",
    ]
    assert dataset.labels == ("cat", "cat", "coffee")
    assert not dataset.has_splits and dataset.class_counts() == {"cat": 2, "coffee": 1}
    task = make_task(dataset)  # no splits: leave-one-out
    assert task.protocol == "leave-one-out" and task.exclude_self
    np.testing.assert_array_equal(task.exclude_mask(), np.eye(3, dtype=bool))
    with pytest.raises(LookalikeError, match="no splits"):
        split_protocol(dataset)

    photo("rocket").save(tmp_path / "loose.jpg")
    with pytest.raises(LookalikeError, match="no class folder"):
        load_folder_dataset(tmp_path)
    with pytest.raises(LookalikeError, match="does not exist"):
        load_folder_dataset(tmp_path / "nowhere")


def test_split_folder_layout_and_protocols(split_dataset: Path) -> None:
    dataset = load_dataset(split_dataset)
    assert dataset.split_names() == ["test", "train"]
    assert len(dataset) == 5 * len(PHOTO_NAMES)
    assert set(dataset.labels) == set(PHOTO_NAMES)
    task = make_task(dataset)
    assert task.protocol == "split" and not task.exclude_self and task.exclude_mask() is None
    assert len(task.query_indices) == 2 * len(PHOTO_NAMES)
    assert len(task.database_indices) == 3 * len(PHOTO_NAMES)
    assert all(p.parts[-3] == "test" for p in task.query_paths)
    assert all(p.parts[-3] == "train" for p in task.database_paths)
    assert list(task.query_labels) == [p.parts[-2] for p in task.query_paths]

    reverse = split_protocol(dataset, query_split="train", database_split="test")
    assert len(reverse.query_indices) == 3 * len(PHOTO_NAMES)
    with pytest.raises(LookalikeError, match="no images in split 'validation'"):
        split_protocol(dataset, database_split="validation")
    one_split = leave_one_out_protocol(dataset, split="test")
    assert len(one_split.query_indices) == 2 * len(PHOTO_NAMES)
    assert one_split.exclude_mask().sum() == 2 * len(PHOTO_NAMES)
    # Forcing the flat layout makes the split folders the labels.
    flat = load_folder_dataset(split_dataset, split_folders=False)
    assert set(flat.labels) == {"test", "train"} and not flat.has_splits


def test_csv_layout_with_splits(split_dataset: Path, tmp_path: Path) -> None:
    rows = ["file,category,subset"]
    rows += [
        f"{p.relative_to(split_dataset).as_posix()},{p.parts[-2]},{p.parts[-3]}"
        for p in load_folder_dataset(split_dataset).paths
    ]
    csv_path = split_dataset / "labels.csv"
    csv_path.write_text("\n".join(rows) + "\n")
    try:
        from_csv = load_csv_dataset(csv_path)
        from_folder = load_folder_dataset(split_dataset)
        assert from_csv.paths == from_folder.paths
        assert from_csv.labels == from_folder.labels and from_csv.splits == from_folder.splits
        assert load_dataset(split_dataset, csv_file="labels.csv").paths == from_csv.paths
        assert load_dataset(csv_path).labels == from_csv.labels
    finally:
        csv_path.unlink()

    # Paths are relative to the CSV's own folder; the split column is optional.
    (tmp_path / "images").mkdir()
    photo("coffee").save(tmp_path / "images" / "cup.jpg")
    photo("chelsea").save(tmp_path / "images" / "cat.jpg")
    (tmp_path / "labels.csv").write_text("path,label\nimages/cup.jpg,drink\nimages/cat.jpg,pet\n")
    dataset = load_csv_dataset(tmp_path / "labels.csv")
    assert dataset.paths == (tmp_path / "images" / "cup.jpg", tmp_path / "images" / "cat.jpg")
    assert dataset.labels == ("drink", "pet") and dataset.splits == (None, None)

    (tmp_path / "missing.csv").write_text("path,label\nimages/gone.jpg,x\n")
    with pytest.raises(LookalikeError, match="do not exist"):
        load_csv_dataset(tmp_path / "missing.csv")
    (tmp_path / "unlabelled.csv").write_text("path,label\nimages/cup.jpg,\n")
    with pytest.raises(LookalikeError, match="empty label"):
        load_csv_dataset(tmp_path / "unlabelled.csv")
    (tmp_path / "odd.csv").write_text("a,b\nimages/cup.jpg,x\n")
    with pytest.raises(LookalikeError, match="path and label"):
        load_csv_dataset(tmp_path / "odd.csv")
    assert load_csv_dataset(tmp_path / "odd.csv", path_column="a", label_column="b").labels == (
        "x",
    )


# -- attacks ----------------------------------------------------------------------------------

# Attacks whose output depends on the seed (flip and grayscale are fixed edits).
RANDOM_ATTACKS = sorted(set(ATTACKS) - {"flip", "grayscale"})


@pytest.fixture(scope="module")
def astronaut() -> Image.Image:
    return photo("astronaut").resize((320, 240))


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_attack_output_is_sensible_and_deterministic(attack: str, astronaut: Image.Image) -> None:
    before = np.asarray(astronaut).copy()
    out = apply_attack(astronaut, attack, seed=3, source_id=5)
    np.testing.assert_array_equal(np.asarray(astronaut), before)  # the input is untouched
    assert isinstance(out, Image.Image) and out.mode == "RGB"
    width, height = out.size
    assert 0.25 * 320 <= width <= 1.6 * 320 and 0.25 * 240 <= height <= 1.6 * 240
    again = apply_attack(astronaut, attack, seed=3, source_id=5)
    assert again.size == out.size and again.tobytes() == out.tobytes()
    # The pixels really changed: a different size, or a visible difference at the same size.
    if out.size == astronaut.size:
        diff = np.abs(np.asarray(out, dtype=np.int16) - before.astype(np.int16))
        assert diff.mean() > 2.0, f"{attack} barely changed the image ({diff.mean():.2f})"
    if attack in RANDOM_ATTACKS:
        others = [apply_attack(astronaut, attack, seed=s, source_id=5) for s in (4, 5)]
        assert any(o.tobytes() != out.tobytes() for o in others)


def test_attack_specifics(astronaut: Image.Image) -> None:
    crop = apply_attack(astronaut, "crop", seed=1)
    assert 0.45 <= crop.width * crop.height / (320 * 240) <= 0.75
    scale = apply_attack(astronaut, "scale", seed=1)
    assert 0.29 <= scale.width / 320 <= 0.61
    border = apply_attack(astronaut, "border", seed=1)
    assert 1.19 <= border.width / 320 <= 1.51
    corner = np.asarray(border)[0, 0]
    assert (np.asarray(border)[:5, :5] == corner).all()  # a solid colour border
    gray = np.asarray(apply_attack(astronaut, "grayscale"))
    assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()
    flipped = apply_attack(astronaut, "flip")
    np.testing.assert_array_equal(np.asarray(flipped), np.asarray(astronaut)[:, ::-1])
    with pytest.raises(LookalikeError, match="unknown attack"):
        parse_attacks("crop,smudge")
    assert parse_attacks(" flip , jpeg,flip") == ["flip", "jpeg"]


def test_copies_are_seeded_and_independent_of_the_attack_list(photo_dir: Path) -> None:
    database = sorted(photo_dir.rglob("*.jpg"))
    np.testing.assert_array_equal(sample_sources(6, 3, seed=1), sample_sources(6, 3, seed=1))
    assert len(sample_sources(6, 100, seed=1)) == 6
    both = list(generate_copies(database, attacks="crop,text", copies=2, seed=9))
    crops = list(generate_copies(database, attacks=["crop"], copies=2, seed=9))
    assert [(c.source_id, c.attack) for c in both][::2] == [(c.source_id, "crop") for c in crops]
    assert [c.image.tobytes() for c in both[::2]] == [c.image.tobytes() for c in crops]


# -- copy detection ---------------------------------------------------------------------------


def test_copy_detection_with_the_real_encoder(photo_dir: Path, encoder) -> None:
    database = sorted(photo_dir.rglob("*.jpg"))
    result = run_copy_detection(database, encoder=encoder, copies=6, seed=0, k=6)
    assert [a.attack for a in result.attacks] == list(ATTACKS)
    assert result.database_size == 6 and len(result.sources) == 6
    # Measured with seed 0: every source ranks first, true matches score 0.68-0.94 and the
    # best distractor 0.37, so micro-AP is 1 too. The floors leave room for small changes.
    floors = {"flip": 0.9, "jpeg": 0.8, "scale": 0.8, "grayscale": 0.75}
    for attack in result.attacks:
        assert attack.queries == 6
        assert attack.recall_at_1 == 1.0, attack.attack
        assert attack.micro_ap == pytest.approx(1.0), attack.attack
        matches = attack.candidate_ids == attack.source_ids[:, None]
        assert matches.sum() == 6  # k = the whole database: each source is somewhere
        true, false = attack.candidate_scores[matches], attack.candidate_scores[~matches]
        assert true.min() >= floors.get(attack.attack, 0.55), attack.attack
        assert false.max() <= 0.5, attack.attack
    assert result.mean_recall_at_1 == 1.0 and result.pooled_micro_ap == pytest.approx(1.0)
    report = result.to_dict()
    assert report["attacks"][0]["attack"] == "crop" and report["mean_micro_ap"] == pytest.approx(1)


def test_copy_detection_with_an_embed_callable_and_a_reranker(
    photo_dir: Path, tmp_path: Path
) -> None:
    database = sorted(photo_dir.rglob("*.jpg"))

    def thumbnails(images: list[Image.Image]) -> np.ndarray:
        # A crude global feature: good enough for near-exact copies.
        return np.stack(
            [
                np.asarray(im.convert("L").resize((16, 16)), dtype=np.float32).ravel()
                for im in images
            ]
        )

    plain = run_copy_detection(
        database, embed=thumbnails, attacks="jpeg,blur", copies=6, k=3, save_dir=tmp_path
    )
    assert plain["jpeg"].recall_at_1 == 1.0 and plain["blur"].recall_at_1 == 1.0
    assert len(list((tmp_path / "jpeg").glob("*.png"))) == 6
    with Image.open(next((tmp_path / "blur").glob("*.png"))) as saved:
        assert saved.mode == "RGB"

    seen: list[tuple[tuple[int, int], int]] = []

    def worst_first(query: Image.Image, candidate_ids: np.ndarray, scores: np.ndarray):
        seen.append((query.size, len(candidate_ids)))
        assert (np.diff(scores) <= 0).all()  # given best first
        return -scores  # turns every ranking upside down

    reranked = run_copy_detection(
        database, embed=thumbnails, attacks="jpeg", copies=6, k=3, rerank=worst_first
    )
    assert len(seen) == 6 and all(n == 3 for _, n in seen)
    assert reranked.reranked and reranked["jpeg"].recall_at_1 == 0.0
    assert reranked["jpeg"].recall_at_k == 1.0  # the source is still among the candidates

    noise = np.random.default_rng(0)
    guessing = run_copy_detection(
        database,
        embed=lambda images: noise.normal(size=(len(images), 8)),
        database_vectors=noise.normal(size=(6, 8)),
        attacks="jpeg",
        copies=6,
        k=1,
    )
    assert guessing["jpeg"].recall_at_1 <= 0.5
    with pytest.raises(LookalikeError, match="exactly one"):
        run_copy_detection(database, attacks="jpeg")
    with pytest.raises(LookalikeError, match="rows"):
        run_copy_detection(database, embed=thumbnails, database_vectors=np.zeros((2, 256)))


# -- end to end -------------------------------------------------------------------------------


def _eval_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="lookalike eval")
    add_eval_arguments(parser)
    return parser.parse_args(list(argv))


def test_run_evaluation_writes_a_report(split_dataset: Path, encoder, tmp_path: Path) -> None:
    task = make_task(load_dataset(split_dataset))
    result = run_evaluation(task, encoder, out_dir=tmp_path / "report", batch_size=16)
    # Every query is an edit of one of the six photos, whose other edits are in the database.
    assert result.precision_at_k[1] == 1.0
    assert result.mean_ap >= 0.95 and result.recall_at_k[5] >= 0.95
    assert result.info["images_embedded"] == 5 * len(PHOTO_NAMES)
    report = json.loads(result.report_path.read_text())
    assert report["retrieval"]["metrics"]["map"] == pytest.approx(result.mean_ap)
    assert report["retrieval"]["encoder"]["model"] == "efficientnet-lite0"

    # The same features given as vectors (leave-one-out over everything this time).
    vectors = encoder.embed(list(task.dataset.paths))
    loo = run_evaluation(leave_one_out_protocol(task.dataset), vectors=vectors, plot=False)
    assert loo.metrics.num_queries == len(task.dataset) and loo.plot_path is None
    assert loo.precision_at_k[1] == 1.0 and loo.mean_ap >= 0.9


def test_lookalike_eval_end_to_end(
    split_dataset: Path, photo_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    assert run_eval(_eval_args(str(split_dataset), "--out", str(out), "-q")) == 0
    printed = capsys.readouterr().out
    assert "split (12 test queries against 18 train images)" in printed
    assert "mAP" in printed and "report.json" in printed
    report = json.loads((out / "report.json").read_text())
    metrics = report["retrieval"]["metrics"]
    assert set(metrics["precision_at_k"]) == {"1", "5", "10", "20", "100"}
    assert metrics["precision_at_k"]["1"] == 1.0 and len(metrics["pr_curve"]["recall"]) == 101
    with Image.open(out / "pr_curve.png") as plot:
        assert plot.format == "PNG" and 400 <= plot.width <= 2000 and 300 <= plot.height <= 2000
        assert len(plot.convert("L").getcolors(1 << 16) or []) > 10  # something was drawn

    # Copy detection over a folder without class folders.
    out = tmp_path / "copies"
    options = ["--attacks", "flip,jpeg", "--copies", "4", "--top-k", "3", "--out", str(out)]
    assert run_eval(_eval_args(str(photo_dir), "--copy-detection", *options, "-q")) == 0
    printed = capsys.readouterr().out
    assert "flip" in printed and "jpeg" in printed and "micro-AP" in printed
    report = json.loads((out / "report.json").read_text())
    copies = report["copy_detection"]
    assert [a["attack"] for a in copies["attacks"]] == ["flip", "jpeg"]
    assert all(a["queries"] == 4 and a["recall_at_1"] == 1.0 for a in copies["attacks"])
    assert report["dataset"]["database"] == len(PHOTO_NAMES)
    with Image.open(out / "pr_curve.png") as plot:
        assert plot.format == "PNG" and plot.width >= 400

    with pytest.raises(LookalikeError, match="no split 'validation'"):
        options = ["--protocol", "split", "--database-split", "validation", "--out", str(out)]
        run_eval(_eval_args(str(split_dataset), "--copy-detection", *options))


def test_importing_the_suite_does_no_heavy_work() -> None:
    code = (
        "import sys, lookalike.evaluation, lookalike.cli.evaluation; "
        "heavy = [m for m in ('matplotlib', 'torch', 'onnxruntime') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
