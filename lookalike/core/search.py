"""The one query path: every interface (library, CLI, REST, both gRPC services) searches here.

A query is one or more vectors (an image's, its crops', a text's, or a stored image's); the
:class:`Searcher` takes it through the same steps whatever asked:

1. candidates from the vector index of the metric (centred/whitened as the index was built);
2. alpha query expansion when asked (cosine only);
3. metadata filters, widening the candidate list until ``k`` pass or every image was seen;
4. multi-crop views merged, each image keeping its best score;
   for a single image (``copy_views``, the default), the best candidates whose thumbnails
   show the query's pixels go first (:class:`PixelCheck`), and copy views are searched when
   none does, the best score is weak and the image's corners look padded;
5. re-ranking by local features (SIFT or patch tokens) when asked (cosine only);
6. the cut to ``k`` and the threshold (:func:`lookalike.core.results.cut`);
7. the order a ``sort`` key asks for, among those ``k`` (:func:`lookalike.core.filters.sort_items`).

A combined :class:`Query` (several positive images, negative images, a text, each weighted)
becomes one vector first: the weighted sum of the parts' L2-normalised vectors, negatives
subtracted, renormalised (:meth:`Searcher.query_views`); the steps above then apply to it.
Measured against reciprocal-rank fusion in ``benchmarks/results/combined_queries.md``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Protocol, TypedDict, Unpack

import numpy as np
from PIL import Image

from lookalike.catalog import ImageRecord
from lookalike.core.filters import (
    Filter,
    Near,
    SortKey,
    Where,
    Within,
    make_filter,
    parse_sort,
    sort_items,
)
from lookalike.core.local_store import (
    COPY_CANDIDATES,
    RERANK_WIDEN,
    STRONG_INLIERS,
    LocalFeatureStore,
    QueryLocal,
)
from lookalike.core.results import SearchResponse, SearchResult, best_first, cut
from lookalike.core.transform import PreparedIndex
from lookalike.encoders.base import Encoder
from lookalike.errors import (
    CorruptVectorError,
    EmptyCollectionError,
    EncoderError,
    ModelMismatchError,
    NotFoundError,
    RequestError,
)
from lookalike.images import ImageSource, load_image
from lookalike.knn.base import Metric, SearchHits, l2_normalize
from lookalike.knn.exact import score_matrix
from lookalike.local.pixels import UPRIGHT_SCALES, PixelQuery, Thumbnail
from lookalike.local.rerank import COPY_PROBABILITY, SEARCH_RULE, CopyCheck, in_context

_log = logging.getLogger(__name__)

# Records are fetched this many at a time when every image is ranked exactly.
_EXHAUSTIVE_CHUNK = 1024

# The most parts (images, negatives, text) one combined query may have.
MAX_QUERY_PARTS = 16

QUERY_KINDS = ("image", "negative", "text")

# The default search's pixel check (:class:`PixelCheck`): the best ``PIXEL_CANDIDATES``
# candidates of a single image query are compared with it thumbnail to thumbnail, and those
# showing at least ``PIXEL_COPY_AT`` of its pixels (:func:`lookalike.local.pixels.
# copy_likeness`), and standing out from the rest by ``PIXEL_MARGIN``, go first. On
# product photos against plain backgrounds, different items of one cut are alike at 32
# pixels: a copy must be clearly more alike than the other candidates (several copies of one
# photo stand out together). Tuned on the train splits of grocery-store and clothing-small
# (grocery-store alone first: 0.75-0.85 found the same copies within a point; without the
# margin, clothing-small's rotated copies lost first place to garments of the same shape);
# 20 candidates hold the source of 95-100% of edited copies there; 16 found as many (mean
# recall@1 on the train splits 0.970 -> 0.969 grocery-store, 0.981 -> 0.982 clothing-small)
# for a fifth less of the check's time, which keeps clothing-small's weak queries (nearly
# all of them) within twice the plain search's time.
PIXEL_CANDIDATES = 16
PIXEL_COPY_AT = 0.8
PIXEL_MARGIN = 0.1
PIXEL_SAME = 0.03
# Only candidates within this of the best score are measured: the source of a copy the
# thumbnails can find sits close to the top. Replayed on both train splits' candidates:
# 0.2-0.3 found the same copies as all 20 (grocery-store 0.955, clothing-small 0.979), with
# 8-14 and 4-7 candidates measured a query.
PIXEL_WITHIN = 0.25
# When no candidate stands out as a copy but one shows at least ``PIXEL_LEAN_FROM`` of the
# query's pixels, the measured candidate with the best cosine plus ``PIXEL_LEAN`` times its
# likeness goes first (:meth:`PixelCheck.leaning`): a cropped or rotated copy's source beats
# another shot of the same crate by its pixels, while an unrelated garment of the same cut
# (alike at 32 pixels) does not beat a clearly closer vector. Replayed on both train splits'
# captured candidates (100 sources x 16 attacks): weight 0.1 / 0.15 / 0.2 / 0.25 / 0.3 /
# 0.4 gave grocery-store 0.967 -> 0.974 / 0.978 / 0.980 / 0.983 / 0.983 / 0.983 and
# clothing-small 0.981 -> 0.983 / 0.986 / 0.987 / 0.987 / 0.987 / 0.985 mean recall@1;
# from 0.6 rather than 0.5 (a tenth of a point on grocery-store train) keeps held-out
# grocery-store photos without a copy as they were (12% of them lean instead of 45%, the
# class of their first result unchanged; clothing-small's first results share their class
# 232 -> 238 times in 300).
PIXEL_LEAN = 0.25
PIXEL_LEAN_FROM = 0.6
# A query turned upright (its angle read from the tilted borders of a rotated copy) shows its
# source less than a plain copy does (resampled twice, often cropped and recoloured too), and
# the angle is itself a sign of an edited copy: with no copy standing out, the candidate most
# alike the upright view goes first when it shows ``PIXEL_UPRIGHT_AT`` of it and the next
# ``PIXEL_UPRIGHT_MARGIN`` less (:meth:`PixelCheck.upright_copy`). On the train splits'
# cropped, rotated and recoloured copies (400 sources each; upright scales as in
# ``lookalike.local.pixels.UPRIGHT_SCALES``) grocery-store's came first 0.8625 -> 0.895 of
# the time (0.6-0.7: within 0.005), clothing-small's 0.9375 -> 0.935; every attack of both
# sets (100 sources x 16): 0.986 and 0.988 mean recall@1, as without it.
PIXEL_UPRIGHT_AT = 0.65
PIXEL_UPRIGHT_MARGIN = 0.08
# A weak query (best score under ``COPY_VIEWS_BELOW``) in which no copy stands out has the
# ``PIXEL_LAYOUTS`` images whose thumbnails' layout is nearest its own (or its upright
# view's, or their mirror images': :class:`lookalike.local.pixels.LayoutTable`) measured
# too, wherever their vectors rank them: a blurred, recoloured, greyed or shrunken copy whose
# vector drifted past the candidates. Replayed on both train splits' weak queries (100
# sources x 16 attacks): 4, 8, 16 and 32 found the same copies on grocery-store (mean
# recall@1 0.982 -> 0.985); 8 one more than 4 on clothing-small (0.987 -> 0.988).
PIXEL_LAYOUTS = 8
# An image measured for its layout alone counts only when it shows this much of the query
# (else it is left unmeasured, as if never looked at): an edit all over keeps nearly all of
# its source's pixels (on the train splits the sources found by their layout showed
# 0.96-1.0 of a thumbnail, blurred or overlaid copy), while garments of one cut on white
# often show 0.9 of each other (91 of clothing-small train's 1,327 other layout candidates;
# 14 at 0.95; as queries without a copy, one of clothing-small validation's came first at
# 0.901). A query turned upright is exempt: the angle read from the fill around a rotated
# photo is itself a sign of an edited copy, and its source, cropped and recoloured, shows
# 0.6-0.87. Replayed on the train splits with the upright rule (100 sources x 16 attacks;
# 400 rotated, cropped and recoloured copies): keeping every neighbour, grocery-store 0.986,
# clothing-small 0.988 mean recall@1, rotation-crop-color 0.895 and 0.935; 0.95 for every
# query 0.985 and 0.988, 0.880 and 0.938; 0.95 with the upright exempt 0.986 and 0.989, 0.895
# and 0.935 (0.85 / 0.9: clothing-small 0.988 / 0.989).
PIXEL_LAYOUT_COPY_AT = 0.95
# Only neighbours whose layout correlates this much with the query's are measured (a query
# turned upright: its view is a crop of the source, ``PIXEL_LAYOUT_UPRIGHT_NEAR``): the
# check's time goes to candidates that can count. Replayed on the train splits, 0.93-0.98 and
# 0.5 found the same copies as measuring all 8 (0.6 lost 0.25 point of grocery-store's
# rotated, cropped and recoloured copies, 0.8 1.25 points), measuring 341 rather than 664
# neighbours for grocery-store's 99 weak queries; clothing-small's photos without a copy
# went from 2.09x to 1.80-1.86x the plain search's time.
PIXEL_LAYOUT_NEAR = 0.93
PIXEL_LAYOUT_UPRIGHT_NEAR = 0.5


@dataclass(frozen=True)
class QueryPart:
    """One part of a combined query: a positive ``image``, a ``negative`` image or a
    ``text``, with its weight (a positive number; a negative's weight is subtracted)."""

    kind: str
    source: Any
    weight: float = 1.0


@dataclass(frozen=True)
class Query:
    """A combined query: its parts, in the order positives, negatives, text. Build it with
    :meth:`Query.of`, which checks it."""

    parts: tuple[QueryPart, ...]

    @classmethod
    def of(
        cls,
        positives: Sequence[ImageSource] = (),
        *,
        negatives: Sequence[ImageSource] = (),
        text: str | None = None,
        weights: Sequence[float] | None = None,
    ) -> Query:
        """The query of ``positives``, ``negatives`` and ``text``; ``weights`` (default all
        1) in that order: one per positive, one per negative, then one for the text."""
        if isinstance(positives, str | bytes | os.PathLike) or not isinstance(positives, Sequence):
            positives = [positives]
        if isinstance(negatives, str | bytes | os.PathLike) or not isinstance(negatives, Sequence):
            negatives = [negatives]
        kinds = ["image"] * len(positives) + ["negative"] * len(negatives)
        sources: list[Any] = [*positives, *negatives]
        if text is not None:
            kinds.append("text")
            sources.append(text)
        if weights is None:
            weights = [1.0] * len(kinds)
        weights = list(weights)
        if len(weights) != len(kinds):
            raise RequestError(
                f"{len(weights)} weight(s) for {len(kinds)} query part(s); give one per "
                "positive image, then one per negative image, then one for the text"
            )
        return cls(
            tuple(
                QueryPart(kind, source, float(weight))
                for kind, source, weight in zip(kinds, sources, weights, strict=True)
            )
        )

    def __post_init__(self) -> None:
        if len(self.parts) > MAX_QUERY_PARTS:
            raise RequestError(
                f"a query may have at most {MAX_QUERY_PARTS} parts, got {len(self.parts)}"
            )
        for part in self.parts:
            if part.kind not in QUERY_KINDS:
                raise RequestError(f"unknown query part {part.kind!r}")
            if not math.isfinite(part.weight) or part.weight <= 0:
                raise RequestError(
                    f"weights must be positive numbers (a negative image's weight is "
                    f"subtracted), got {part.weight} for a {part.kind} part"
                )
        if not self.positives and self.text is None:
            if self.negatives:
                raise RequestError(
                    "a query of negative images only has nothing to search for; add a "
                    "positive image or a text"
                )
            raise RequestError("the query is empty: give at least one image or a text")
        if sum(part.kind == "text" for part in self.parts) > 1:
            raise RequestError("a query takes one text at most")

    @property
    def positives(self) -> list[QueryPart]:
        return [part for part in self.parts if part.kind == "image"]

    @property
    def negatives(self) -> list[QueryPart]:
        return [part for part in self.parts if part.kind == "negative"]

    @property
    def text(self) -> QueryPart | None:
        return next((part for part in self.parts if part.kind == "text"), None)

    @property
    def single_image(self) -> bool:
        """Whether the query is one positive image and nothing else (a plain image search)."""
        return len(self.parts) == 1 and self.parts[0].kind == "image"


@dataclass(frozen=True)
class SearchOptions:
    """How to search. ``threshold`` keeps results with score >= threshold for cosine and dot,
    distance <= threshold for euclidean. ``where`` keeps images whose metadata meets every
    condition (``"taken>=2024-01-01"``, ``"camera~=pixel"``, or the mapping ``{KEY: VALUE}``),
    ``near`` those within a radius (``"LAT,LON,KM"`` or three numbers) and ``within`` those
    inside a box (``"S,W,N,E"`` or four numbers): see :mod:`lookalike.core.filters`. Filters
    never cut the count: candidates are widened until ``k`` pass or every image was seen.
    ``sort`` (``"taken"``, ``"-taken"``, any metadata key) orders those ``k`` results by
    that value, images without it last; the default ``"score"`` keeps them best first.
    ``query_expansion=n`` ranks by the query averaged with its n nearest images
    (alpha-QE, cosine only). ``rerank=n`` verifies the n best candidates by local features
    (cosine only). ``multi_crop`` also searches with the query's centre and corner crops.
    ``copy_views`` (on by default) puts candidates showing a single image query's pixels
    first, and searches a rotated copy turned upright and a framed one without its border,
    so edited copies are found (:func:`lookalike.core.multicrop.copy_views`); ``False``
    searches with the image as it is only. ``copies`` returns only
    verified copies of a single image query (SIFT local features, RANSAC), each with its
    calibrated ``copy_probability`` and estimated ``transform``, most probable first (cosine
    only)."""

    k: int = 10
    metric: Metric = Metric.COSINE
    threshold: float | None = None
    where: Where | None = None
    query_expansion: int = 0
    rerank: int = 0
    multi_crop: bool = False
    copy_views: bool = True
    copies: bool = False
    near: Near | str | Sequence[float] | None = None
    within: Within | str | Sequence[float] | None = None
    sort: str | SortKey | None = None
    # ``where``, ``near`` and ``within`` parsed and checked together, and ``sort`` parsed.
    filter: Filter = dataclasses.field(init=False, repr=False, compare=False)
    sort_key: SortKey | None = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "metric", Metric.parse(self.metric))
        object.__setattr__(
            self, "filter", make_filter(self.where, near=self.near, within=self.within)
        )
        object.__setattr__(self, "sort_key", parse_sort(self.sort))
        if self.metric is Metric.HAMMING:
            raise RequestError("hamming search needs binary codes; use cosine, euclidean or dot")
        if self.k < 1:
            raise RequestError(f"k must be at least 1, got {self.k}")
        if self.threshold is not None and not math.isfinite(self.threshold):
            raise RequestError(f"threshold must be a finite number, got {self.threshold}")
        if self.query_expansion < 0:
            raise RequestError(f"query_expansion must be 0 or more, got {self.query_expansion}")
        if self.rerank < 0:
            raise RequestError(f"rerank must be 0 or more, got {self.rerank}")
        if self.query_expansion and self.metric is not Metric.COSINE:
            raise RequestError("query expansion applies to cosine search only")
        if self.rerank and self.metric is not Metric.COSINE:
            raise RequestError(
                f"re-ranking needs cosine scores; this search used {self.metric.value}"
            )
        if self.copies and self.metric is not Metric.COSINE:
            raise RequestError(
                f"a copy search needs cosine scores; this search used {self.metric.value}"
            )

    @property
    def verifies(self) -> bool:
        """Whether local features verify candidates (``rerank`` or ``copies``): the query
        image itself is needed."""
        return bool(self.rerank) or self.copies

    @property
    def verify_depth(self) -> int:
        """How many candidates are verified first (more when none verifies strongly)."""
        return max(self.rerank, COPY_CANDIDATES) if self.copies else self.rerank

    @property
    def checks_pixels(self) -> bool:
        """Whether a single image query's best candidates get the pixel check (the default
        search: copy views on, cosine, no local-feature verification, which decides then, and
        no query expansion, which ranks by the query's neighbourhood, not its pixels)."""
        return (
            self.copy_views
            and self.metric is Metric.COSINE
            and not self.verifies
            and not self.query_expansion
        )

    @property
    def depth(self) -> int:
        """How many ranked candidates the steps before the cut need."""
        if self.verifies:
            return max(self.k, self.verify_depth * RERANK_WIDEN)
        if self.checks_pixels:
            return max(self.k, PIXEL_CANDIDATES)
        return self.k


