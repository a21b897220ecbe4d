"""Collection and CLI integration of local-feature re-ranking (scratch test for the diff)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

cv2 = pytest.importorskip("cv2")

from conftest import photo  # noqa: E402

from lookalike.cli.main import main  # noqa: E402
from lookalike.core.collection import Collection  # noqa: E402
from lookalike.local.features import DATABASE_CONFIG  # noqa: E402
from lookalike.local.pixels import THUMBNAIL_KIND  # noqa: E402

cv2.setNumThreads(1)


def test_index_stores_features_and_search_reranks(photo_dir: Path, tmp_path: Path) -> None:
    with Collection(tmp_path / "c") as collection:
        report = collection.index(photo_dir, workers=1, local_features=True)
        assert report.added == 6
        ids = list(collection.catalog.paths().values())
        stored = collection.catalog.local_features(ids, DATABASE_CONFIG.kind)
        assert set(stored) == set(ids)
        # remembered: a new run keeps computing them; nothing to redo
        assert collection.index(photo_dir, workers=1).unchanged == 6
        query = photo("astronaut").crop((60, 40, 400, 380)).rotate(12, expand=True)
        plain = collection.search(query, k=3)
        reranked = collection.search(query, k=3, rerank=5)
        assert Path(reranked[0].path).stem == "astronaut"
        assert reranked[0].score > 0.95 > plain[0].score
        assert len(reranked) == 3
        with pytest.raises(Exception, match="cosine"):
            collection.search(query, k=3, rerank=5, metric="euclidean")


def test_backfill_for_a_collection_indexed_without(photo_dir: Path, tmp_path: Path) -> None:
    with Collection(tmp_path / "c") as collection:
        collection.index(photo_dir, workers=1)
        # Only the thumbnails every image keeps for the pixel check, no local features yet.
        assert list(collection.catalog.local_features_summary()) == [THUMBNAIL_KIND]
        report = collection.index(photo_dir, workers=1, local_features=True)
        assert report.updated == 6
        assert collection.catalog.local_features_summary()[DATABASE_CONFIG.kind][0] == 6


def test_cli_rerank(photo_dir: Path, tmp_path: Path, capsys) -> None:
    col = str(tmp_path / "c")
    assert (
        main(["-c", col, "index", str(photo_dir), "--local-features", "-q", "--workers", "1"]) == 0
    )
    query = tmp_path / "q.jpg"
    photo("coffee").rotate(15, expand=True).save(query)
    capsys.readouterr()
    assert main(["-c", col, "search", str(query), "-k", "2", "--rerank", "5", "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert Path(payload["results"][0]["path"]).stem == "coffee"
    assert payload["results"][0]["score"] > 0.9
