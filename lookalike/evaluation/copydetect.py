"""Copy detection: find the source of an edited copy among many distractors.

A seeded sample of the database images is attacked (cropped, rotated, recompressed, overlaid
with text, ...); each attacked copy is a query whose only relevant item is its source, and the
rest of the database are distractors. Per attack it reports recall@1 (the source ranked first),
recall@k, and the micro-averaged AP of DISC21 / ISC 2021: the top-k predictions of every query
are pooled and ranked by score, and the AP of that single ranking is taken with the number of
queries as the number of positives, so scores must also be comparable *across* queries.

Attacked images live in memory only (``save_dir`` writes them when asked). Queries are answered
either by the collection's own search path (``search``: a :class:`CollectionSearch`, so the
figures are what the library, CLI and servers return, defaults and re-ranking included), or by
an exact search over features from an :class:`~lookalike.encoders.Encoder` or any
``embed(list_of_PIL_images)`` callable; a ``rerank`` callable can rescore each query's top-k
candidates (local-feature verification). Each query's search time is measured.
"""

from __future__ import annotations

import io
import itertools
import time
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, Unpack

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageFont, ImageOps

from lookalike.errors import LookalikeError
from lookalike.evaluation.metrics import (
    micro_average_precision,
    micro_precision_recall,
    recall_at_precision,
    score_matrix,
)
from lookalike.images import ImageSource, load_image

if TYPE_CHECKING:
    from lookalike.core.collection import Collection
    from lookalike.core.search import SearchArgs
    from lookalike.encoders import Encoder

AttackFn = Callable[[Image.Image, np.random.Generator], Image.Image]
EmbedFn = Callable[[list[Image.Image]], np.ndarray]
ProgressFn = Callable[[str, int, int], None]
# Searches the database for one query image: (database positions, scores), best first, at
# most k of them; a position of -1 is a hit outside the database (a distractor).
SearchFn = Callable[[Image.Image, int], tuple[np.ndarray, np.ndarray]]


class Reranker(Protocol):
    """Rescores one query's candidates, e.g. by local-feature matching.

    ``candidate_ids`` are positions in the database sequence, best first; ``scores`` are their
    global similarities (higher is better). Returns one new score per candidate, higher is
    better; candidates are re-sorted by it and it is what micro-AP pools, so it should be
    comparable across queries.
    """

    def __call__(
        self, query: Image.Image, candidate_ids: np.ndarray, scores: np.ndarray
    ) -> np.ndarray: ...


# -- attacks ----------------------------------------------------------------------------------
# Each takes an RGB image and a generator and returns a new RGB image; all randomness comes
# from the generator, so a (seed, attack, source) triple always gives the same copy.