@dataclass(frozen=True)
class QueryViews:
    """The vectors [n, dim] of one query's views, and how much worse each view's scores
    count when the views are merged (``penalties`` [n], 0 for the query's own views; none
    given: all 0). ``later`` embeds more views (copy views) only when asked: it returns
    these views with them added. ``thumbnail`` is the query image's, for the pixel check;
    ``view_thumbnails`` those of views it compares too (the query turned upright);
    ``framed`` whether the check also looks for candidates inside the query (a query with
    bare corners: a frame, a border, a screenshot's bars)."""

    vectors: np.ndarray
    penalties: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(1))
    later: Callable[[], QueryViews] | None = dataclasses.field(
        default=None, compare=False, repr=False
    )
    thumbnail: Thumbnail | None = dataclasses.field(default=None, compare=False, repr=False)
    view_thumbnails: tuple[Thumbnail, ...] = dataclasses.field(
        default=(), compare=False, repr=False
    )
    framed: bool = dataclasses.field(default=True, compare=False, repr=False)

    def __post_init__(self) -> None:
        vectors = np.asarray(self.vectors, dtype=np.float32)
        vectors = vectors.reshape(-1, vectors.shape[-1]) if vectors.ndim else vectors
        penalties = np.asarray(self.penalties, dtype=np.float64).reshape(-1)
        if len(penalties) == 1 and len(vectors) > 1:
            penalties = np.full(len(vectors), penalties[0])
        if len(penalties) != len(vectors):
            raise RequestError(f"{len(penalties)} view penalties for {len(vectors)} views")
        object.__setattr__(self, "vectors", vectors)
        object.__setattr__(self, "penalties", penalties)


