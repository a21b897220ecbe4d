"""What a watched folder costs: how soon a change reaches the collection, and what a folder
rename costs when it is recorded as a move instead of embedded again.

With the default model (EfficientNet-Lite0) on ``--n`` photos of clothing-small (skimage
photos when the dataset is absent): the folder is indexed, a :class:`FolderWatcher` started,
and then

- latency: one new photo copied in, ``--repeat`` times, timed from the copy to the catalog
  holding it (the debounce is part of it: the watcher waits that long for quiet);
- a rename of the folder holding every photo, timed until the catalog holds every new path,
  with the images the encoder embedded meanwhile counted (a move embeds none);
- for comparison, the same rename caught up by ``index`` without a watcher, which sees
  deleted and new files and embeds them all again.

Wall time on this machine; other load inflates it.

    python benchmarks/watch.py [--n 300] [--debounce 0.2] [--repeat 5]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from lookalike.core.collection import Collection
from lookalike.core.watch import FolderWatcher, WatchOptions
from lookalike.encoders import create_encoder
from lookalike.encoders.base import Encoder

DATASET = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "clothing-small"


def photos(n: int, folder: Path) -> list[Path]:
    """``n`` photos copied into ``folder``."""
    folder.mkdir(parents=True)
    sources = sorted(DATASET.glob("train/*/*.jpg"))[:n] if DATASET.is_dir() else []
    if len(sources) < n:
        from PIL import Image
        from skimage import data

        names = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "retina")
        for i in range(n):
            image = Image.fromarray(getattr(data, names[i % len(names)])()).convert("RGB")
            image.rotate(i * 7 % 360).save(folder / f"skimage_{i:04d}.jpg", quality=90)
        return sorted(folder.iterdir())
    for i, source in enumerate(sources):
        shutil.copy(source, folder / f"{i:04d}_{source.name}")
    return sorted(folder.iterdir())


def counting(encoder: Encoder) -> tuple[Encoder, Callable[[], int]]:
    """``encoder`` with its embedded images counted."""
    count = [0]
    embed = encoder.embed_pixels

    def counted(pixels):  # type: ignore[no-untyped-def]
        count[0] += len(pixels)
        return embed(pixels)

    encoder.embed_pixels = counted  # type: ignore[method-assign]
    return encoder, lambda: count[0]


def wait(condition: Callable[[], bool], bound: float = 600.0) -> float:
    started = time.perf_counter()
    while not condition():
        if time.perf_counter() - started > bound:
            raise TimeoutError("the watcher did not follow")
        time.sleep(0.005)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=300)
    parser.add_argument("--debounce", type=float, default=0.2)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="lookalike-watch-bench-"))
    try:
        watched = root / "watched"
        album = watched / "album"
        paths = photos(args.n, album)
        spare = photos(args.repeat, root / "spare")
        encoder, embedded = counting(create_encoder("efficientnet-lite0", pooling="gem"))
        collection = Collection(root / "c", encoder=encoder)
        started = time.perf_counter()
        collection.index(watched)
        print(f"indexed {len(paths)} photos in {time.perf_counter() - started:.1f}s")

        reader = Collection(root / "c", encoder=encoder)  # the test's own view, as a server's
        watcher = FolderWatcher(collection, [watched], WatchOptions(debounce=args.debounce))
        watcher.start()
        watcher.caught_up.wait()
        latencies = []
        for source in spare:
            target = str(watched / source.name)
            shutil.copy(source, target)
            latencies.append(wait(lambda t=target: bool(reader.catalog.ids_for_paths([t]))))
        print(
            f"copy in -> in the catalog (debounce {args.debounce}s): median "
            f"{statistics.median(latencies):.2f}s, max {max(latencies):.2f}s over {len(spare)}"
        )

        before = embedded()
        prefix = str(watched.resolve() / "renamed") + os.sep
        started = time.perf_counter()
        os.rename(album, watched / "renamed")
        seconds = wait(
            lambda: sum(p.startswith(prefix) for p in reader.catalog.paths()) == len(paths)
        )
        print(
            f"folder of {len(paths)} renamed -> every path updated: {seconds:.2f}s, "
            f"{embedded() - before} images embedded"
        )
        watcher.stop()

        os.rename(watched / "renamed", album)  # back, with nothing watching
        before = embedded()
        report = collection.index(watched)
        print(
            f"the same rename caught up by index: {report.seconds:.2f}s, "
            f"{embedded() - before} images embedded ({report.removed} removed, "
            f"{report.added} added)"
        )
        reader.close()
        collection.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