def _crop(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Keep a random 50-70% of the area, with a slightly different aspect ratio."""
    width, height = image.size
    area = rng.uniform(0.5, 0.7)
    aspect = float(np.exp(rng.uniform(-0.2, 0.2)))
    keep_w = min(1.0, np.sqrt(area * aspect))
    keep_h = min(1.0, area / keep_w)
    crop_w, crop_h = max(1, round(width * keep_w)), max(1, round(height * keep_h))
    left = int(rng.integers(0, width - crop_w + 1))
    top = int(rng.integers(0, height - crop_h + 1))
    return image.crop((left, top, left + crop_w, top + crop_h))


def _rotation(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Rotate 5-15 degrees either way; the canvas grows so no content is lost (black corners)."""
    angle = rng.uniform(5.0, 15.0) * rng.choice([-1.0, 1.0])
    return image.rotate(angle, Image.Resampling.BICUBIC, expand=True, fillcolor=(0, 0, 0))


def _flip(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Mirror left to right."""
    return ImageOps.mirror(image)


def _scale(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Downscale to 30-60% of each side."""
    factor = rng.uniform(0.3, 0.6)
    width, height = image.size
    size = (max(8, round(width * factor)), max(8, round(height * factor)))
    return image.resize(size, Image.Resampling.BILINEAR)


def _jpeg(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Re-encode as JPEG at quality 10-30."""
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=int(rng.integers(10, 31)))
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return decoded.convert("RGB")


def _blur(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Gaussian blur of radius 2-4 pixels."""
    return image.filter(ImageFilter.GaussianBlur(rng.uniform(2.0, 4.0)))


def _away_from_one(rng: np.random.Generator, low: float, high: float) -> float:
    """A factor 1 +- [low, high]: never so close to 1 that the edit is invisible."""
    sign: float = rng.choice([-1.0, 1.0])
    return 1.0 + rng.uniform(low, high) * sign


def _color(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Brightness and contrast +-15-40%, saturation +-20-60%, hue rotated 3-12% of the circle."""
    image = ImageEnhance.Brightness(image).enhance(_away_from_one(rng, 0.15, 0.4))
    image = ImageEnhance.Contrast(image).enhance(_away_from_one(rng, 0.15, 0.4))
    image = ImageEnhance.Color(image).enhance(_away_from_one(rng, 0.2, 0.6))
    hsv = np.array(image.convert("HSV"))
    shift = round(256 * rng.uniform(0.03, 0.12) * rng.choice([-1.0, 1.0]))
    hsv[..., 0] = (hsv[..., 0].astype(np.int16) + shift) % 256  # hue wraps around
    return Image.fromarray(hsv, "HSV").convert("RGB")


def _grayscale(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Drop the colour (kept as a 3-channel image)."""
    return ImageOps.grayscale(image).convert("RGB")


def _border(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Pad each side with a random solid colour 10-25% as thick as that side is long."""
    width, height = image.size
    fraction = rng.uniform(0.10, 0.25)
    pad_x, pad_y = max(1, round(width * fraction)), max(1, round(height * fraction))
    colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
    return ImageOps.expand(image, border=(pad_x, pad_y, pad_x, pad_y), fill=colour)


_WORDS = (
    "sale", "original", "copy", "meme", "look", "free", "today", "best", "news", "viral",
    "share", "like", "photo", "wow", "limited", "offer", "exclusive", "new", "hot", "deal",
)  # fmt: skip


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the small bitmap font
        return ImageFont.load_default()


def _wrap(draw: ImageDraw.ImageDraw, words: list[str], font: Any, width: float) -> str:
    """Words on as few lines as fit ``width`` (a single over-long word keeps its own line)."""
    lines: list[str] = []
    for word in words:
        if lines and draw.textlength(f"{lines[-1]} {word}", font=font) <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return "\n".join(lines)


def _text(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Overlay 2-3 random words in a large outlined font (12-20% of the shorter side), wrapped
    onto several lines rather than shrunk when they are wider than the image."""
    out = image.copy()
    width, height = out.size
    words = [str(w) for w in rng.choice(_WORDS, size=int(rng.integers(2, 4)), replace=False)]
    size = max(8, round(min(width, height) * rng.uniform(0.12, 0.2)))
    draw = ImageDraw.Draw(out)
    while True:
        font = _font(size)
        stroke = max(1, size // 16)
        text = _wrap(draw, words, font, 0.95 * width)
        box = draw.multiline_textbbox((0, 0), text, font=font, stroke_width=stroke)
        if (box[2] - box[0] <= 0.95 * width and box[3] - box[1] <= 0.95 * height) or size <= 8:
            break
        size = max(8, int(size * 0.85))
    # The bounds are whole numbers (a float high would be truncated by integers() anyway).
    x = int(rng.integers(0, int(max(0, width - (box[2] - box[0])) + 1))) - box[0]
    y = int(rng.integers(0, int(max(0, height - (box[3] - box[1])) + 1))) - box[1]
    fill = tuple(int(c) for c in rng.integers(0, 256, size=3))
    outline = (0, 0, 0) if sum(fill) > 384 else (255, 255, 255)
    draw.multiline_text(
        (x, y), text, font=font, fill=fill, stroke_width=stroke, stroke_fill=outline, align="center"
    )
    return out


ATTACKS: dict[str, AttackFn] = {
    "crop": _crop,
    "rotation": _rotation,
    "flip": _flip,
    "scale": _scale,
    "jpeg": _jpeg,
    "blur": _blur,
    "color": _color,
    "grayscale": _grayscale,
    "border": _border,
    "text": _text,
}


# -- harder attacks: what copies shared online look like ---------------------------------------


def _overlay(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Text and logo overlays: a caption of 3-5 lines in a small font, 1-3 solid boxes (logos,
    stickers) 8-20% of each side, and a translucent watermark word (opacity 25-45%). Pixels
    outside what is drawn are left exactly as they were."""
    out = image.copy()
    width, height = out.size
    short = min(width, height)
    draw = ImageDraw.Draw(out)
    for _ in range(int(rng.integers(1, 4))):
        box_w = max(4, round(width * rng.uniform(0.08, 0.2)))
        box_h = max(4, round(height * rng.uniform(0.08, 0.2)))
        left = int(rng.integers(0, width - box_w + 1))
        top = int(rng.integers(0, height - box_h + 1))
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        draw.rectangle((left, top, left + box_w - 1, top + box_h - 1), fill=colour)
        mark = str(rng.choice(_WORDS))[0].upper()
        ink = (0, 0, 0) if sum(colour) > 384 else (255, 255, 255)
        draw.text((left + box_w // 4, top + box_h // 8), mark, font=_font(box_h * 3 // 4), fill=ink)
    lines = [
        " ".join(str(w) for w in rng.choice(_WORDS, size=int(rng.integers(2, 5))))
        for _ in range(int(rng.integers(3, 6)))
    ]
    font = _font(max(8, round(short * rng.uniform(0.05, 0.08))))
    text = "\n".join(lines)
    box = draw.multiline_textbbox((0, 0), text, font=font, stroke_width=1)
    x = int(rng.integers(0, int(max(0, width - (box[2] - box[0])) + 1))) - box[0]
    y = int(rng.integers(0, int(max(0, height - (box[3] - box[1])) + 1))) - box[1]
    fill = tuple(int(c) for c in rng.integers(0, 256, size=3))
    outline = (0, 0, 0) if sum(fill) > 384 else (255, 255, 255)
    draw.multiline_text((x, y), text, font=font, fill=fill, stroke_width=1, stroke_fill=outline)
    # The watermark: one word, large and faint, blended only where its glyphs are.
    word = str(rng.choice(_WORDS)).upper()
    layer = Image.new("L", out.size, 0)
    mark_draw = ImageDraw.Draw(layer)
    mark_font = _font(max(8, round(short * rng.uniform(0.15, 0.25))))
    mark_box = mark_draw.textbbox((0, 0), word, font=mark_font)
    mark_x = (width - (mark_box[2] - mark_box[0])) // 2 - mark_box[0]
    mark_y = (height - (mark_box[3] - mark_box[1])) // 2 - mark_box[1]
    opacity = rng.uniform(0.25, 0.45)
    mark_draw.text((mark_x, mark_y), word, font=mark_font, fill=round(255 * opacity))
    white = Image.new("RGB", out.size, (255, 255, 255))
    return Image.composite(white, out, layer)


def filled_rotation(image: Image.Image, angle: float) -> Image.Image:
    """Rotate by ``angle`` degrees on a grown canvas whose corners are filled with a blurred,
    stretched copy of the photo (as apps fill them) instead of black."""
    rotated = image.rotate(angle, Image.Resampling.BICUBIC, expand=True)
    mask = Image.new("L", image.size, 255).rotate(angle, Image.Resampling.BICUBIC, expand=True)
    radius = max(2.0, max(rotated.size) / 40)
    background = image.resize(rotated.size, Image.Resampling.BILINEAR)
    background = background.filter(ImageFilter.GaussianBlur(radius))
    return Image.composite(rotated, background, mask)


def _large_rotation(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Rotate 10-45 degrees either way on a grown canvas, corners filled (see above)."""
    angle = rng.uniform(10.0, 45.0) * rng.choice([-1.0, 1.0])
    return filled_rotation(image, angle)


def _crop_fraction(
    image: Image.Image, rng: np.random.Generator, low: float, high: float
) -> Image.Image:
    """Keep a random ``low``-``high`` of the area, each side at least half its length."""
    width, height = image.size
    area = rng.uniform(low, high)
    keep_w = rng.uniform(max(0.5, area), 1.0)
    keep_h = max(0.5, min(1.0, area / keep_w))
    crop_w, crop_h = max(1, round(width * keep_w)), max(1, round(height * keep_h))
    left = int(rng.integers(0, width - crop_w + 1))
    top = int(rng.integers(0, height - crop_h + 1))
    return image.crop((left, top, left + crop_w, top + crop_h))


def _rotation_crop_color(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Rotate 5-30 degrees either way (corners filled), keep 55-85% of that canvas, and change
    the colours as ``color`` does."""
    angle = rng.uniform(5.0, 30.0) * rng.choice([-1.0, 1.0])
    rotated = filled_rotation(image, angle)
    return _color(_crop_fraction(rotated, rng, 0.55, 0.85), rng)


def screenshot_layout(
    size: tuple[int, int], rng: np.random.Generator
) -> tuple[tuple[int, int], tuple[int, int, int, int]]:
    """(canvas size, photo box (left, top, right, bottom)) of a screenshot of a photo of
    ``size``: the photo shown at 60-95% of its size, centred across a canvas 5-30% wider,
    between a top bar (status and title) and a bottom bar (buttons)."""
    width, height = size
    shown = rng.uniform(0.6, 0.95)
    photo_w, photo_h = max(8, round(width * shown)), max(8, round(height * shown))
    canvas_w = round(photo_w * rng.uniform(1.05, 1.3))
    top_bar = max(6, round(canvas_w * rng.uniform(0.08, 0.14)))
    bottom_bar = max(6, round(canvas_w * rng.uniform(0.1, 0.18)))
    margin = max(2, round(canvas_w * rng.uniform(0.01, 0.04)))
    left = (canvas_w - photo_w) // 2
    top = top_bar + margin
    canvas_h = top + photo_h + margin + bottom_bar
    return (canvas_w, canvas_h), (left, top, left + photo_w, top + photo_h)


def _screenshot(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """The photo pasted, scaled, into a larger canvas with UI bars: a status and title bar on
    top with an app name, a bottom bar of button icons (see :func:`screenshot_layout`)."""
    (canvas_w, canvas_h), box = screenshot_layout(image.size, rng)
    dark = bool(rng.integers(0, 2))
    background = (18, 18, 18) if dark else (245, 245, 245)
    bar = (40, 40, 40) if dark else (225, 225, 225)
    ink = (230, 230, 230) if dark else (30, 30, 30)
    canvas = Image.new("RGB", (canvas_w, canvas_h), background)
    draw = ImageDraw.Draw(canvas)
    # The bars end 2 pixels short of the photo (the layout leaves a margin of 2 or more).
    top_bar = box[1] - 2
    draw.rectangle((0, 0, canvas_w - 1, top_bar - 1), fill=bar)
    font = _font(max(8, top_bar // 3))
    draw.text((canvas_w // 30, top_bar // 10), "9:41", font=font, fill=ink)
    title = " ".join(str(w) for w in rng.choice(_WORDS, size=2, replace=False)).title()
    draw.text((canvas_w // 30, top_bar // 2), title, font=font, fill=ink)
    bottom = box[3] + 2
    draw.rectangle((0, bottom, canvas_w - 1, canvas_h - 1), fill=bar)
    icons = int(rng.integers(3, 6))
    icon = max(3, (canvas_h - bottom) // 3)
    for i in range(icons):
        centre = round((i + 0.5) * canvas_w / icons)
        middle = (bottom + canvas_h) // 2
        draw.rectangle(
            (centre - icon // 2, middle - icon // 2, centre + icon // 2, middle + icon // 2),
            outline=ink,
            width=max(1, icon // 8),
        )
    photo = image.resize((box[2] - box[0], box[3] - box[1]), Image.Resampling.BILINEAR)
    canvas.paste(photo, box[:2])
    return canvas


def _flip_crop(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Mirror left to right, then keep a random 50-80% of the area."""
    return _crop_fraction(ImageOps.mirror(image), rng, 0.5, 0.8)


def _small_scale(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Downscale to 10-25% of each side (a thumbnail), at least 16 pixels a side."""
    factor = rng.uniform(0.1, 0.25)
    width, height = image.size
    size = (max(16, round(width * factor)), max(16, round(height * factor)))
    return image.resize(size, Image.Resampling.BILINEAR)


# Not in the default list: the classic attacks' figures and floors stay comparable with
# earlier runs; ``--attacks all`` (or ``hard``, or their names) adds these. Heavy JPEG is
# ``jpeg`` (quality 10-30) already.
HARD_ATTACKS: dict[str, AttackFn] = {
    "overlay": _overlay,
    "rotation-large": _large_rotation,
    "rotation-crop-color": _rotation_crop_color,
    "screenshot": _screenshot,
    "flip-crop": _flip_crop,
    "scale-small": _small_scale,
}
ALL_ATTACKS: dict[str, AttackFn] = {**ATTACKS, **HARD_ATTACKS}
# Names that stand for several attacks in an attack list.
ATTACK_GROUPS: dict[str, tuple[str, ...]] = {
    "all": tuple(ALL_ATTACKS),
    "classic": tuple(ATTACKS),
    "hard": tuple(HARD_ATTACKS),
}


def parse_attacks(names: str | Iterable[str] | None) -> list[str]:
    """Attack names from a comma-separated string or a list (None: the classic ``ATTACKS``),
    validated; ``all``, ``classic`` and ``hard`` stand for their groups."""
    if names is None:
        return list(ATTACKS)
    items = names.split(",") if isinstance(names, str) else list(names)
    chosen = [n.strip() for n in items if n.strip()]
    expanded = [a for n in chosen for a in ATTACK_GROUPS.get(n, (n,))]
    unknown = [n for n in expanded if n not in ALL_ATTACKS]
    if unknown or not chosen:
        raise LookalikeError(
            f"unknown attack(s) {', '.join(unknown) or '(none given)'}; "
            f"available: {', '.join(ALL_ATTACKS)} (or {', '.join(ATTACK_GROUPS)})"
        )
    return list(dict.fromkeys(expanded))


def attack_rng(seed: int, attack: str, source_id: int) -> np.random.Generator:
    """The generator of one attacked copy: independent of which other copies are made."""
    if seed < 0:
        raise LookalikeError(f"seed must be non-negative, got {seed}")
    return np.random.default_rng([seed, zlib.crc32(attack.encode()), int(source_id)])


def apply_attack(
    image: ImageSource, attack: str, *, seed: int = 0, source_id: int = 0
) -> Image.Image:
    """One attacked copy of ``image`` (any image input), deterministic for the arguments."""
    names = parse_attacks([attack])
    if len(names) != 1:
        raise LookalikeError(f"{attack!r} names {len(names)} attacks; apply one at a time")
    (name,) = names
    return ALL_ATTACKS[name](load_image(image), attack_rng(seed, name, source_id))


@dataclass(frozen=True)
class AttackedCopy:
    """One query: ``image`` is ``attack`` applied to database item ``source_id``."""

    source_id: int
    attack: str
    image: Image.Image


def sample_sources(database_size: int, copies: int, seed: int) -> np.ndarray:
    """The database positions that get attacked: a seeded sample, sorted, shared by attacks."""
    if copies < 1:
        raise LookalikeError(f"copies must be at least 1, got {copies}")
    rng = np.random.default_rng(seed)
    size = min(copies, database_size)
    return np.sort(rng.choice(database_size, size=size, replace=False)).astype(np.int64)


def generate_copies(
    database: Sequence[ImageSource],
    *,
    attacks: str | Iterable[str] | None = None,
    copies: int = 200,
    seed: int = 0,
    sources: np.ndarray | None = None,
) -> Iterator[AttackedCopy]:
    """Attacked copies of a seeded sample (or of ``sources``), source by source; each source
    is decoded once and given every attack."""
    names = parse_attacks(attacks)
    if sources is None:
        sources = sample_sources(len(database), copies, seed)
    for source_id in sources.tolist():
        image = load_image(database[source_id])
        for name in names:
            yield AttackedCopy(
                source_id, name, ALL_ATTACKS[name](image, attack_rng(seed, name, source_id))
            )


# -- results ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class AttackResult:
    """Copy-detection quality for one attack. Arrays hold each query's ranked candidates."""

    attack: str
    queries: int
    recall_at_1: float
    recall_at_k: float
    micro_ap: float
    recall_at_p90: float
    source_ids: np.ndarray = field(repr=False)
    candidate_ids: np.ndarray = field(repr=False)
    candidate_scores: np.ndarray = field(repr=False)
    # Mean search time of one query in milliseconds (embedding, search, re-ranking).
    query_ms: float = 0.0

    def precision_recall(self) -> tuple[np.ndarray, np.ndarray]:
        """(precision, recall) after each pooled prediction, for plotting."""
        precision, recall, _ = micro_precision_recall(
            self.candidate_scores, self.candidate_ids == self.source_ids[:, None], self.queries
        )
        return precision, recall

    def to_dict(self) -> dict[str, Any]:
        return {
            "attack": self.attack,
            "queries": self.queries,
            "recall_at_1": self.recall_at_1,
            "recall_at_k": self.recall_at_k,
            "micro_ap": self.micro_ap,
            "recall_at_p90": self.recall_at_p90,
            "query_ms": round(self.query_ms, 2),
        }


@dataclass(frozen=True)
class CopyDetectionResult:
    """Per-attack results and how they were obtained."""

    attacks: tuple[AttackResult, ...]
    database_size: int
    sources: np.ndarray = field(repr=False)
    k: int = 10
    metric: str = "cosine"
    seed: int = 0
    reranked: bool = False
    seconds: float = 0.0
    # "collection": through a collection's search path; "exact": exact search of features.
    searched_by: str = "exact"

    def __getitem__(self, attack: str) -> AttackResult:
        for result in self.attacks:
            if result.attack == attack:
                return result
        raise KeyError(attack)

    @property
    def mean_recall_at_1(self) -> float:
        return float(np.mean([a.recall_at_1 for a in self.attacks])) if self.attacks else 0.0

    @property
    def mean_micro_ap(self) -> float:
        return float(np.mean([a.micro_ap for a in self.attacks])) if self.attacks else 0.0

    @property
    def min_recall_at_1(self) -> float:
        """The weakest attack's recall@1."""
        return float(min(a.recall_at_1 for a in self.attacks)) if self.attacks else 0.0

    @property
    def min_micro_ap(self) -> float:
        """The weakest attack's micro-AP."""
        return float(min(a.micro_ap for a in self.attacks)) if self.attacks else 0.0

    @property
    def mean_query_ms(self) -> float:
        """Mean search time of one query over every attack, in milliseconds."""
        if not self.attacks:
            return 0.0
        total = sum(a.query_ms * a.queries for a in self.attacks)
        return total / sum(a.queries for a in self.attacks)

    @property
    def pooled_micro_ap(self) -> float:
        """Micro-AP over every attack's predictions at once (one threshold for all edits)."""
        if not self.attacks:
            return 0.0
        scores = np.concatenate([a.candidate_scores.ravel() for a in self.attacks])
        matches = np.concatenate(
            [(a.candidate_ids == a.source_ids[:, None]).ravel() for a in self.attacks]
        )
        return micro_average_precision(scores, matches, sum(a.queries for a in self.attacks))

    def to_dict(self) -> dict[str, Any]:
        return {
            "database_size": self.database_size,
            "sources": len(self.sources),
            "k": self.k,
            "metric": self.metric,
            "seed": self.seed,
            "reranked": self.reranked,
            "searched_by": self.searched_by,
            "seconds": round(self.seconds, 3),
            "mean_query_ms": round(self.mean_query_ms, 2),
            "attacks": [a.to_dict() for a in self.attacks],
            "mean_recall_at_1": self.mean_recall_at_1,
            "mean_micro_ap": self.mean_micro_ap,
            "min_recall_at_1": self.min_recall_at_1,
            "min_micro_ap": self.min_micro_ap,
            "pooled_micro_ap": self.pooled_micro_ap,
        }


# -- the run ----------------------------------------------------------------------------------


class CollectionSearch:
    """Copy-detection queries through a collection's one search path.

    The database is indexed into ``collection`` first (only the images it lacks, and local
    features too with ``local_features``), then each query is answered by
    ``Collection.search`` with ``options`` (``rerank``, ``views``, ...: what the library, CLI
    and servers do with them) and its hits are mapped back to database positions; an
    image of the collection that is not in the database is a distractor (position -1).
    """

    def __init__(
        self,
        collection: Collection,
        database: Sequence[str | Path],
        *,
        local_features: bool = False,
        progress: ProgressFn | None = None,
        **options: Unpack[SearchArgs],
    ) -> None:
        self.collection = collection
        self.options = options
        paths = [str(Path(p).resolve()) for p in database]
        self.indexed = _index_database(collection, paths, local_features, progress)
        ids = collection.catalog.ids_for_paths(paths)
        missing = [p for p in paths if p not in ids]
        if missing:
            raise LookalikeError(
                f"{len(missing)} database image(s) could not be indexed, e.g. {missing[0]}"
            )
        self.position = {ids[p]: i for i, p in enumerate(paths)}

    def __call__(self, image: Image.Image, k: int) -> tuple[np.ndarray, np.ndarray]:
        options: SearchArgs = {**self.options, "k": k}
        response = self.collection.search(image, **options)
        ids = np.array([self.position.get(r.id, -1) for r in response], dtype=np.int64)
        scores = np.array([r.score for r in response], dtype=np.float32)
        return ids, scores


def _index_database(
    collection: Collection,
    paths: list[str],
    local_features: bool,
    progress: ProgressFn | None,
) -> int:
    """Index what ``collection`` lacks of ``paths`` (vectors, and local features when asked);
    returns how many images were embedded."""
    encoder = collection.encoder
    if local_features and collection.local_store.kind() is None:
        collection.local_store.choose(True, encoder)
    known = collection.catalog.ids_for_paths(paths)
    lacking = {i for i, _ in collection.catalog.ids_missing_vectors(collection.model_id)}
    lacking |= collection.local_store.missing()
    todo = [p for p in paths if p not in known or known[p] in lacking]
    collection.fill_thumbnails([p for p in paths if p in known and p not in todo])
    if not todo:
        return 0

    def indexing(done: int, total: int) -> None:
        if progress is not None:
            progress("database", done, total)

    report = collection.index_files(todo, progress=indexing)
    return report.embedded


def _chunks(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    iterator = iter(items)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


def _source_name(source: ImageSource, source_id: int) -> str:
    if isinstance(source, (str, Path)):
        return f"{source_id:06d}_{Path(source).stem}"
    return f"{source_id:06d}"


def embed_database(
    database: Sequence[ImageSource],
    *,
    encoder: Encoder | None = None,
    embed: EmbedFn | None = None,
    batch_size: int = 32,
    progress: ProgressFn | None = None,
) -> np.ndarray:
    """[n, dim] vectors of the database, in chunks (with progress) from either source."""
    if (encoder is None) == (embed is None):
        raise LookalikeError("give exactly one of encoder and embed")
    parts = []
    done = 0
    for chunk in _chunks(database, max(1, batch_size) * 4):
        if encoder is not None:
            parts.append(np.asarray(encoder.embed(chunk, batch_size=batch_size)))
        else:
            assert embed is not None
            parts.append(np.asarray(embed([load_image(s) for s in chunk])))
        done += len(chunk)
        if progress is not None:
            progress("database", done, len(database))
    if not parts:
        raise LookalikeError("the database is empty")
    return np.concatenate(parts).astype(np.float32, copy=False)


def run_copy_detection(
    database: Sequence[ImageSource],
    *,
    encoder: Encoder | None = None,
    embed: EmbedFn | None = None,
    search: SearchFn | None = None,
    database_vectors: np.ndarray | None = None,
    attacks: str | Iterable[str] | None = None,
    copies: int = 200,
    seed: int = 0,
    k: int = 10,
    metric: str = "cosine",
    rerank: Reranker | None = None,
    batch_size: int = 32,
    save_dir: str | Path | None = None,
    progress: ProgressFn | None = None,
) -> CopyDetectionResult:
    """Attack a seeded sample of ``database`` and search each copy among all of ``database``.

    Queries go to ``search`` (e.g. a :class:`CollectionSearch`: the collection's own search
    path), or features come from ``encoder`` or ``embed`` and are searched exactly (exactly
    one of the three); ``database_vectors`` skips embedding the database (they must come from
    the same features). ``k`` candidates per query are kept (and given to ``rerank``);
    recall@k and micro-AP use them. Euclidean distances are negated so that higher is better
    throughout. ``save_dir`` writes every attacked copy as ``save_dir/<attack>/<source>.png``.
    """
    started = time.perf_counter()
    names = parse_attacks(attacks)
    if k < 1:
        raise LookalikeError(f"k must be at least 1, got {k}")
    if sum(x is not None for x in (encoder, embed, search)) != 1:
        raise LookalikeError("give exactly one of encoder, embed and search")
    if len(database) == 0:
        raise LookalikeError("the database is empty")
    save_root = Path(save_dir) if save_dir is not None else None
    sources = sample_sources(len(database), copies, seed)
    depth = min(k, len(database))
    if search is not None:
        if database_vectors is not None:
            raise LookalikeError("database_vectors go with encoder or embed, not search")
        answer = search
    else:
        answer = _exact_search(
            database, encoder, embed, database_vectors, metric, batch_size, progress
        )
    found: dict[str, dict[str, list[Any]]] = {
        name: {"sources": [], "ids": [], "scores": [], "seconds": []} for name in names
    }
    total = len(sources) * len(names)
    done = 0
    # A chunk holds about one encoder batch of attacked images, whatever the number of attacks.
    per_chunk = max(1, batch_size // len(names))
    copies_iter = generate_copies(database, attacks=names, seed=seed, sources=sources)
    for chunk in _chunks(copies_iter, per_chunk * len(names)):
        if save_root is not None:
            for copy in chunk:
                folder = save_root / copy.attack
                folder.mkdir(parents=True, exist_ok=True)
                name = _source_name(database[copy.source_id], copy.source_id)
                copy.image.save(folder / f"{name}.png")
        if isinstance(answer, _ExactSearch):
            # Embedded a chunk at a time (batches are what an encoder is fast at); the
            # chunk's time is shared evenly by its queries.
            began = time.perf_counter()
            answers = answer.many([c.image for c in chunk], depth)
            each = (time.perf_counter() - began) / len(chunk)
            timed = [(ids, values, each) for ids, values in answers]
        else:
            timed = []
            for copy in chunk:
                began = time.perf_counter()
                ids, values = answer(copy.image, depth)
                timed.append((ids, values, time.perf_counter() - began))
        for copy, (ids, values, seconds) in zip(chunk, timed, strict=True):
            ids, values = _padded(ids, values, depth)
            if rerank is not None:
                began = time.perf_counter()
                ids, values = _reranked(rerank, copy.image, ids, values)
                seconds += time.perf_counter() - began
            bucket = found[copy.attack]
            bucket["sources"].append(np.array(copy.source_id))
            bucket["ids"].append(ids)
            bucket["scores"].append(values)
            bucket["seconds"].append(seconds)
        done += len(chunk)
        if progress is not None:
            progress("queries", done, total)

    results = tuple(_attack_result(name, found[name]) for name in names)
    return CopyDetectionResult(
        attacks=results,
        database_size=len(database),
        sources=sources,
        k=depth,
        metric=metric,
        seed=seed,
        reranked=rerank is not None,
        seconds=time.perf_counter() - started,
        searched_by="exact" if isinstance(answer, _ExactSearch) else "collection",
    )


class _ExactSearch:
    """Exact search over the database's features (the suite's own, without a collection)."""

    def __init__(self, database_vectors: np.ndarray, embed: EmbedFn, metric: str, dim: int) -> None:
        self.database_vectors = database_vectors
        self.embed = embed
        self.metric = metric
        self.dim = dim

    def many(self, images: list[Image.Image], depth: int) -> list[tuple[np.ndarray, np.ndarray]]:
        vectors = np.asarray(self.embed(images), dtype=np.float32)
        if vectors.shape != (len(images), self.dim):
            raise LookalikeError(
                f"embed returned shape {vectors.shape} for {len(images)} images, expected "
                f"[{len(images)}, {self.dim}]"
            )
        scores, higher_is_better = score_matrix(vectors, self.database_vectors, self.metric)
        similarity = scores if higher_is_better else -scores
        order = np.argsort(-similarity, axis=1, kind="stable")[:, :depth]
        top = np.take_along_axis(similarity, order, axis=1)
        return list(zip(order, top, strict=True))

    def __call__(self, image: Image.Image, depth: int) -> tuple[np.ndarray, np.ndarray]:
        return self.many([image], depth)[0]


def _exact_search(
    database: Sequence[ImageSource],
    encoder: Encoder | None,
    embed: EmbedFn | None,
    database_vectors: np.ndarray | None,
    metric: str,
    batch_size: int,
    progress: ProgressFn | None,
) -> _ExactSearch:
    if database_vectors is None:
        database_vectors = embed_database(
            database, encoder=encoder, embed=embed, batch_size=batch_size, progress=progress
        )
    database_vectors = np.asarray(database_vectors, dtype=np.float32)
    if database_vectors.ndim != 2 or len(database_vectors) != len(database):
        raise LookalikeError(
            f"database_vectors has shape {database_vectors.shape}, expected {len(database)} rows"
        )
    if encoder is not None:
        model = encoder

        def embed(images: list[Image.Image]) -> np.ndarray:
            return model.embed(images, batch_size=batch_size)

    assert embed is not None
    return _ExactSearch(database_vectors, embed, metric, database_vectors.shape[1])


def _padded(ids: np.ndarray, scores: np.ndarray, depth: int) -> tuple[np.ndarray, np.ndarray]:
    """Exactly ``depth`` candidates: a search that returned fewer is padded with position -1
    scored -inf (never a match, ranked after every real prediction)."""
    ids = np.asarray(ids, dtype=np.int64).ravel()[:depth]
    scores = np.asarray(scores, dtype=np.float32).ravel()[:depth]
    if len(ids) != len(scores):
        raise LookalikeError(f"search returned {len(ids)} ids but {len(scores)} scores")
    missing = depth - len(ids)
    if missing:
        ids = np.concatenate([ids, np.full(missing, -1, dtype=np.int64)])
        scores = np.concatenate([scores, np.full(missing, -np.inf, dtype=np.float32)])
    return ids, scores


def _reranked(
    rerank: Reranker, query: Image.Image, ids: np.ndarray, scores: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    new = np.asarray(rerank(query, ids.copy(), scores.copy()), dtype=np.float64).ravel()
    if new.shape != ids.shape:
        raise LookalikeError(f"rerank returned {new.shape[0]} scores for {len(ids)} candidates")
    order = np.argsort(-new, kind="stable")
    return ids[order], new[order].astype(np.float32)


def _attack_result(name: str, found: dict[str, list[Any]]) -> AttackResult:
    source_ids = np.array(found["sources"], dtype=np.int64)
    ids = np.stack(found["ids"]).astype(np.int64)
    seconds = found.get("seconds")
    query_ms = 1000.0 * float(np.mean(seconds)) if seconds else 0.0
    scores = np.stack(found["scores"]).astype(np.float32)
    matches = ids == source_ids[:, None]
    precision, recall, _ = micro_precision_recall(scores, matches, len(source_ids))
    return AttackResult(
        attack=name,
        queries=len(source_ids),
        recall_at_1=float(matches[:, 0].mean()),
        recall_at_k=float(matches.any(axis=1).mean()),
        micro_ap=micro_average_precision(scores, matches, len(source_ids)),
        recall_at_p90=recall_at_precision(precision, recall, 0.9),
        source_ids=source_ids,
        candidate_ids=ids,
        candidate_scores=scores,
        query_ms=query_ms,
    )