class SearchCatalog(Protocol):
    """What search needs of a catalog: records and stored vectors by id."""

    def images(self, ids: Sequence[int]) -> dict[int, ImageRecord]: ...

    def vectors_for(self, ids: Sequence[int], model_id: int) -> np.ndarray: ...

    def vector(self, image_id: int, model_id: int) -> np.ndarray | None: ...

    def vectors(self, model_id: int) -> tuple[np.ndarray, np.ndarray]: ...


class Searcher:
    """Runs queries against one collection's active model."""

    def __init__(
        self,
        *,
        encoder: Encoder,
        catalog: SearchCatalog,
        model_id: int,
        index_for: Callable[[Metric], PreparedIndex],
        local_store: LocalFeatureStore,
    ) -> None:
        self.encoder = encoder
        self.catalog = catalog
        self.model_id = model_id
        self.index_for = index_for
        self.local_store = local_store

    # -- turning a query into vectors (no catalog or index access: safe outside a lock) ------

    def image_views(self, query: ImageSource, options: SearchOptions) -> QueryViews:
        """The query vectors of an image: its own (decoded as indexed images are, so an
        indexed file finds itself at similarity 1), plus its crops' with ``multi_crop``, plus
        its copy views with ``copy_views`` (cosine only; made and embedded later, and only
        when the query's own best score is weak: :meth:`search_views`; most queries have
        none: :func:`lookalike.core.multicrop.copy_views`)."""
        extra = options.copy_views and options.metric is Metric.COSINE
        if options.multi_crop:
            from lookalike.core.multicrop import query_crops

            image = query if isinstance(query, Image.Image) else load_image(query)
            own = query_crops(image)
        elif extra:
            # The decode the encoder makes of a file: the query's own vector is unchanged.
            image = load_image(query, draft_size=self.encoder.preprocess.resolution)
            own = [image]
        else:
            return QueryViews(self.encoder.embed([query]))
        vectors = self.encoder.embed(own)
        if not extra:
            return QueryViews(vectors)
        from lookalike.core.multicrop import CopyClues

        grey = image.convert("L")
        thumbnail = Thumbnail.of(grey)
        clues = CopyClues.of(grey)
        resolution = self.encoder.preprocess.resolution

        def later() -> QueryViews:
            from lookalike.core.multicrop import VIEW_PENALTY, copy_views

            made = copy_views(image, resolution, clues)
            if not made.views:
                return QueryViews(vectors, thumbnail=thumbnail)
            penalties = np.concatenate([np.zeros(len(own)), np.full(len(made.views), VIEW_PENALTY)])
            upright = () if made.upright is None else (Thumbnail.of(made.upright),)
            return QueryViews(
                np.concatenate([vectors, self.encoder.embed(made.views)]),
                penalties,
                thumbnail=thumbnail,
                view_thumbnails=upright,
            )

        # Only a query in a frame can hold a candidate inside it (bare corners).
        return QueryViews(vectors, later=later, thumbnail=thumbnail, framed=clues.padded)

    def text_vector(self, text: str) -> np.ndarray:
        """The query vector of a text (encoders with ``capabilities.text`` only)."""
        if not text.strip():
            raise RequestError("the text query is empty")
        if not self.encoder.capabilities.text:
            raise EncoderError(
                f"the collection's model {self.encoder.identity.model} cannot embed text; text "
                "search needs a CLIP or SigLIP model, e.g. --model hf:openai/clip-vit-base-patch32"
            )
        return self.encoder.encode_text([text])[0:1]

    def stored_vector(self, image_id: int) -> np.ndarray:
        """The stored vector of an indexed image, as a query."""
        vector = self.catalog.vector(image_id, self.model_id) if image_id > 0 else None
        if vector is None:
            raise NotFoundError(f"no image with id {image_id}")
        return np.asarray(vector, dtype=np.float32).reshape(1, -1)

    # -- searching ---------------------------------------------------------------------------

    def search_image(self, query: ImageSource, options: SearchOptions) -> SearchResponse:
        """The images most like ``query`` (any image, indexed or not)."""
        if hasattr(query, "read"):
            query = query.read()  # a file object reads once; the encoder and re-ranking decode
        image = None
        if options.verifies:
            image = query if isinstance(query, Image.Image) else load_image(query)
        return self.search_views(self.image_views(query, options), options, query_image=image)

    def search_text(self, text: str, options: SearchOptions) -> SearchResponse:
        """The images that best match a text (cosine)."""
        if options.metric is not Metric.COSINE:
            raise RequestError("text search ranks by cosine")
        if options.verifies:
            raise RequestError("re-ranking compares images; a text query has none")
        return self.search_views(self.text_vector(text), options)

    def check_query(self, query: Query, options: SearchOptions) -> None:
        """Refuse option combinations a combined query cannot honour."""
        if query.single_image:
            return
        if options.copies:
            raise RequestError(
                f"a copy search takes a single image; this query has {len(query.parts)} parts"
            )
        if options.multi_crop:
            raise RequestError(
                "multi-crop applies to a single-image query only; this query has "
                f"{len(query.parts)} parts"
            )
        if query.text is not None and options.metric is not Metric.COSINE:
            raise RequestError("a query with text ranks by cosine")
        if options.rerank and not query.positives:
            raise RequestError("re-ranking compares images; a text query has none")

    def query_views(self, query: Query, options: SearchOptions) -> np.ndarray | QueryViews:
        """The query vector(s) of a combined query: a single image's views (with its crops
        under ``multi_crop``), else the weighted sum of the parts' L2-normalised vectors,
        negatives subtracted, renormalised. No catalog or index access: safe outside a lock."""
        self.check_query(query, options)
        if query.single_image:
            return self.image_views(query.parts[0].source, options)
        text = query.text
        text_vector = self.text_vector(str(text.source)) if text is not None else None
        images = [part for part in query.parts if part.kind != "text"]
        rows = []
        if images:
            embedded = self.encoder.embed([part.source for part in images])
            for part, vector in zip(images, embedded, strict=True):
                sign = -1.0 if part.kind == "negative" else 1.0
                rows.append(sign * part.weight * _unit(vector))
        if text is not None and text_vector is not None:
            rows.append(text.weight * _unit(text_vector[0]))
        combined = np.sum(rows, axis=0)
        norm = float(np.linalg.norm(combined))
        if not math.isfinite(norm) or norm < 1e-6:
            raise RequestError("the query's parts cancel out: nothing is left to search for")
        return np.asarray(combined / norm, dtype=np.float32)[None, :]

    def rerank_image(self, query: Query, options: SearchOptions) -> Image.Image | None:
        """The image re-ranking compares against: the first positive (only with ``rerank``)."""
        if not options.verifies or not query.positives:
            return None
        source = query.positives[0].source
        return source if isinstance(source, Image.Image) else load_image(source)

    def search_query(self, query: Query, options: SearchOptions) -> SearchResponse:
        """The images most like a combined query (see :class:`Query`)."""
        query = _read_files(query)
        if query.text is not None and not query.positives and not query.negatives:
            return self.search_text(str(query.text.source), options)
        views = self.query_views(query, options)
        return self.search_views(views, options, query_image=self.rerank_image(query, options))

    def search_id(self, image_id: int, options: SearchOptions) -> SearchResponse:
        """The images most like an indexed one, from its stored vector (no decoding)."""
        if options.verifies:
            raise RequestError("re-ranking by id needs the image itself; search with the file")
        return self.search_views(self.stored_vector(image_id), options)

    def search_views(
        self,
        views: np.ndarray | QueryViews,
        options: SearchOptions,
        *,
        query_image: Image.Image | None = None,
        lock: AbstractContextManager[Any] | None = None,
    ) -> SearchResponse:
        """Search with one or more query vectors of the same query (``views``: [n, dim], or
        :class:`QueryViews` with a penalty per view); each image keeps its best score over
        the views, less that view's penalty. With a ``thumbnail``, candidates showing the
        query's pixels go first (:class:`PixelCheck`). Views' ``later`` ones (copy views) are
        embedded and searched too when no candidate does and the best score is under
        ``COPY_VIEWS_BELOW``: an edited copy found by its pixels, an unedited copy or a close
        match needs none. ``query_image`` is needed to re-rank. ``lock`` (a server's) is held
        around every index and catalog access, not while embedding."""
        if options.verifies and query_image is None:
            raise RequestError("re-ranking needs the query image")
        from lookalike.core.multicrop import COPY_VIEWS_BELOW

        guard: AbstractContextManager[Any] = lock if lock is not None else nullcontext()
        pixels = None
        if isinstance(views, QueryViews) and views.thumbnail is not None and options.checks_pixels:
            pixels = PixelCheck(views.thumbnail, self.local_store, framed=views.framed)
        with _collecting_missing() as missing:
            with guard:
                per_view = self._per_view(views, options)
                ranked = _merge_views(per_view, options.metric)
                copied = pixels is not None and pixels.finds_copy(ranked)
            weak = not copied and (not ranked or ranked[0].score < COPY_VIEWS_BELOW)
            searched = views
            if isinstance(views, QueryViews) and views.later is not None and weak:
                more = views.later()  # the slow part: outside the lock
                seen = len(views.vectors)
                if len(more.vectors) > seen:
                    searched = more
                    added = QueryViews(more.vectors[seen:], more.penalties[seen:])
                    with guard:
                        per_view += self._per_view(added, options)
                        ranked = _merge_views(per_view, options.metric)
                if pixels is not None:
                    with guard:
                        for seen_view in more.view_thumbnails:
                            pixels.add_view(seen_view)
                        pixels.finds_copy(ranked)
            still_weak = bool(ranked) and ranked[0].score < COPY_VIEWS_BELOW
            if pixels is not None and still_weak and not pixels.copies(ranked):
                with guard:
                    ranked = self._with_layout_neighbours(pixels, searched, ranked, options)
        if pixels is not None:
            ranked = pixels.copies_first(ranked)
        ranked = ranked[: options.depth]
        if options.verifies and query_image is not None:
            own = views.vectors if isinstance(views, QueryViews) else views
            with guard:
                ranked = self._verified(query_image, ranked, options, own_vector(own))
        response = cut(ranked, options.metric, options.k, options.threshold)
        if missing.partial:
            shards = tuple(sorted(missing.shards))
            response = dataclasses.replace(response, partial=True, missing_shards=shards)
        if options.sort_key is not None:
            response = dataclasses.replace(
                response, results=sort_items(response.results, options.sort_key)
            )
        return response

    def _with_layout_neighbours(
        self,
        pixels: PixelCheck,
        views: np.ndarray | QueryViews,
        ranked: list[SearchResult],
        options: SearchOptions,
    ) -> list[SearchResult]:
        """``ranked`` with the ``PIXEL_LAYOUTS`` images whose layout is nearest the query's
        (at ``PIXEL_LAYOUT_NEAR`` or more) measured by the pixel check too, counting only
        those showing ``PIXEL_LAYOUT_COPY_AT`` of a query not turned upright; those the views
        did not rank are added when they pass the filters, scored by the views as ranked
        images are."""
        table = self.local_store.layout_table()
        if table is None:
            return ranked
        upright = pixels.turned_upright
        near = PIXEL_LAYOUT_UPRIGHT_NEAR if upright else PIXEL_LAYOUT_NEAR
        nearest = [
            i
            for i, correlation in table.nearest(pixels.thumbnails, PIXEL_LAYOUTS)
            if correlation >= near
        ]
        # A query turned upright is a copy's sign already: its neighbours count as any
        # candidate does (see PIXEL_LAYOUT_COPY_AT).
        alike = pixels.measure(nearest, at_least=-1.0 if upright else PIXEL_LAYOUT_COPY_AT)
        listed = {r.id for r in ranked}
        missed = [i for i in nearest if i in alike and i not in listed]
        added = self._scored_by_views(missed, views, options)
        return best_first(ranked + added, options.metric) if added else ranked

    def _scored_by_views(
        self, ids: list[int], views: np.ndarray | QueryViews, options: SearchOptions
    ) -> list[SearchResult]:
        """These images (those that exist, have a sound vector and pass the filters), each
        scored by its best view less that view's penalty, exactly (an approximate index,
        IVF-PQ, scores the ranked ones approximately: the two kinds sort together)."""
        records = self.catalog.images(ids)
        kept: list[ImageRecord] = []
        vectors: list[np.ndarray] = []
        for image_id in ids:
            record = records.get(image_id)
            if record is None or not options.filter.matches(record):
                continue
            try:
                vector = self.catalog.vector(image_id, self.model_id)
            except CorruptVectorError as error:
                # Offered by its thumbnail alone: a damaged vector leaves it out, not the search.
                _log.warning("%s", error)
                continue
            if vector is not None:
                kept.append(record)
                vectors.append(vector)
        if not kept:
            return []
        penalties = views.penalties if isinstance(views, QueryViews) else np.zeros(1)
        raw = views.vectors if isinstance(views, QueryViews) else views
        index = self.index_for(options.metric)
        found = index.transform(np.stack(vectors))
        scores = score_matrix(index.transform(raw), found, index.metric)
        sign = -1.0 if options.metric.higher_is_better else 1.0
        scores = scores + sign * np.asarray(penalties, dtype=np.float64).reshape(-1, 1)
        best = scores.max(axis=0) if options.metric.higher_is_better else scores.min(axis=0)
        return [
            SearchResult.from_record(record, float(score))
            for record, score in zip(kept, best.tolist(), strict=True)
        ]

    def _per_view(
        self, views: np.ndarray | QueryViews, options: SearchOptions
    ) -> list[list[SearchResult]]:
        """The ``options.depth`` best images of each view, scored worse by its penalty."""
        index = self.index_for(options.metric)
        if len(index) == 0:
            raise EmptyCollectionError("the collection has no indexed images yet")
        penalties = None
        if isinstance(views, QueryViews):
            penalties = views.penalties
            views = views.vectors
        views = np.asarray(views, dtype=np.float32)
        views = views.reshape(-1, views.shape[-1]) if views.ndim else views.reshape(1, -1)
        if views.shape[1] != index.input_dim:
            raise ModelMismatchError(
                f"query vector has dim {views.shape[1]}, the collection's model has "
                f"{index.input_dim}"
            )
        if penalties is None:
            penalties = np.zeros(len(views))
        return self._ranked_views(index, views, penalties, options)

    def _ranked_views(
        self,
        index: PreparedIndex,
        views: np.ndarray,
        penalties: np.ndarray,
        options: SearchOptions,
    ) -> list[list[SearchResult]]:
        """``_ranked`` of each view, its scores worse by its penalty. Without filters or
        expansion, all views go to the index in one search (one pass over an exact index,
        not one per view)."""
        if len(views) > 1 and not options.filter and not options.query_expansion:
            hits = index.index.search(index.transform(views), options.depth)
            _note_missing(hits)
            records = self.catalog.images(sorted({int(i) for i in hits.ids.ravel() if i >= 0}))
            sign = -1.0 if options.metric.higher_is_better else 1.0
            per_view = [
                [
                    SearchResult.from_record(records[i], score + sign * penalty)
                    for i, score in zip(ids, scores, strict=True)
                    if i in records
                ]
                for ids, scores, penalty in zip(
                    hits.ids.tolist(), hits.scores.tolist(), penalties.tolist(), strict=True
                )
            ]
            wanted = min(options.depth, len(index))
            if all(len(results) >= wanted for results in per_view):
                return per_view
            # Hits the catalog no longer has: the one-view path below widens past them.
        per_view = [self._ranked(index, view[None, :], options) for view in views]
        return _penalised(per_view, penalties, options.metric)

    def _ranked(
        self, index: PreparedIndex, query: np.ndarray, options: SearchOptions
    ) -> list[SearchResult]:
        """The ``options.depth`` best images for one query vector that pass the filters."""
        prepared = index.transform(query)
        rescore = None
        if options.query_expansion:
            original = prepared[0]
            prepared = self._expand(index, prepared, options.query_expansion)

            def rescore(ids: list[int]) -> np.ndarray:
                # Scores stay the plain similarity to the query, so thresholds keep their
                # meaning even though the order follows the expanded query.
                raw = self.catalog.vectors_for(ids, self.model_id)
                return np.asarray(index.transform(raw) @ original)

        return self._filtered(index, prepared, options.depth, options.filter, rescore)

    def _expand(self, index: PreparedIndex, prepared: np.ndarray, n: int) -> np.ndarray:
        return expand_query(
            index, prepared, n, lambda ids: self.catalog.vectors_for(ids, self.model_id)
        )

    def _filtered(
        self,
        index: PreparedIndex,
        prepared: np.ndarray,
        depth: int,
        where: Filter,
        rescore: Callable[[list[int]], np.ndarray] | None,
    ) -> list[SearchResult]:
        # Filters apply after ranking: widen the candidate list until enough pass or every
        # image was seen, so a filter never silently cuts the result count.
        fetch = depth if not where else max(10 * depth, 100)
        # An index inside the database (pgvector) filters while it scans: its hits already
        # pass the SQL form of the filter, which may be broader than ``where``, never narrower.
        pushdown = getattr(index.index, "search_filtered", None) if where else None
        if pushdown is not None:
            fetch = depth
        while True:
            if pushdown is not None:
                hits = pushdown(prepared, fetch, where)
            else:
                hits = index.index.search(prepared, fetch)
            _note_missing(hits)
            ids, scores = hits.ids[0], hits.scores[0]
            valid = ids >= 0
            ids, scores = ids[valid], scores[valid]
            if rescore is not None and len(ids):
                scores = rescore(ids.tolist())
            records = self.catalog.images(ids.tolist())
            results = []
            for image_id, score in zip(ids.tolist(), scores.tolist(), strict=True):
                record = records.get(image_id)
                if record is not None and where.matches(record):
                    results.append(SearchResult.from_record(record, score))
                    if len(results) == depth:
                        return results
            if pushdown is not None and (len(ids) < fetch or fetch >= len(index)):
                return results  # every image that passes the SQL form was seen
            if fetch >= len(index):
                if where and len(results) < depth and len(ids) < len(index):
                    # An approximate index (IVF probes a few lists) may leave images out even
                    # when asked for all of them: rank every image exactly instead.
                    return self._exhaustive(index, prepared, depth, where, rescore)
                return results
            fetch = min(len(index), fetch * 8)

    def _exhaustive(
        self,
        index: PreparedIndex,
        prepared: np.ndarray,
        depth: int,
        where: Filter,
        rescore: Callable[[list[int]], np.ndarray] | None,
    ) -> list[SearchResult]:
        """The ``depth`` best images that pass ``where``, scored against every stored
        vector (the fallback when the index cannot enumerate the collection)."""
        ids, raw = self.catalog.vectors(self.model_id)
        scores = score_matrix(prepared, index.transform(raw), index.metric)[0]
        order = np.argsort(-scores if index.metric.higher_is_better else scores, kind="stable")
        kept: list[tuple[ImageRecord, float]] = []
        for start in range(0, len(order), _EXHAUSTIVE_CHUNK):
            chunk = order[start : start + _EXHAUSTIVE_CHUNK]
            records = self.catalog.images(ids[chunk].tolist())
            for position in chunk.tolist():
                record = records.get(int(ids[position]))
                if record is not None and where.matches(record):
                    kept.append((record, float(scores[position])))
            if len(kept) >= depth:
                break
        kept = kept[:depth]
        values = [score for _, score in kept]
        if rescore is not None and kept:
            values = rescore([int(record.id or 0) for record, _ in kept]).tolist()
        return [
            SearchResult.from_record(record, score)
            for (record, _), score in zip(kept, values, strict=True)
        ]

    def _verified(
        self,
        query: Image.Image,
        ranked: list[SearchResult],
        options: SearchOptions,
        query_vector: np.ndarray,
    ) -> list[SearchResult]:
        """``ranked`` with its head verified by local features: the first
        ``options.verify_depth`` candidates, then the next as many, up to ``RERANK_WIDEN``
        times as many, while none verified has ``STRONG_INLIERS`` (a copy whose global
        vector drifted sits deeper; :meth:`LocalFeatureStore.verify_widening`), and then,
        if still none has, the images sharing the most of the query's visual words
        (:meth:`_word_candidates`). Re-scored and re-sorted (verification only raises
        scores, so the rest stays in order after them); with ``copies``, only the likely
        copies, most probable first."""
        if options.copies and self.local_store.kind() is None:
            raise RequestError(
                "a copy search verifies local features, and this collection stores none: "
                "index it with local features first (lookalike index --local-features)"
            )
        local = self.local_store.query_local(self.encoder, query)
        if options.copies and local.tokens is not None:
            raise RequestError(
                "a copy search verifies SIFT local features; this collection stores patch "
                "tokens, which have no geometry to verify"
            )
        scores, checks = self.local_store.verify_widening(
            local, [(r.id, r.score) for r in ranked], options.verify_depth
        )
        if checks is not None and not any(c.inliers >= STRONG_INLIERS for c in checks):
            verified = ranked[: len(scores)]
            extra, more_scores, more_checks = self._verified_word_candidates(
                local, verified, checks, options, query_vector
            )
            if extra:
                moved = {r.id for r in extra}
                rest = [r for r in ranked[len(scores) :] if r.id not in moved]
                ranked = verified + extra + rest
                scores = np.concatenate([scores, more_scores])
                checks = in_context([*checks, *more_checks])
        if options.copies and checks is not None:
            return _likely_copies(ranked, checks)
        head = [
            dataclasses.replace(r, score=float(s)) for r, s in zip(ranked, scores, strict=False)
        ]
        order = np.argsort([-r.score for r in head], kind="stable")
        return [head[i] for i in order] + ranked[len(head) :]

    def _verified_word_candidates(
        self,
        local: QueryLocal,
        verified: list[SearchResult],
        checks: list[CopyCheck],
        options: SearchOptions,
        query_vector: np.ndarray,
    ) -> tuple[list[SearchResult], np.ndarray, list[CopyCheck]]:
        """(results, new scores, checks) of the word candidates (:meth:`_word_candidates`)
        that verify better than every candidate the vector found (``checks``): sharing a few
        words is weaker evidence than ranking near."""
        extra = self._word_candidates(local, verified, options, query_vector)
        if not extra:
            return [], np.zeros(0), []
        scores, found = self.local_store.verify(local, [(r.id, r.score) for r in extra])
        assert found is not None  # SIFT: word candidates need keypoints
        best = max((c.inliers for c in checks), default=0)
        keep = [
            position
            for position, check in enumerate(found)
            if check.inliers > best and check.inliers >= SEARCH_RULE.min_inliers
        ]
        return [extra[i] for i in keep], scores[keep], [found[i] for i in keep]

    def _word_candidates(
        self,
        local: QueryLocal,
        verified: list[SearchResult],
        options: SearchOptions,
        query_vector: np.ndarray,
    ) -> list[SearchResult]:
        """The images sharing the most visual words with the query that were not verified
        yet and pass the filters, each scored by its global similarity to the query in the
        index's space (as the index would have scored it)."""
        ids = self.local_store.word_candidates(local, [r.id for r in verified])
        records = self.catalog.images(ids)
        passing = [i for i in ids if i in records and options.filter.matches(records[i])]
        # Only images with a vector of this model (one still being embedded has features).
        vectors = {
            i: v for i in passing if (v := self.catalog.vector(i, self.model_id)) is not None
        }
        if not vectors:
            return []
        # Cosine in the index's space: its transform (a centre) and unit length, which an
        # index without a centre leaves to its own search.
        index = self.index_for(options.metric)
        query = l2_normalize(index.transform(query_vector.reshape(1, -1)))[0]
        stored = l2_normalize(index.transform(np.stack(list(vectors.values()))))
        return [
            SearchResult.from_record(records[i], float(score))
            for i, score in zip(vectors, (stored @ query).tolist(), strict=True)
        ]


