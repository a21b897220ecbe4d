"""Vector indexes: exact, Annoy, LSH, HNSW, IVF, IVF-PQ and binary backends behind one protocol.

Spec grammar (whitespace around tokens is ignored, option names match case-insensitively)::

    spec    := backend [ ":" option { "," option } ]
    option  := name "=" value

    auto     recall=0.95     (lookalike's choice, see choose_spec, its search knob tuned on the
                              collection's own vectors to reach this recall@10: knn.tuning)

    exact    engine=numpy|faiss
    annoy    trees=50, search_k=-1, seed=0
    lsh      bits=16, tables=8, probe=1, seed=0
    hnsw     M=32, efConstruction=200, ef=128, sq=0|8|16
    ivfpq    nlist=1024, m=<divisor of dim near dim/4>, nbits=8, nprobe=16, rerank=0, sq=0|16,
             quantizer=flat|hnsw
    ivf      nlist=1024, nprobe=8, sq=16|8|0, quantizer=flat|hnsw
    binary   packed=false, engine=numpy|faiss|hnsw, M=32, ef=128
    ray      shards=4, nlist=1024, nprobe=8, sq=16|8|0, quantizer=flat|hnsw, cpus=1,
             timeout=30, replace=true, address=auto|local|HOST:PORT|ray://HOST:PORT

Values are integers, booleans (true/false/1/0/yes/no) or one of the listed words. Every index
saves to one self-describing file (see ``_format``), so ``load_index(path)`` needs no
arguments.
"""

from __future__ import annotations

import importlib
import math
from pathlib import Path
from typing import Any

from lookalike.errors import CorruptIndexError, IndexSpecError
from lookalike.knn._common import BaseIndex
from lookalike.knn._format import read_index_file, read_index_header
from lookalike.knn.base import Index, Metric, SearchHits
from lookalike.knn.exact import ExactIndex

__all__ = [
    "AUTO",
    "BACKENDS",
    "ExactIndex",
    "Index",
    "Metric",
    "SearchHits",
    "backend_class",
    "choose_spec",
    "create_index",
    "load_index",
    "parse_auto",
    "parse_spec",
    "read_index_header",
]

# Imported on demand: faiss and annoy load only when one of their backends is used.
BACKENDS: dict[str, str] = {
    "exact": "lookalike.knn.exact:ExactIndex",
    "annoy": "lookalike.knn.annoy:AnnoyIndex",
    "lsh": "lookalike.knn.lsh:LSHIndex",
    "hnsw": "lookalike.knn.hnsw:HNSWIndex",
    "ivfpq": "lookalike.knn.ivfpq:IVFPQIndex",
    "ivf": "lookalike.knn.ivf:IVFIndex",
    "binary": "lookalike.knn.binary:BinaryIndex",
    "ray": "lookalike.knn.ray_shards:RayShardedIndex",
}

EXACT_MAX_N = 20_000
# The self-tuning default spec and the recall@10 it aims for when none is given.
AUTO = "auto"
DEFAULT_RECALL = 0.95


def backend_class(name: str) -> type[BaseIndex]:
    """The class implementing a backend name."""
    try:
        module_name, class_name = BACKENDS[name].split(":")
    except KeyError:
        valid = ", ".join(BACKENDS)
        raise IndexSpecError(f"unknown index backend {name!r}; valid backends: {valid}") from None
    cls: type[BaseIndex] = getattr(importlib.import_module(module_name), class_name)
    return cls


def parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """Split a spec into its backend name and typed options (canonical option names)."""
    if not isinstance(spec, str) or not spec.strip():
        raise IndexSpecError(f"an index spec must be a non-empty string, got {spec!r}")
    name, _, rest = spec.partition(":")
    name = name.strip().lower()
    cls = backend_class(name)
    canonical = {option.lower(): option for option in cls.options}
    valid = ", ".join(f"{option}={cls.options[option].default!r}" for option in cls.options)
    values: dict[str, Any] = {}
    for item in rest.split(",") if rest.strip() else []:
        key, equals, text = item.partition("=")
        key = key.strip()
        if not equals or not key or not text.strip():
            raise IndexSpecError(f"{name}: expected name=value, got {item.strip()!r}")
        option = key if key in cls.options else canonical.get(key.lower())
        if option is None:
            raise IndexSpecError(f"{name}: unknown option {key!r}; valid options: {valid}")
        if option in values:
            raise IndexSpecError(f"{name}: option {option!r} given twice")
        values[option] = cls.options[option].parse(name, option, text)
    return name, values


