"""Filters of the seed's data building: too-short examples and near-duplicates.

Near-duplicates are pairs whose cosine similarity is at least a threshold (the
seed: 0.5) between TF-IDF vectors of word unigrams and character 3-grams
(character n-grams make Korean, whose words carry particles, compare fairly).
The rule is greedy in input order: an example is dropped when it is that
similar to an example kept before it.

Comparing every pair is quadratic. Instead each kept example's TF-IDF vector
is also projected to a short dense vector by a random Gaussian projection,
which preserves inner products in expectation (Johnson-Lindenstrauss), and
put in an HNSW graph (faiss), whose search costs about log n. A new example
asks the graph for its nearest kept neighbours by projected cosine, and then
the exact cosine of the sparse TF-IDF vectors decides. The decision is always
the exact cosine, so nothing below the threshold is ever dropped; what the
approximation can cost is a rare missed duplicate whose true neighbour the
graph did not return. Examples inside one batch are compared exactly with each
other. Total cost: O(n log n).
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Sequence

import numpy as np

_DIM = 1 << 18  # hashed feature space of the sparse vectors
_WORD = re.compile(r"\w+", re.UNICODE)


def features(text: str) -> list[str]:
    text = text.lower()
    words = _WORD.findall(text)
    grams = []
    for word in words:
        padded = f" {word} "
        grams += [padded[i : i + 3] for i in range(len(padded) - 2)]
    return [f"w:{w}" for w in words] + [f"c:{g}" for g in grams]


def tfidf_matrix(texts: Sequence[str]):
    """L2-normalised TF-IDF rows (scipy CSR), features hashed into 2**18 columns."""
    from scipy import sparse

    indptr, indices, counts = [0], [], []
    for text in texts:
        bag: dict[int, int] = {}
        for feat in features(text):
            key = zlib.crc32(feat.encode()) % _DIM
            bag[key] = bag.get(key, 0) + 1
        indices.extend(bag.keys())
        counts.extend(bag.values())
        indptr.append(len(indices))
    matrix = sparse.csr_matrix(
        (
            np.asarray(counts, dtype=np.float32),
            np.asarray(indices, dtype=np.int64),
            np.asarray(indptr, dtype=np.int64),
        ),
        shape=(len(texts), _DIM),
    )
    doc_freq = np.bincount(matrix.indices, minlength=_DIM)
    idf = np.log((1 + len(texts)) / (1 + doc_freq)).astype(np.float32) + 1.0
    matrix = matrix.multiply(idf[None, :]).tocsr()
    norms = np.sqrt(np.asarray(matrix.multiply(matrix).sum(axis=1)).ravel())
    norms[norms == 0] = 1.0
    return sparse.diags(1.0 / norms).dot(matrix).tocsr().astype(np.float32)


def _projection(dim: int, seed: int):
    """A Gaussian projection drawn row by row from each feature's hash: no 2**18 x dim matrix."""
    rng = np.random.default_rng(seed)
    # 2**16 distinct rows shared by the 2**18 hashed features: a second hashing trick.
    return rng.standard_normal((1 << 16, dim), dtype=np.float32) / np.sqrt(dim)


def near_duplicates(
    texts: Sequence[str],
    threshold: float = 0.5,
    *,
    dim: int = 128,
    neighbours: int = 16,
    batch: int = 1024,
    seed: int = 0,
) -> list[bool]:
    """For each text, True when it is a near-duplicate of an earlier kept text."""
    import faiss
    from scipy import sparse

    n = len(texts)
    if n == 0:
        return []
    tfidf = tfidf_matrix(texts)
    table = _projection(dim, seed)
    folded = sparse.csr_matrix(
        (tfidf.data, tfidf.indices % table.shape[0], tfidf.indptr), shape=(n, table.shape[0])
    )
    dense = np.asarray(folded.dot(table), dtype=np.float32)
    faiss.normalize_L2(dense)

    index = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efSearch = max(64, 2 * neighbours)
    kept_ids: list[int] = []  # index position -> example id
    dropped = [False] * n
    for start in range(0, n, batch):
        ids = np.arange(start, min(start + batch, n))
        block = tfidf[ids]
        # Exact similarities to the kept candidates the graph proposes.
        hit_kept = np.zeros(len(ids), dtype=bool)
        if kept_ids:
            _, found = index.search(dense[ids], min(neighbours, len(kept_ids)))
            rows, slots = np.nonzero(found >= 0)
            cands = np.asarray(kept_ids)[found[rows, slots]]
            sims = np.asarray(tfidf[cands].multiply(block[rows]).sum(axis=1)).ravel()
            np.logical_or.at(hit_kept, rows, sims >= threshold)
        # Exact similarities inside the batch, greedy in order.
        close = block.dot(block.T).toarray() >= threshold
        kept_here = np.zeros(len(ids), dtype=bool)
        for row in range(len(ids)):
            if hit_kept[row] or (close[row] & kept_here).any():
                dropped[ids[row]] = True
            else:
                kept_here[row] = True
        if kept_here.any():
            # HNSW inserts in parallel threads, in an order the scheduler picks: the graph,
            # so the neighbours a search proposes, and so what is dropped would vary from
            # run to run. Inserted in one thread it is the same graph every time (the same
            # input, the same output); searches stay parallel, each query on its own.
            threads = faiss.omp_get_max_threads()
            faiss.omp_set_num_threads(1)
            try:
                index.add(dense[ids[kept_here]])
            finally:
                faiss.omp_set_num_threads(threads)
            kept_ids.extend(int(i) for i in ids[kept_here])
    return dropped


def cosine_matrix(texts: Sequence[str]) -> np.ndarray:
    """The exact similarities the filter decides by, for a small set (tests, debugging)."""
    matrix = tfidf_matrix(texts)
    return matrix.dot(matrix.T).toarray()