def own_vector(views: np.ndarray) -> np.ndarray:
    """The query's own vector among its views (the first: crops and copy views follow)."""
    vectors = np.asarray(views, dtype=np.float32)
    first: np.ndarray = vectors.reshape(-1, vectors.shape[-1])[0]
    return first


def expand_query(
    index: PreparedIndex,
    prepared: np.ndarray,
    n: int,
    vectors_for: Callable[[list[int]], np.ndarray],
) -> np.ndarray:
    """Alpha query expansion: the (prepared) query plus its ``n`` nearest images, each
    weighted by its similarity clipped at 0, renormalised. Measured +4 points of class-level
    mAP on clothing-small."""
    hits = index.index.search(prepared, n)
    _note_missing(hits)
    ids = [i for i in hits.ids[0].tolist() if i >= 0]
    if not ids:
        return prepared
    neighbours = index.transform(vectors_for(ids))
    weights = np.clip(neighbours @ prepared[0], 0.0, None)
    expanded = prepared[0] + weights @ neighbours
    normalised: np.ndarray = (expanded / max(float(np.linalg.norm(expanded)), 1e-12))[None, :]
    return normalised


@dataclass
class _Missing:
    """Whether an index search of the query being answered came back partial, and which
    shards did not answer."""

    partial: bool = False
    shards: set[int] = dataclasses.field(default_factory=set)


