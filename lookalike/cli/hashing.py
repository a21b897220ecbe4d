"""``lookalike hash``: train hash heads on a collection and search it by Hamming distance.

Wired into the main command as::

    hashing = commands.add_parser("hash", help="learned binary codes: train, search, list")
    add_hash_arguments(hashing)
    hashing.set_defaults(run=run_hash)

This module prints (it is command-line code); the library functions it calls do not.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from typing import Any

from lookalike.hashing.head import METHODS

DEFAULT_BITS = 64


def add_hash_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``train``, ``search`` and ``list`` under ``parser`` (the ``hash`` subcommand)."""
    actions = parser.add_subparsers(dest="hash_command", required=True)

    train = actions.add_parser(
        "train", help="train a hash head on the collection's features of a labelled dataset"
    )
    train.add_argument(
        "dataset",
        help="dataset folder: DATASET/<label>/*.jpg or DATASET/<split>/<label>/*.jpg, "
        "or a CSV of path,label[,split]; it is indexed into the collection first",
    )
    train.add_argument("--csv", metavar="FILE", help="CSV with path, label (and split) columns")
    train.add_argument("--method", choices=METHODS, required=True)
    train.add_argument(
        "--bits", type=int, default=DEFAULT_BITS, help="code length (measured: 16, 32, 48, 64)"
    )
    train.add_argument("--name", help="name to store the head under (default: METHOD-BITS)")
    train.add_argument(
        "--split",
        default="train",
        help="split to train on when the dataset has splits (default: train)",
    )
    train.add_argument("--epochs", type=int, help="training epochs (hashnet, dch)")
    train.add_argument("--hidden", type=int, help="hidden layer width, 0 for linear (hashnet, dch)")
    train.add_argument("--seed", type=int, help="random seed")
    train.add_argument("--alpha", type=float, help="hashnet: inner-product scale (10/bits)")
    train.add_argument("--gamma", type=float, help="dch: Cauchy scale (default 20)")
    train.add_argument("--quantization", type=float, help="dch: quantization weight lambda")
    train.add_argument("--json", action="store_true")
    train.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    train.set_defaults(hash_run=_train)

    search = actions.add_parser("search", help="find the images whose codes are nearest IMAGE's")
    search.add_argument("image")
    search.add_argument("--name", required=True, help="the hash head to search with")
    search.add_argument("-k", type=int, default=10)
    search.add_argument(
        "--rerank",
        type=int,
        default=0,
        metavar="N",
        help="order the N nearest codes by the cosine of their float features",
    )
    search.add_argument("--json", action="store_true")
    search.set_defaults(hash_run=_search)

    listing = actions.add_parser("list", help="the hash heads stored for the collection's model")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(hash_run=_list)


def run_hash(args: argparse.Namespace) -> int:
    """Run the ``hash`` action the arguments name."""
    result: int = args.hash_run(args)
    return result


def _open(args: argparse.Namespace, *, create: bool = False) -> Any:
    """The collection's hashing; only training (which indexes a dataset) may create it."""
    from lookalike.cli.common import open_collection
    from lookalike.hashing.serving import CollectionHashing

    return CollectionHashing(open_collection(args, create=create))


def _train(args: argparse.Namespace) -> int:
    from lookalike.cli.common import ProgressBars
    from lookalike.evaluation.datasets import load_dataset

    dataset = load_dataset(args.dataset, csv_file=args.csv)
    options = {
        key: getattr(args, key)
        for key in ("epochs", "hidden", "seed", "alpha", "gamma", "quantization")
        if getattr(args, key) is not None
    }
    bars = ProgressBars(quiet=args.quiet)
    hashing = _open(args, create=True)
    try:
        trained = hashing.train(
            dataset,
            method=args.method,
            bits=args.bits,
            name=args.name,
            split=args.split,
            index_progress=bars.stage("index"),
            train_progress=bars.stage("train", unit="epoch"),
            **options,
        )
    finally:
        bars.close()
        hashing.collection.close()
    if args.json:
        payload = {
            "name": trained.name,
            "path": str(trained.path),
            "method": trained.head.method,
            "bits": trained.head.bits,
            "model": trained.head.model_key,
            "train_images": trained.train_images,
            "seconds": round(trained.log.seconds, 3),
            "validation_split": trained.validation_split,
            "validation_map": trained.validation_map,
            "info": trained.head.info,
        }
        print(json.dumps(payload, indent=2))
        return 0
    print(
        f"trained {trained.name} ({trained.head.method}, {trained.head.bits} bits) on "
        f"{trained.train_images} images in {trained.log.seconds:.1f}s; saved to {trained.path}"
    )
    if trained.validation_map is not None:
        print(f"validation mAP ({trained.validation_split} split): {trained.validation_map:.4f}")
    return 0


def _search(args: argparse.Namespace) -> int:
    hashing = _open(args)
    try:
        response = hashing.search(args.image, name=args.name, k=args.k, rerank=args.rerank)
    finally:
        hashing.collection.close()
    if args.json:
        payload = {
            "query": args.image,
            "name": args.name,
            "metric": response.metric.value,
            "results": [asdict(r) for r in response.results],
        }
        print(json.dumps(payload, indent=2))
        return 0
    for rank, result in enumerate(response.results, 1):
        meta = " ".join(f"{k}={v}" for k, v in result.metadata.items())
        print(f"{rank:3d}  {result.score:8.4f}  {result.path}  {meta}".rstrip())
    return 0


def _list(args: argparse.Namespace) -> int:
    from lookalike.hashing.head import HashHead

    hashing = _open(args)
    try:
        heads = {name: HashHead.load(hashing.head_path(name)) for name in hashing.names()}
    finally:
        hashing.collection.close()
    if args.json:
        rows = [
            {"name": n, "method": h.method, "bits": h.bits, "model": h.model_key, "info": h.info}
            for n, h in heads.items()
        ]
        print(json.dumps(rows, indent=2))
        return 0
    if not heads:
        print("no hash heads for the collection's model; train one with 'lookalike hash train'")
    for name, head in heads.items():
        print(f"{name}  {head.method}  {head.bits} bits  {head.model_key}")
    return 0
