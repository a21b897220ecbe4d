"""``lookalike finetune``: train a fine-tuned encoder on a labelled dataset.

Wired into the main command as::

    finetune = commands.add_parser("finetune", help="train an encoder on labelled images")
    add_finetune_arguments(finetune)
    finetune.set_defaults(run=run_finetune)

This module prints (it is command-line code); the library functions it calls do not.
"""

from __future__ import annotations

import argparse

from lookalike.finetune import LOSSES, PAIR_MINING, TRIPLET_MINING


def add_finetune_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the arguments of ``lookalike finetune`` to ``parser`` (a subcommand parser)."""
    parser.add_argument(
        "dataset",
        help="labelled images: DATASET/<label>/*.jpg, DATASET/<split>/<label>/*.jpg, or a CSV "
        "of path,label[,split]",
    )
    parser.add_argument("--csv", metavar="FILE", help="CSV of path,label[,split] inside DATASET")
    parser.add_argument(
        "--name",
        required=True,
        help="name of the result; it is saved as <base>+NAME (e.g. efficientnet-lite0+clothes)",
    )
    parser.add_argument("--loss", choices=LOSSES, default="supcon", help="default: supcon")
    parser.add_argument(
        "--mining",
        choices=sorted({*PAIR_MINING, *TRIPLET_MINING}),
        help="contrastive: hard (default) or all; triplet: batch-hard (default), semi-hard, all",
    )
    parser.add_argument(
        "--margin",
        type=float,
        help="contrastive (default 2.0), triplet (0.2) or ArcFace (0.3, radians) margin",
    )
    parser.add_argument("--temperature", type=float, default=0.1, help="SupCon temperature")
    parser.add_argument("--scale", type=float, default=30.0, help="ArcFace logit scale")
    parser.add_argument("--dim", type=int, default=128, help="embedding size (default 128)")
    parser.add_argument(
        "--hidden", type=int, default=512, help="hidden layer width of the head; 0: linear head"
    )
    parser.add_argument("--dropout", type=float, default=0.2)
    parser.add_argument(
        "--unfreeze-last",
        type=int,
        default=0,
        metavar="N",
        help="also train the last N backbone stages (EfficientNet-Lite only; each image is "
        "decoded once to cache the activations below them)",
    )
    parser.add_argument("--epochs", type=int, default=30, help="most epochs (default 30)")
    parser.add_argument(
        "--patience",
        type=int,
        default=5,
        help="stop after N epochs without a better validation mAP",
    )
    parser.add_argument("--lr", type=float, default=1e-3, help="head learning rate")
    parser.add_argument("--backbone-lr", type=float, default=1e-4, help="unfrozen stages' rate")
    parser.add_argument("--classes-per-batch", type=int, default=16)
    parser.add_argument("--per-class", type=int, default=16, help="images per class in a batch")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", help="base encoder (default: the collection's)")
    parser.add_argument("--layer", help="base layer (default: the collection's)")
    parser.add_argument("--train-split", default="train", metavar="NAME")
    parser.add_argument(
        "--validation-split",
        metavar="NAME",
        help="split for early stopping (default: validation/val/valid/dev, else 15%% of train)",
    )
    parser.add_argument("--runtime", choices=("auto", "onnx", "torch"), default="auto")
    parser.add_argument(
        "--install",
        action="store_true",
        help="also copy the encoder to $LOOKALIKE_HOME/encoders for every collection to use",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an encoder of that name")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress bars")


def run_finetune(args: argparse.Namespace) -> int:
    """Run ``lookalike finetune``: print each epoch's validation mAP, then a summary."""
    from lookalike.cli.common import ProgressBars, collection_path, database_url
    from lookalike.evaluation.datasets import load_dataset
    from lookalike.finetune.train import EpochReport, TrainConfig
    from lookalike.finetune.workflow import finetune_collection

    config = TrainConfig(
        loss=args.loss,
        epochs=args.epochs,
        patience=args.patience,
        learning_rate=args.lr,
        backbone_learning_rate=args.backbone_lr,
        classes_per_batch=args.classes_per_batch,
        per_class=args.per_class,
        margin=args.margin,
        mining=args.mining,
        temperature=args.temperature,
        scale=args.scale,
        seed=args.seed,
    )
    dataset = load_dataset(args.dataset, csv_file=args.csv)
    collection = collection_path(args.collection)
    bars = ProgressBars(quiet=args.quiet)

    def on_epoch(report: EpochReport) -> None:
        bars.close()
        mark = "  *" if report.best else ""
        print(
            f"epoch {report.epoch:3d}/{report.epochs}  loss {report.loss:.4f}  "
            f"validation mAP {report.validation_map:.4f}  {report.seconds:.1f}s{mark}",
            flush=True,
        )

    report = finetune_collection(
        collection,
        dataset,
        args.name,
        config,
        dim=args.dim,
        hidden=args.hidden,
        dropout=args.dropout,
        unfreeze_last=args.unfreeze_last,
        model=args.model,
        layer=args.layer,
        train_split=args.train_split,
        validation_split=args.validation_split,
        runtime=args.runtime,
        db=database_url(args),
        install=args.install,
        overwrite=args.overwrite,
        progress=bars.update,
        on_epoch=on_epoch,
    )
    bars.close()
    result, splits = report.result, report.splits
    stopped = " (stopped early)" if result.stopped_early else ""
    print(
        f"trained {report.name} with {args.loss} on {len(splits.train)} images of "
        f"{len(splits.classes)} classes in {result.seconds:.1f}s{stopped}; "
        f"best validation mAP {result.best_validation_map:.4f} at epoch {result.best_epoch} "
        f"({len(splits.validation)} images, {splits.validation_source})"
    )
    print(f"saved to {report.encoder.folder}")
    if report.installed is not None:
        print(f"installed to {report.installed}")
    print(
        f"use it: lookalike index {args.dataset} --model {report.name}   "
        f"(re-embeds the collection; vectors of {report.base_key} stay apart)"
    )
    return 0