# The steps between the index and the response (expansion, widening, filters, views) pass
# plain result lists; the index searches of one query record what was missing here rather
# than in every step's signature. A context variable keeps concurrent queries apart.
_MISSING: ContextVar[_Missing | None] = ContextVar("lookalike_missing_shards", default=None)


@contextmanager
def _collecting_missing() -> Iterator[_Missing]:
    missing = _Missing()
    token = _MISSING.set(missing)
    try:
        yield missing
    finally:
        _MISSING.reset(token)


def _note_missing(hits: SearchHits) -> None:
    """Record a partial answer of the index (a lost shard) for the query's response."""
    missing = _MISSING.get()
    if hits.partial and missing is not None:
        missing.partial = True
        missing.shards.update(hits.missing)


def _unit(vector: np.ndarray) -> np.ndarray:
    vector = np.asarray(vector, dtype=np.float64).reshape(-1)
    norm = float(np.linalg.norm(vector))
    if not math.isfinite(norm) or norm < 1e-12:
        raise RequestError("a query part has no direction (its vector is zero)")
    unit: np.ndarray = vector / norm
    return unit


def _read_files(query: Query) -> Query:
    """``query`` with file objects read once (the encoder and re-ranking both decode)."""
    parts = tuple(
        dataclasses.replace(part, source=part.source.read())
        if hasattr(part.source, "read")
        else part
        for part in query.parts
    )
    return Query(parts)


