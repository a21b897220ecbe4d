"""Fine-tuning: metric learning on a user's own labelled images.

A projection head (and optionally the last stages of an EfficientNet-Lite backbone) is trained
with a metric-learning loss on features the collection already stores, and saved as a new
encoder, ``<base>+<name>``, that every part of lookalike can use by that name. See
``docs/finetune.md``.

Modules: :mod:`~lookalike.finetune.losses` (contrastive, triplet, SupCon, ArcFace),
:mod:`~lookalike.finetune.mining` (pair and triplet mining, the class-balanced sampler),
:mod:`~lookalike.encoders.projection` (the projection head), :mod:`~lookalike.finetune.train` (the
training loop), :mod:`~lookalike.finetune.backbone` (activations for unfrozen stages),
:mod:`~lookalike.encoders.finetuned` (saving, finding and running fine-tuned encoders) and
:mod:`~lookalike.finetune.workflow` (the whole run on a collection).
"""

# Names accepted by the command line, kept here so parsing arguments never imports torch.
LOSSES = ("contrastive", "triplet", "supcon", "arcface")
PAIR_MINING = ("hard", "all")
TRIPLET_MINING = ("batch-hard", "semi-hard", "all")
