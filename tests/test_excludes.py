"""What an index run leaves out on purpose, and says so: hidden and system folders, --exclude
globs, the folder's .lookalikeignore, RAW files beside their JPEG (test_formats), and the
megapixel cap, which is reported per file while the run goes on. Real folders, real photos,
the real scanner and indexer, the CLI in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import photo

from lookalike.core.collection import Collection
from lookalike.core.ingest import IGNORE_FILE, ScanRules, scan_images
from lookalike.errors import LookalikeError

# Where each photo goes below the root; the names say what should happen to it.
TREE = {
    "keep.jpg": "astronaut",
    "sub/keep.PNG": "chelsea",
    "sub/drafts/draft.jpg": "coffee",
    "tmp/scratch.jpg": "rocket",
    "holiday.TMP.jpg": "retina",
    ".hidden/secret.jpg": "camera",
    ".hidden.jpg": "moon",
    ".git/objects/blob.jpg": "brick",
    "@eaDir/keep.jpg/SYNOFILE_THUMB_XL.jpg": "grass",
    ".thumbnails/normal/thumb.png": "gravel",
    "$RECYCLE.BIN/S-1-5-21/deleted.jpg": "coins",
    "sub/@EADIR/keep.PNG/SYNOPHOTO_THUMB_M.jpg": "clock",
}
VISIBLE = {"keep.jpg", "sub/keep.PNG", "sub/drafts/draft.jpg", "tmp/scratch.jpg", "holiday.TMP.jpg"}
HIDDEN = {".hidden/secret.jpg", ".hidden.jpg"}


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "photos"
    for relative, name in TREE.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        photo(name).resize((96, 96)).save(path, format="PNG" if path.suffix == ".png" else None)
    (root / "notes.txt").write_text("not an image")
    (root / ".DS_Store").write_bytes(b"\0" * 16)
    return root


def found(root: Path, rules: ScanRules | None = None) -> set[str]:
    scan = scan_images(root, rules=rules)
    assert scan.failed == []
    return {os.path.relpath(path, root) for path in scan.files}


def skipped(root: Path, rules: ScanRules | None = None) -> dict[str, str]:
    return {os.path.relpath(p, root): why for p, why in scan_images(root, rules=rules).skipped}


def test_hidden_and_system_folders_are_skipped_by_default_and_listed(tree: Path) -> None:
    assert found(tree) == VISIBLE
    assert skipped(tree) == {
        ".hidden": "hidden folder .hidden",
        ".hidden.jpg": "hidden file .hidden.jpg",
        ".git": "system folder .git",
        "@eaDir": "system folder @eaDir",
        ".thumbnails": "system folder .thumbnails",
        "$RECYCLE.BIN": "system folder $RECYCLE.BIN",
        "sub/@EADIR": "system folder @EADIR",  # any case
    }  # notes.txt and .DS_Store are no images: neither indexed nor listed


def test_include_hidden_indexes_hidden_entries_but_never_system_folders(tree: Path) -> None:
    rules = ScanRules(include_hidden=True)
    assert found(tree, rules) == VISIBLE | HIDDEN
    assert set(skipped(tree, rules)) == {
        ".git",
        "@eaDir",
        ".thumbnails",
        "$RECYCLE.BIN",
        "sub/@EADIR",
    }


def test_exclude_globs_match_names_anywhere_or_paths_below_the_root(tree: Path) -> None:
    rules = ScanRules(exclude=("drafts", "*.tmp.JPG", "/tmp/"))
    assert found(tree, rules) == {"keep.jpg", "sub/keep.PNG"}
    reasons = skipped(tree, rules)
    assert reasons["sub/drafts"] == "excluded by pattern 'drafts' (--exclude)"
    assert reasons["holiday.TMP.jpg"] == "excluded by pattern '*.tmp.JPG' (--exclude)"
    assert reasons["tmp"] == "excluded by pattern '/tmp/' (--exclude)"

    # With a slash the pattern is a path below the root: "sub/*" is not "*/sub/*".
    assert found(tree, ScanRules(exclude=("sub/*",))) == VISIBLE - {
        "sub/keep.PNG",
        "sub/drafts/draft.jpg",
    }
    assert found(tree, ScanRules(exclude=("drafts/*",))) == VISIBLE
    assert found(tree, ScanRules(exclude=("**/d?aft.jpg",))) == VISIBLE - {"sub/drafts/draft.jpg"}
    # A trailing slash matches folders only; "[...]" is a class, "[!...]" its complement.
    assert found(tree, ScanRules(exclude=("keep.jpg/",))) == VISIBLE
    assert found(tree, ScanRules(exclude=("[!k]*.jpg",))) == VISIBLE - {
        "sub/drafts/draft.jpg",
        "tmp/scratch.jpg",
        "holiday.TMP.jpg",
    }


def test_the_ignore_file_adds_patterns_and_can_take_one_back(tree: Path) -> None:
    (tree / IGNORE_FILE).write_text(
        "# drafts and scratch files are not photos\n\nsub/drafts/\n*.jpg\n!keep.jpg\n"
    )
    assert found(tree) == {"keep.jpg", "sub/keep.PNG"}
    reasons = skipped(tree)
    origin = f"{IGNORE_FILE} in {tree}"
    assert reasons["sub/drafts"] == f"excluded by pattern 'sub/drafts/' ({origin})"
    assert reasons["tmp/scratch.jpg"] == f"excluded by pattern '*.jpg' ({origin})"
    # --exclude patterns come first, so the ignore file's "!keep.jpg" wins over them.
    assert found(tree, ScanRules(exclude=("keep.*",))) == {"keep.jpg"}


def test_skip_reason_checks_every_folder_of_a_path(tree: Path) -> None:
    """What a watcher asks about one file event, deep in the tree."""
    rules = ScanRules(exclude=("drafts",))
    root = str(tree)
    reason = rules.skip_reason
    assert reason(root, str(tree / ".git/objects/blob.jpg"), False) == (
        "inside a skipped folder (system folder .git)"
    )
    assert reason(root, str(tree / "sub/drafts/draft.jpg"), False) == (
        "inside a skipped folder (excluded by pattern 'drafts' (--exclude))"
    )
    assert (
        reason(root, str(tree / "sub/drafts"), True) == "excluded by pattern 'drafts' (--exclude)"
    )
    assert reason(root, str(tree / ".hidden.jpg"), False) == "hidden file .hidden.jpg"
    assert reason(root, str(tree / "sub/keep.PNG"), False) is None
    assert reason(root, str(tree / "sub/new.jpg"), False) is None  # need not exist yet
    assert reason(root, str(tree), True) is None
    (tree / IGNORE_FILE).write_text("keep.*\n")
    assert reason(root, str(tree / "sub/keep.PNG"), False) == (
        f"excluded by pattern 'keep.*' ({IGNORE_FILE} in {tree})"
    )
    # A RAW file is skipped beside a same-stem JPEG, unless told otherwise.
    (tree / "IMG_7.CR2").write_bytes(b"")
    (tree / "img_7.JPG").write_bytes(b"")
    assert reason(root, str(tree / "IMG_7.CR2"), False) == (
        "RAW file with a JPEG beside it (img_7.JPG); raw_with_jpeg indexes both"
    )
    assert ScanRules(raw_with_jpeg=True).skip_reason(root, str(tree / "IMG_7.CR2"), False) is None


def test_bad_rules_are_refused_up_front() -> None:
    with pytest.raises(LookalikeError, match="not a pattern"):
        ScanRules(exclude=("/",))
    with pytest.raises(LookalikeError, match="sequence of globs"):
        ScanRules(exclude="*.jpg")  # type: ignore[arg-type]
    for bad in (0, -1.5, float("nan"), True):
        with pytest.raises(LookalikeError, match="max_megapixels"):
            ScanRules(max_megapixels=bad)
    assert ScanRules(exclude=["a", "b"]).exclude == ("a", "b")  # type: ignore[arg-type]


def test_an_index_run_skips_excludes_and_caps_megapixels_while_going_on(
    tree: Path, tmp_path: Path, encoder
) -> None:
    photo("hubble_deep_field").save(tree / "sub" / "big.jpg", quality=90)  # 1000x872
    big = str(tree / "sub" / "big.jpg")
    draft = str(tree / "sub" / "drafts" / "draft.jpg")
    with Collection(tmp_path / "collection", encoder=encoder) as collection:
        rules = ScanRules(exclude=("drafts",), max_megapixels=0.5)
        report = collection.index(tree, workers=0, rules=rules)
        assert report.failed == [
            (big, "too large: 1000x872 is 0.9 megapixels, over the 0.5-megapixel cap "
             "(max_megapixels)")
        ]  # fmt: skip
        assert report.added == len(VISIBLE) - 1  # the rest is indexed
        assert (os.path.dirname(draft), "excluded by pattern 'drafts' (--exclude)") in (
            report.skipped
        )
        assert len(report.skipped) == 8  # 5 system folders, 2 hidden, 1 excluded
        assert dict(collection.info().failures) == {big: report.failed[0][1]}

        # Default rules: the draft and the big photo come in, and the failure is forgotten.
        report = collection.index(tree, workers=0)
        assert (report.added, report.failed, len(report.skipped)) == (2, [], 7)
        assert collection.info().failures == []
        # Excluded later: dropped like a deleted file.
        report = collection.index(tree, workers=0, rules=ScanRules(exclude=("drafts",)))
        assert (report.removed, report.unchanged) == (1, len(VISIBLE))
        assert draft not in collection.catalog.paths()


def lookalike(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, "-m", "lookalike.cli", *args], capture_output=True, text=True, timeout=300
    )
    if check:
        assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}{result.stderr}"
    return result


def test_the_cli_flags(tree: Path, tmp_path: Path) -> None:
    collection = str(tmp_path / "collection")
    (tree / IGNORE_FILE).write_text("tmp/\n")
    photo("hubble_deep_field").save(tree / "sub" / "big.jpg", quality=90)  # 1000x872
    out = lookalike(
        "-c", collection, "index", str(tree), "-q",
        "--exclude", "drafts", "--exclude", "*.tmp.jpg",
        "--include-hidden", "--max-megapixels", "0.3",
    ).stdout  # fmt: skip
    # In: keep.jpg, sub/keep.PNG and the two hidden photos; the big one is refused.
    assert "4 added" in out and "1 failed" in out, out
    assert (
        f"skipped {tree / 'sub' / 'big.jpg'}: too large: 1000x872 is 0.9 megapixels, over the "
        "0.3-megapixel cap" in out
    ), out
    assert "left out on purpose (not failures): 5 system folders, 3 excluded\n" in out, out
    info = json.loads(lookalike("-c", collection, "info", "--json").stdout)
    assert info["images"] == 4

    out = lookalike("-c", collection, "index", str(tree), "-q", "--max-megapixels", "none").stdout
    # Without the flags: the two hidden photos go, the excluded two and the big one come in.
    assert "3 added, 0 updated, 0 moved, 2 removed" in out and "0 failed" in out, out
    assert "left out on purpose (not failures): 2 hidden, 5 system folders, 1 excluded" in out

    refused = lookalike(
        "-c", collection, "index", str(tree), "--max-megapixels", "big", check=False
    )
    assert refused.returncode == 2 and "not a positive number of megapixels" in refused.stderr
    bad_glob = lookalike("-c", collection, "index", str(tree), "--exclude", "/", check=False)
    assert bad_glob.returncode == 1 and "'/' is not a pattern" in bad_glob.stderr