def _likely_copies(ranked: list[SearchResult], checks: list[CopyCheck]) -> list[SearchResult]:
    """The checked candidates that are likely copies (``COPY_PROBABILITY`` or more), with
    their probability and transform, most probable first; their scores stay the global
    ones (what the probability was calibrated on)."""
    found = [
        dataclasses.replace(r, copy_probability=c.probability, transform=c.transform)
        for r, c in zip(ranked, checks, strict=False)
        if c.probability >= COPY_PROBABILITY
    ]
    return sorted(found, key=lambda r: (-(r.copy_probability or 0.0), -r.score))


def _penalised(
    per_view: list[list[SearchResult]], penalties: np.ndarray, metric: Metric
) -> list[list[SearchResult]]:
    """Each view's results scored ``penalty`` worse (lower, or a larger distance)."""
    sign = -1.0 if metric.higher_is_better else 1.0
    return [
        results
        if not penalty
        else [dataclasses.replace(r, score=r.score + sign * penalty) for r in results]
        for results, penalty in zip(per_view, penalties.tolist(), strict=True)
    ]


def _merge_views(per_view: list[list[SearchResult]], metric: Metric) -> list[SearchResult]:
    if len(per_view) == 1:
        return per_view[0]
    best: dict[int, SearchResult] = {}
    for result in (r for results in per_view for r in results):
        kept = best.get(result.id)
        if kept is None or (result.score > kept.score) == metric.higher_is_better:
            best[result.id] = result
    return best_first(list(best.values()), metric)


