"""Which model a collection searches with, and the model it is switching to.

The active model is named by the catalog's ``model``/``layer``/``pooling``/``scales``
settings. Asking a collection that already has one for another model starts a switch: the new
model's vectors are built beside the old ones (recorded in the ``switch_to`` setting, so a
killed run resumes), the old model keeps answering searches meanwhile, and once the new model
covers every image the settings change in one transaction.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

from lookalike.core.ingest import EncoderRecipe
from lookalike.encoders.base import Encoder, EncoderIdentity
from lookalike.encoders.registry import accepted_options, supported_options
from lookalike.errors import CatalogError

DEFAULT_MODEL = "efficientnet-lite0"
DEFAULT_LAYER = "head"
DEFAULT_POOLING = "gem"
# The arithmetic new collections ask for: the encoder takes bf16 where the CPU runs it natively
# (OpenVINO; about 2x faster indexing, same retrieval quality within 0.005, see
# benchmarks/results/index_throughput.md), else fp32. What it took is recorded, and kept.
DEFAULT_PRECISION = "auto"
SWITCH_SETTING = "switch_to"
# Fine-tuned encoders saved with a collection live here (looked for before the user's own).
ENCODERS_DIR = "encoders"


class ModelCatalog(Protocol):
    """What model choice needs of a catalog."""

    def get_setting(self, key: str, default: str | None = None) -> str | None: ...

    def register_model(self, identity: EncoderIdentity) -> int: ...


@dataclass(frozen=True)
class ModelChoice:
    """A model as the user names it: registry name, layer, pooling, scales and precision
    (None: the encoder's own choice)."""

    name: str
    layer: str
    pooling: str | None = None
    scales: str | None = None
    precision: str | None = None

    def settings(self) -> dict[str, str | None]:
        """The catalog settings that make this the active model."""
        return {
            "model": self.name,
            "layer": self.layer,
            "pooling": self.pooling,
            "scales": self.scales,
            "precision": self.precision,
        }

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ModelChoice:
        try:
            fields = json.loads(text)
            return cls(
                str(fields["name"]),
                str(fields["layer"]),
                fields.get("pooling"),
                fields.get("scales"),
                fields.get("precision"),
            )
        except (ValueError, KeyError, TypeError) as error:
            raise CatalogError(f"the catalog's {SWITCH_SETTING} setting is damaged") from error


def active_choice(catalog: ModelCatalog) -> ModelChoice | None:
    """The model the catalog's settings name, or None for a collection never indexed."""
    name = catalog.get_setting("model")
    if not name:
        return None
    return ModelChoice(
        name,
        catalog.get_setting("layer") or DEFAULT_LAYER,
        catalog.get_setting("pooling") or None,
        catalog.get_setting("scales") or None,
        catalog.get_setting("precision") or None,
    )


def pending_switch(catalog: ModelCatalog) -> ModelChoice | None:
    """The model a switch that has not finished is building, if any."""
    text = catalog.get_setting(SWITCH_SETTING)
    return ModelChoice.from_json(text) if text else None


def requested_choice(
    active: ModelChoice | None,
    *,
    model: str | None,
    layer: str | None,
    pooling: str | None,
    scales: str | None,
    precision: str | None = None,
) -> ModelChoice:
    """The model asked for: what is given, the rest as the active model has it."""
    name = model or (active.name if active else DEFAULT_MODEL)
    same = active is not None and active.name == name
    return ModelChoice(
        name,
        layer or (active.layer if active else DEFAULT_LAYER),
        pooling or (active.pooling if same and active else None),
        scales or (active.scales if same and active else None),
        precision or (active.precision if same and active else None),
    )


class ModelView:
    """One model of a collection: its encoder (built on first use) and its catalog id."""

    def __init__(
        self,
        choice: ModelChoice,
        catalog: ModelCatalog,
        folder: Path,
        runtime_options: dict[str, Any],
        *,
        legacy_pooling: bool = False,
        legacy_precision: bool = False,
        encoder: Encoder | None = None,
    ) -> None:
        self.choice = choice
        self.catalog = catalog
        self.folder = folder
        self.runtime_options = runtime_options
        # A collection indexed before pooling was an option keeps average pooling, so its
        # stored vectors stay valid; new ones get GeM (it measured better on class-level and
        # copy-detection retrieval at the same cost, benchmarks/results/features.md).
        self.legacy_pooling = legacy_pooling
        # Likewise a collection indexed before precision was an option holds fp32 vectors.
        self.legacy_precision = legacy_precision
        self._encoder = encoder
        self._options: dict[str, Any] | None = None
        self._model_id: int | None = None

    @property
    def encoder(self) -> Encoder:
        """The encoder, built on first use (it loads a model)."""
        if self._encoder is None:
            self._encoder = self.recipe().build()
        return self._encoder

    def use_encoder(self, encoder: Encoder) -> None:
        """Use an encoder already built (it must be the one this view names)."""
        self._encoder = encoder

    def recipe(self) -> EncoderRecipe:
        """How to build this model's encoder, here or in another process."""
        return EncoderRecipe(self.choice.name, self.options())

    def options(self) -> dict[str, Any]:
        """The options the encoder is built with (those its family takes); decided once, so
        every process building it from the recipe gets the same one."""
        if self._options is None:
            wanted: dict[str, Any] = {
                "layer": self.choice.layer,
                # Raw vectors are stored; cosine search normalises, so both views stay usable.
                "normalize": False,
                "pooling": self.choice.pooling or self._default_pooling(),
                "scales": self.choice.scales,
                "precision": self.choice.precision or self._default_precision(),
                "search_dirs": [self.folder / ENCODERS_DIR],
                **self.runtime_options,
            }
            self._options = supported_options(self.choice.name, wanted)
        return dict(self._options)

    def _default_pooling(self) -> str | None:
        accepted = accepted_options(self.choice.name)
        if accepted is not None and "pooling" not in accepted:
            return None
        return "avg" if self.legacy_pooling else DEFAULT_POOLING

    def _default_precision(self) -> str | None:
        accepted = accepted_options(self.choice.name)
        if accepted is not None and "precision" not in accepted:
            return None
        return "fp32" if self.legacy_precision else DEFAULT_PRECISION

    @property
    def model_id(self) -> int:
        """The catalog id of this model's encoder identity (registered on first use)."""
        if self._model_id is None:
            self._model_id = self.catalog.register_model(self.encoder.identity)
        return self._model_id

    def resolved(self) -> ModelChoice:
        """The choice as the settings record it: with the pooling the encoder really uses,
        and the encoder's own layer name when its family takes no layer option."""
        options = self.options()
        identity = self.encoder.identity
        pooling = identity.pooling if "pooling" in options else None
        precision = identity.precision if "precision" in options else None
        layer = self.choice.layer if "layer" in options else identity.layer
        return ModelChoice(self.choice.name, layer, pooling, self.choice.scales, precision)