def parse_auto(spec: str) -> float | None:
    """The recall target of an ``auto`` spec (``auto`` alone: 0.95), None for a backend spec.

    ``auto:recall=R`` takes R with 0 < R <= 1; anything else raises IndexSpecError."""
    if not isinstance(spec, str):
        raise IndexSpecError(f"an index spec must be a non-empty string, got {spec!r}")
    name, _, rest = spec.partition(":")
    if name.strip().lower() != AUTO:
        return None
    target = DEFAULT_RECALL
    seen = False
    for item in rest.split(",") if rest.strip() else []:
        key, equals, text = item.partition("=")
        if not equals or not key.strip() or not text.strip():
            raise IndexSpecError(f"auto: expected name=value, got {item.strip()!r}")
        if key.strip().lower() != "recall":
            valid = f"valid options: recall={DEFAULT_RECALL}"
            raise IndexSpecError(f"auto: unknown option {key.strip()!r}; {valid}")
        if seen:
            raise IndexSpecError("auto: option 'recall' given twice")
        seen = True
        try:
            target = float(text)
        except ValueError:
            raise IndexSpecError(f"auto: recall={text.strip()!r} is not a number") from None
        if not 0 < target <= 1:  # also refuses nan
            raise IndexSpecError(f"auto: recall must be above 0 and at most 1, got {text.strip()}")
    return target


def create_index(spec: str, *, dim: int, metric: str | Metric = "cosine") -> Index:
    """A new, empty index from a spec such as ``hnsw:M=32,ef=128``."""
    name, options = parse_spec(spec)
    index: Index = backend_class(name)(dim=dim, metric=metric, **options)
    return index


def load_index(path: str | Path) -> Index:
    """Load any saved index; the file names its own backend, options, dim and metric."""
    file = read_index_file(path)
    if file.backend not in BACKENDS:
        raise CorruptIndexError(f"{path}: unknown index backend {file.backend!r}")
    index: Index = backend_class(file.backend)._from_file(file, path)
    return index


def hnsw_bytes(n: int, dim: int, m: int, sq: int = 0) -> int:
    """Resident size of an n-vector HNSWIndex: stored vectors (float32, float16 or 8-bit codes
    by ``sq``), 2M level-0 links, ~48 bytes of per-node bookkeeping (ids, levels, offsets,
    upper-level links), plus 10%, plus one chunk of normalised floats while adding."""
    from lookalike.knn.hnsw import ADD_CHUNK, stored_bytes

    per_vector = stored_bytes(dim, sq) + 8 * m + 48
    return int(n * per_vector * 1.1) + ADD_CHUNK * dim * 4