class SearchArgs(TypedDict, total=False):
    """The options of :class:`SearchOptions` as keyword arguments, the way the library and
    the servers take them (``metric`` may be a name)."""

    k: int
    metric: str | Metric
    threshold: float | None
    where: Where | None
    query_expansion: int
    rerank: int
    multi_crop: bool
    copy_views: bool
    copies: bool
    near: Near | str | Sequence[float] | None
    within: Within | str | Sequence[float] | None
    sort: str | SortKey | None


def search_options(**args: Unpack[SearchArgs]) -> SearchOptions:
    """``SearchOptions`` from keyword arguments (a metric may be given by name: the
    options parse it); what is not given keeps the options' default."""
    # A metric name is accepted here: SearchOptions.__post_init__ parses it.
    return SearchOptions(**args)  # type: ignore[arg-type]


class PixelCheck:
    """One query's pixel check: how much of the query's pixels each of the best candidates'
    stored thumbnails shows (:meth:`lookalike.local.pixels.PixelQuery.likenesses`), measured
    once a candidate; the copies (:meth:`copies`: alike enough, and standing out from the
    rest) go first. A view of the query (turned upright) can be compared too
    (:meth:`add_view`); ``framed`` looks for candidates inside the query as well. Candidates
    without a thumbnail (indexed before lookalike kept them, until the next index run) are
    left where they are."""

    def __init__(self, query: Thumbnail, store: LocalFeatureStore, *, framed: bool = True) -> None:
        self.queries = [PixelQuery(query, framed=framed)]
        self.store = store
        # The best of the query's and its views' likeness, and of its views' alone.
        self.likeness: dict[int, float] = {}
        self.upright: dict[int, float] = {}
        self.without_thumbnail: set[int] = set()

    def add_view(self, view: Thumbnail) -> None:
        """Compare the candidates with a view of the query too (the query turned upright):
        those measured already are measured again with it, each keeping its best."""
        added = PixelQuery(view, framed=False, scales=UPRIGHT_SCALES)
        self.queries.append(added)
        measured = [i for i in self.likeness if i not in self.without_thumbnail]
        if measured:
            thumbnails = self.store.thumbnails(measured)
            found = added.likenesses([thumbnails[i] for i in measured])
            for image_id, likeness in zip(measured, found.tolist(), strict=True):
                self.likeness[image_id] = max(self.likeness[image_id], likeness)
                self.upright[image_id] = max(self.upright.get(image_id, -1.0), likeness)

    def finds_copy(self, ranked: Sequence[SearchResult]) -> bool:
        """Measure the head of ``ranked``, those within ``PIXEL_WITHIN`` of the best score
        (reads thumbnails: under a server's lock); whether a copy is among it."""
        if not ranked:
            return False
        floor = ranked[0].score - PIXEL_WITHIN
        self.measure([r.id for r in ranked[:PIXEL_CANDIDATES] if r.score >= floor])
        return bool(self.copies(ranked))

    def measure(self, ids: Sequence[int], *, at_least: float = -1.0) -> set[int]:
        """Measure how much of the query's pixels each of these candidates shows (those not
        measured yet; reads thumbnails: under a server's lock), keeping only those showing
        ``at_least`` of them (the rest stay unmeasured, as if never looked at; a candidate
        without a thumbnail counts -1); the ids of ``ids`` measured now."""
        new = [i for i in dict.fromkeys(ids) if i not in self.likeness]
        if new:
            thumbnails = self.store.thumbnails(new)
            if at_least <= -1.0:
                self.without_thumbnail.update(i for i in new if i not in thumbnails)
                self.likeness.update((i, -1.0) for i in new if i not in thumbnails)
            measured = [i for i in new if i in thumbnails]
            if measured:
                chosen = [thumbnails[i] for i in measured]
                found = np.array([query.likenesses(chosen) for query in self.queries])
                best = found.max(axis=0)
                upright = found[1:].max(axis=0) if len(found) > 1 else None
                for row, image_id in enumerate(measured):
                    if best[row] >= at_least:
                        self.likeness[image_id] = float(best[row])
                        if upright is not None:
                            self.upright[image_id] = float(upright[row])
        return {i for i in ids if i in self.likeness}

    @property
    def turned_upright(self) -> bool:
        """Whether the query's upright view is compared too (:meth:`add_view`)."""
        return len(self.queries) > 1

    @property
    def thumbnails(self) -> list[Thumbnail]:
        """The query's thumbnail and those of its views compared (upright)."""
        return [query.query for query in self.queries]

    def copies(self, ranked: Sequence[SearchResult]) -> set[int]:
        """Ids of the measured candidates' copies: the most alike at ``PIXEL_COPY_AT`` or
        more with those as alike as it (within ``PIXEL_SAME``: copies of one photo), when the
        next is ``PIXEL_MARGIN`` less alike; none otherwise. A candidate measured while it
        was among the best counts wherever the views have moved it since."""
        head = [r.id for r in ranked if r.id in self.likeness]
        order = sorted(head, key=lambda i: -self.likeness[i])
        if not order or self.likeness[order[0]] < PIXEL_COPY_AT:
            return set()
        best = self.likeness[order[0]]
        same = [i for i in order if self.likeness[i] >= best - PIXEL_SAME]
        rest = [self.likeness[i] for i in order[len(same) :]]
        if rest and self.likeness[same[-1]] - rest[0] < PIXEL_MARGIN:
            return set()
        return set(same)

    def leaning(self, ranked: Sequence[SearchResult]) -> int | None:
        """The id of the measured candidate with the best score plus ``PIXEL_LEAN`` times
        its likeness, when one shows at least ``PIXEL_LEAN_FROM`` of the query's pixels;
        None otherwise (the pixels have no say)."""
        measured = [r for r in ranked if self.likeness.get(r.id, -1.0) > -1.0]
        if not measured or max(self.likeness[r.id] for r in measured) < PIXEL_LEAN_FROM:
            return None
        return max(measured, key=lambda r: r.score + PIXEL_LEAN * self.likeness[r.id]).id

    def upright_copy(self, ranked: Sequence[SearchResult]) -> int | None:
        """The id of the candidate most alike the query's upright view, when it shows at
        least ``PIXEL_UPRIGHT_AT`` of it and the next ``PIXEL_UPRIGHT_MARGIN`` less; None
        otherwise (and for a query never turned upright)."""
        alike = sorted((self.upright[r.id] for r in ranked if r.id in self.upright), reverse=True)
        if not alike or alike[0] < PIXEL_UPRIGHT_AT:
            return None
        if len(alike) > 1 and alike[0] - alike[1] < PIXEL_UPRIGHT_MARGIN:
            return None
        return next(r.id for r in ranked if self.upright.get(r.id) == alike[0])

    def copies_first(self, ranked: list[SearchResult]) -> list[SearchResult]:
        """``ranked`` with its measured copies first, most alike first, each scored its
        likeness when that is above its cosine, and at least as high as the best of the rest
        (so scores still fall down the list, a copy whose vector drifted passes a threshold
        the other candidates pass, and a copy scores alike whatever its neighbours). With
        no copy standing out, the upright view's copy (:meth:`upright_copy`), else the
        candidate the pixels lean to (:meth:`leaning`), goes first, scored as the first was."""
        found = self.copies(ranked)
        copies = [r for r in ranked if r.id in found]
        if not copies:
            chosen = self.upright_copy(ranked)
            return self._first(ranked, self.leaning(ranked) if chosen is None else chosen)
        copies.sort(key=lambda r: -self.likeness[r.id])
        moved = {r.id for r in copies}
        rest = [r for r in ranked if r.id not in moved]
        floor = rest[0].score if rest else copies[0].score
        lifted: list[SearchResult] = []
        ceiling = math.inf
        for result in copies:
            score = min(max(result.score, self.likeness[result.id], floor), ceiling)
            lifted.append(dataclasses.replace(result, score=score))
            ceiling = score
        return lifted + rest

    @staticmethod
    def _first(ranked: list[SearchResult], chosen: int | None) -> list[SearchResult]:
        """``ranked`` with the candidate ``chosen`` (if any) first, at the first's score."""
        if chosen is None or chosen == ranked[0].id:
            return ranked
        moved = next(r for r in ranked if r.id == chosen)
        lifted = dataclasses.replace(moved, score=max(moved.score, ranked[0].score))
        return [lifted] + [r for r in ranked if r.id != chosen]
