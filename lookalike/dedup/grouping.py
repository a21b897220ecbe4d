"""From candidate pairs to groups, without ever comparing all N x N items.

Candidate pairs come from k-nearest-neighbour searches of an index (:func:`neighbour_pairs`,
which widens k for items whose neighbours all pass, so it behaves like a range search).
Connected components of the pairs (:func:`union_find_groups`) then say which items may
belong together, and :func:`star_groups` splits each component into groups around a keeper:
every other member of a group passed the test *against the keeper*. A chain A~B~C, where A
and C are not alike, therefore never puts C in A's group; C waits for another keeper.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import numpy as np

SearchFn = Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]]
AcceptFn = Callable[[np.ndarray], np.ndarray]
# (keeper position, candidate positions) -> bool mask and a score for each candidate.
MatchFn = Callable[[int, np.ndarray], tuple[np.ndarray, np.ndarray]]

# Query rows times neighbours per search call: bounds the temporaries of one call.
SEARCH_BUDGET = 16_384


class UnionFind:
    """Disjoint sets over 0..n-1 with path halving and union by size."""

    def __init__(self, n: int) -> None:
        self.parent = np.arange(n, dtype=np.int64)
        self.size = np.ones(n, dtype=np.int64)

    def find(self, item: int) -> int:
        parent = self.parent
        while parent[item] != item:
            parent[item] = parent[parent[item]]
            item = int(parent[item])
        return int(item)

    def union(self, a: int, b: int) -> None:
        root_a, root_b = self.find(a), self.find(b)
        if root_a == root_b:
            return
        if self.size[root_a] < self.size[root_b]:
            root_a, root_b = root_b, root_a
        self.parent[root_b] = root_a
        self.size[root_a] += self.size[root_b]


def union_find_groups(n: int, pairs: Iterable[tuple[int, int]]) -> list[list[int]]:
    """Connected components of 2 or more of the items 0..n-1 linked by ``pairs``, each
    sorted, in order of their smallest item."""
    sets = UnionFind(n)
    touched: set[int] = set()
    for a, b in pairs:
        sets.union(int(a), int(b))
        touched.update((int(a), int(b)))
    components: dict[int, list[int]] = {}
    for item in sorted(touched):
        components.setdefault(sets.find(item), []).append(item)
    return [members for members in components.values() if len(members) > 1]


def neighbour_pairs(
    search: SearchFn,
    queries: np.ndarray,
    query_ids: np.ndarray,
    accept: AcceptFn,
    *,
    k: int,
    total: int,
    higher_is_better: bool = True,
) -> dict[tuple[int, int], float]:
    """(smaller id, larger id) -> score of every query and indexed neighbour that ``accept``
    keeps. ``search(queries, k)`` returns (ids, scores) [n, k], best first, id -1 for none.

    A query whose k neighbours are all accepted may have more, so it is searched again with
    4k (up to ``total``, the number indexed): a range search made of k-NN searches, whose
    memory is ``SEARCH_BUDGET`` hits at a time plus the pairs found, whatever the size of the
    index.
    """
    found: dict[tuple[int, int], float] = {}
    pending = np.arange(len(queries))
    width = min(k, total)
    while len(pending) and width > 0:
        saturated = []
        chunk = max(1, SEARCH_BUDGET // width)
        for start in range(0, len(pending), chunk):
            rows = pending[start : start + chunk]
            ids, scores = search(queries[rows], width)
            keep = accept(scores) & (ids >= 0)
            for row, mask, hit_ids, hit_scores in zip(rows, keep, ids, scores, strict=True):
                own = int(query_ids[row])
                for other, value in zip(
                    hit_ids[mask].tolist(), hit_scores[mask].tolist(), strict=True
                ):
                    if other != own:
                        key = (own, other) if own < other else (other, own)
                        previous = found.get(key)
                        better = previous is None or (
                            value > previous if higher_is_better else value < previous
                        )
                        if better:
                            found[key] = float(value)
                if mask.all():
                    saturated.append(row)
        if width >= total:
            break
        pending = np.asarray(saturated, dtype=np.int64)
        width = min(total, width * 4)
    return found


def star_groups(members: Sequence[int], match: MatchFn) -> list[tuple[int, list[int], list[float]]]:
    """Split one component into (keeper, duplicates, scores) groups.

    ``members`` come in keeper order (the preferred keeper first). The first member becomes a
    keeper and takes every remaining member that ``match`` accepts against it; the rest go on
    with the next keeper. A member that matches no keeper before it stays out of every group.
    """
    remaining = np.asarray(members, dtype=np.int64)
    groups = []
    while len(remaining) > 1:
        keeper, others = int(remaining[0]), remaining[1:]
        mask, scores = match(keeper, others)
        mask = np.asarray(mask, dtype=bool)
        if mask.any():
            groups.append((keeper, others[mask].tolist(), np.asarray(scores)[mask].tolist()))
        remaining = others[~mask]
    return groups


def hamming_pairs(
    codes: np.ndarray, distance: int, mirrored: np.ndarray | None = None, *, k: int = 16
) -> list[tuple[int, int, int]]:
    """(i, j, bits) of packed binary codes (uint8 rows) within ``distance`` bits, i < j, from
    k-NN searches of a faiss binary index (``mirrored`` codes are searched too, and a pair
    keeps its smaller distance)."""
    from lookalike.knn import create_index

    codes = np.ascontiguousarray(codes, dtype=np.uint8)
    index = create_index("binary:packed=true,engine=faiss", dim=codes.shape[1] * 8)
    positions = np.arange(len(codes), dtype=np.int64)
    index.add(positions, codes)

    def search(queries: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
        hits = index.search(queries, width)
        return hits.ids, hits.scores

    def accept(scores: np.ndarray) -> np.ndarray:
        return scores <= distance

    found: dict[tuple[int, int], float] = {}
    for queries in (codes, mirrored) if mirrored is not None else (codes,):
        pairs = neighbour_pairs(
            search,
            queries,
            positions,
            accept,
            k=k,
            total=len(codes),
            higher_is_better=False,
        )
        for key, bits in pairs.items():
            found[key] = min(bits, found.get(key, bits))
    return [(a, b, int(bits)) for (a, b), bits in sorted(found.items())]