def ivfpq_params(n: int, dim: int) -> dict[str, int]:
    """IVF-PQ parameters for n vectors: nlist ~ 4 sqrt(n) (a power of two), nprobe ~ nlist/64."""
    nlist = 2 ** round(math.log2(max(1.0, 4 * math.sqrt(n))))
    nlist = max(16, min(65536, nlist, 2 ** math.floor(math.log2(max(16, n // 16)))))
    return {"nlist": nlist, "nprobe": max(16, min(256, nlist // 64))}


def ivfpq_bytes(n: int, dim: int, m: int, nlist: int, rerank: bool) -> int:
    """Resident size: codes and ids, centroids and codebooks, optional float vectors (with
    their ids and id lookup) for re-ranking, plus 10%."""
    per_vector = m + 8 + (4 * dim + 24 if rerank else 0)
    return int((n * per_vector + nlist * dim * 4 + 256 * dim * 4) * 1.1)


def ivf_bytes(n: int, dim: int, nlist: int, sq: int) -> int:
    """Resident size of an n-vector IVFIndex: vectors (float16, 8-bit or float32 by ``sq``) and
    ids in the lists, the centroids, plus 10%, plus one chunk of floats while adding."""
    per_vector = {16: 2 * dim, 8: dim, 0: 4 * dim}[sq] + 8
    return int((n * per_vector + nlist * dim * 4) * 1.1) + 16_384 * dim * 4


def ivf_spec(n: int, sq: int = 16) -> str:
    """The IVF configuration lookalike uses from ``IVF_MIN_N`` vectors on (see
    :func:`choose_spec`): ``nlist`` the power of two nearest ``2 * sqrt(n)``, ``nprobe=4``."""
    nlist = 2 ** round(math.log2(max(1.0, 2 * math.sqrt(n))))
    nlist = max(16, min(65536, nlist))
    quantizer = ",quantizer=hnsw" if nlist >= _HNSW_QUANTIZER_NLIST else ""
    return f"ivf:nlist={nlist},nprobe={_IVF_NPROBE},sq={sq}{quantizer}"


# Search list of the default HNSW: ef = 160 at 200k vectors and 384 at 1M (both measured to
# give recall@10 ~0.96 on 1280-d Lite0-like vectors), a power law between and beyond.
_EF_AT_200K, _EF_AT_1M, _EF_MAX = 160, 384, 1024
# From this many vectors on, IVF-PQ with float16 re-ranking beats the HNSW graph (whose walk
# needs an ever longer candidate list as the collection grows): measured at 1M x 1280.
IVF_MIN_N = 500_000
_IVF_NPROBE = 4
# From this many clusters on, scanning the centroids costs more than an HNSW graph over them.
_HNSW_QUANTIZER_NLIST = 8192
_EF_EXPONENT = math.log(_EF_AT_1M / _EF_AT_200K) / math.log(5)


def hnsw_params(n: int) -> dict[str, int]:
    """Graph degree, insertion and search candidate lists for an n-vector default HNSW."""
    ef = _EF_AT_200K * (max(n, 200_000) / 200_000) ** _EF_EXPONENT
    ef = min(_EF_MAX, 16 * round(ef / 16))
    return {"M": 16, "efConstruction": 40 if n < 500_000 else 80, "ef": ef}


def choose_spec(n: int, dim: int, *, memory_budget_bytes: int) -> str:
    """A sensible spec for n vectors of dimension dim within a memory budget.

    Rule:
    - ``n < 20_000``: ``exact`` (a scan of that many vectors takes milliseconds, recall 1).
    - from ``IVF_MIN_N`` (500k) vectors, while it fits the budget: an inverted file
      (:func:`ivf_spec`) with float16 vectors in its lists (8-bit codes when those do not fit),
      ``nlist`` near ``2 sqrt(n)``, ``nprobe=4``. At 1M x 1280 it answered faster than the
      HNSW graph at higher recall and built several times faster
      (``benchmarks/results/ann_1m.md``): on embeddings dense with near-duplicates the graph
      walk needs a candidate list that grows with n, while a few clusters hold a query's
      neighbours.
    - else HNSW (:func:`hnsw_params`) with ``M=16``; ``efConstruction=40`` below 500k vectors,
      80 from there on; ``ef=160`` up to 200k vectors, then growing as ``n ** 0.54`` (384 at
      1M, at most 1024): in bigger graphs of near-duplicate-rich embeddings the walk needs a
      longer candidate list for the same recall, while a better-built graph (efConstruction
      120 instead of 80, or M=24) barely helped at 1M and cost up to 1.6x the build time.
      ``efConstruction`` is kept low so that building takes about half as long as Annoy with
      50 trees; ``ef`` keeps recall@10 near 0.96. Storage: float16 (``sq=16``, half the memory
      of float32 for no measurable recall loss) if it fits the budget, else 8-bit codes
      (``sq=8``, a quarter) with a 1.5x longer ``ef`` to make up for the coarser rounding.
      Sizes are estimated by :func:`hnsw_bytes` (stored vectors + links + ids, +10%).
    - else IVF-PQ with ``nlist`` the power of two nearest ``4 * sqrt(n)``, ``nprobe =
      max(16, nlist / 64)``, ``m`` the largest divisor of dim up to ``dim / 4`` whose codes fit
      the budget, and ``rerank=100`` when the float vectors fit beside the codes too. When even
      ``m=1`` does not fit, the smallest index is returned anyway (the budget is advisory).

    Measured at 200k and 1M x 1280 (EfficientNet-Lite0-like vectors, 2 build threads), see
    ``benchmarks/results/ann_200k.md`` and ``ann_1m.md``.

    The search knobs above are starting points. The default spec ``auto`` (=
    ``auto:recall=0.95``) builds this choice and then tunes it on the collection's own vectors
    (:func:`lookalike.knn.tuning.build_tuned`): the cheapest ``ef`` / ``nprobe`` whose recall@10
    on a held-out sample reaches the target. When the chosen structure misses the target even
    at its largest value, tuning falls back, in this order and only to what fits the budget, to
    a better-built graph (``hnsw:M=32,efConstruction=200``, after a cheap graph), an inverted
    file with float16 vectors (``ivf_spec(n, 16)``), then exact search. The order was decided
    by measurement on the hard Gaussian mixture of ``benchmarks/ann.py``
    (``benchmarks/results/ann_200k.md``):

    - The cheap graph (``M=16``, ``efConstruction=40``) is fast to build and fast on embeddings
      with near-duplicate neighbours, but on data whose neighbours are nearly equidistant it
      levels off: recall@10 0.49 / 0.58 / 0.63 / 0.67 / 0.69 at ef = 64 / 160 / 384 / 1024 /
      2048 at 100k x 1280, 0.52 / 0.60 at ef = 160 / 512 at 200k. Its ``ef`` is tuned up to
      512 only.
    - The better-built graph reached 0.965 at ef=512 at 200k, answering 242 queries/s where the
      inverted file answered 41 at the same recall (nprobe=256 of 1024), so it comes first;
      but it levels off near 0.96-0.97 (0.964 at ef=1024 at 100k) and takes 5-6x the cheap
      graph's build time (314 s against 55 s at 200k, 2 threads).
    - The inverted file reaches any target its float16 rounding allows, because ``nprobe``
      goes up to an exhaustive scan (0.987 at nprobe=512 of 1024 at 200k), and it builds
      fastest (32 s at 200k). One that needs every list is replaced by exact search, which
      scans the same vectors faster.
    """
    if n < 0 or dim < 1 or memory_budget_bytes < 0:
        raise IndexSpecError(f"choose_spec: bad sizes n={n}, dim={dim}")
    if n < EXACT_MAX_N:
        return "exact"
    if n >= IVF_MIN_N:
        for sq in (16, 8):
            spec = ivf_spec(n, sq)
            if ivf_bytes(n, dim, parse_spec(spec)[1]["nlist"], sq) <= memory_budget_bytes:
                return spec
    hnsw = hnsw_params(n)
    for sq, ef in ((16, hnsw["ef"]), (8, min(_EF_MAX, hnsw["ef"] * 3 // 2))):
        if hnsw_bytes(n, dim, hnsw["M"], sq) <= memory_budget_bytes:
            return f"hnsw:M={hnsw['M']},efConstruction={hnsw['efConstruction']},ef={ef},sq={sq}"
    params = ivfpq_params(n, dim)
    candidates = [d for d in range(1, dim + 1) if dim % d == 0 and d <= max(1, dim // 4)]
    fitting = [
        d
        for d in candidates
        if ivfpq_bytes(n, dim, d, params["nlist"], False) <= memory_budget_bytes
    ]
    m = max(fitting) if fitting else 1
    rerank = ivfpq_bytes(n, dim, m, params["nlist"], True) <= memory_budget_bytes
    spec = f"ivfpq:nlist={params['nlist']},m={m},nprobe={params['nprobe']}"
    return spec + (",rerank=100" if rerank else "")
