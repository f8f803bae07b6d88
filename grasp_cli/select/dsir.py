"""DSIR: data selection with importance resampling over hashed n-grams (Xie et al., 2023).

The method, exactly as the authors' ``data-selection`` package (``HashedNgramDSIR``) does it:

1. Featurize a text: lowercase, split into words with NLTK's ``WordPunctTokenizer`` pattern
   ``\\w+|[^\\w\\s]+``, and count every unigram and every bigram (joined by one space) in
   ``num_buckets`` buckets, bucket = ``int(sha256(ngram).hexdigest(), 16) % num_buckets``.
2. Bag-of-ngram distributions: ``p_raw`` from all corpus examples, ``p_t`` from each target
   task's examples (``separate_targets``: one distribution per task).
3. Log importance weight of example ``i`` for task ``t``: ``w_it = Σ_b c_ib (log(p_t[b] + 1e-8)
   − log(p_raw[b] + 1e-8))``.
4. Resample: the budget is split over tasks in proportion ``target_proportions`` (here equal:
   "balanced over targets", each ``int(B · p_t)``, the last task takes the remainder); task by
   task, Gumbel-top-k on ``w_it + Gumbel noise`` (sampling without replacement in proportion
   to the importance weights; ``top_k=True`` drops the noise) among examples not chosen yet.

Text is what grasp's corpus rows decode to: byte tokens as UTF-8 (padding dropped), or, for
token corpora without a byte vocabulary, the token ids themselves as the "words". The package's
``min_example_length`` filter (100 words) exists to drop short web documents; grasp's units are
fixed-length training rows, all far shorter, so the filter is off (``min_length=0``).

``dsir_reference`` (in ``grasp_cli/anchors/dsir_ref.py``) runs the package itself on the same
rows when it is installed, so users can see both; a test pins that they agree.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Sequence
from functools import lru_cache

import numpy as np

WORD_PUNCT = re.compile(r"\w+|[^\w\s]+")
NUM_BUCKETS = 10_000
SMOOTHING = 1e-8


@lru_cache(maxsize=1 << 20)
def bucket(ngram: str, num_buckets: int = NUM_BUCKETS) -> int:
    """The hash bucket of one n-gram (sha256 of its UTF-8 text, modulo ``num_buckets``)."""
    return int(hashlib.sha256(ngram.encode("utf-8")).hexdigest(), 16) % num_buckets


def words_of(text: str) -> list[str]:
    """Lowercased WordPunct words of ``text``."""
    return WORD_PUNCT.findall(text.lower())


def ngram_counts(
    text: str, n: int = 2, num_buckets: int = NUM_BUCKETS, out: np.ndarray | None = None
) -> np.ndarray:
    """Hashed counts ``[num_buckets]`` of the unigrams .. ``n``-grams of ``text`` (added to ``out``)."""
    counts = np.zeros(num_buckets, dtype=np.int64) if out is None else out
    words = words_of(text)
    for word in words:
        counts[bucket(word, num_buckets)] += 1
    for size in range(2, n + 1):
        for start in range(len(words) - size + 1):
            counts[bucket(" ".join(words[start : start + size]), num_buckets)] += 1
    return counts


def row_text(tokens: np.ndarray, pad_id: int | None, byte_vocab: bool) -> str:
    """What one corpus row says: its bytes as UTF-8 (padding dropped), or its token ids as words."""
    values = np.asarray(tokens)
    if pad_id is not None:
        values = values[values != pad_id]
    if byte_vocab:
        return bytes(values.astype(np.uint8).tolist()).decode("utf-8", errors="replace")
    return " ".join(str(int(v)) for v in values)


def fit_distribution(
    texts: Iterable[str], n: int = 2, num_buckets: int = NUM_BUCKETS
) -> np.ndarray:
    """The bag-of-ngrams distribution ``[num_buckets]`` of ``texts`` (counts / total)."""
    counts = np.zeros(num_buckets, dtype=np.int64)
    for text in texts:
        ngram_counts(text, n, num_buckets, counts)
    total = counts.sum()
    return counts / total if total > 0 else counts.astype(np.float64)


def log_importance_weights(
    raw_texts: Sequence[str],
    target_texts: dict[str, Sequence[str]],
    n: int = 2,
    num_buckets: int = NUM_BUCKETS,
) -> tuple[np.ndarray, list[str]]:
    """``w`` ``[N, T]`` (one column per target, in sorted name order) and the target names."""
    names = sorted(target_texts)
    raw = fit_distribution(raw_texts, n, num_buckets)
    targets = np.stack([fit_distribution(target_texts[name], n, num_buckets) for name in names])
    log_diff = np.log(targets + SMOOTHING) - np.log(raw + SMOOTHING)  # [T, buckets]
    weights = np.empty((len(raw_texts), len(names)))
    for i, text in enumerate(raw_texts):
        weights[i] = log_diff @ ngram_counts(text, n, num_buckets)
    return weights, names


def resample(
    log_weights: np.ndarray,
    budget: int,
    seed: int,
    proportions: Sequence[float] | None = None,
    top_k: bool = False,
) -> np.ndarray:
    """Sorted row indices of the ``budget`` examples DSIR picks from ``log_weights`` ``[N, T]``.

    The budget is split over the T targets in ``proportions`` (default equal) as
    ``int(budget · p_t)`` with the remainder to the last; each target takes its share by
    Gumbel-top-k (``top_k=True``: plain top-k) among rows no earlier target took.
    """
    weights = np.atleast_2d(np.asarray(log_weights, dtype=np.float64))
    if weights.shape[0] == 1 and np.ndim(log_weights) == 1:
        weights = weights.T
    n_rows, n_targets = weights.shape
    if not 0 < budget <= n_rows:
        raise ValueError(f"budget {budget} must lie in 1..{n_rows}")
    shares = np.full(n_targets, 1.0 / n_targets) if proportions is None else np.asarray(proportions)
    shares = shares / shares.sum()
    counts = [int(budget * p) for p in shares]
    counts[-1] += budget - sum(counts)
    rng = np.random.default_rng(seed)
    available = np.ones(n_rows, dtype=bool)
    chosen: list[np.ndarray] = []
    for t, count in enumerate(counts):
        if count == 0:
            continue
        candidates = np.flatnonzero(available)
        keys = weights[candidates, t].copy()
        if not top_k:
            keys += rng.gumbel(size=keys.shape)
        take = candidates[np.argpartition(-keys, count - 1)[:count]]
        available[take] = False
        chosen.append(take)
    return np.sort(np.concatenate(chosen))
