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


@lru_cache(maxsize=1 << 16)  # frequent n-grams; bounded, whatever the corpus
def bucket(ngram: str, num_buckets: int = NUM_BUCKETS) -> int:
    """The hash bucket of one n-gram (sha256 of its UTF-8 text, modulo ``num_buckets``)."""
    return int(hashlib.sha256(ngram.encode("utf-8")).hexdigest(), 16) % num_buckets


def words_of(text: str) -> list[str]:
    """Lowercased WordPunct words of ``text``."""
    return WORD_PUNCT.findall(text.lower())


def ngram_buckets(text: str, n: int = 2, num_buckets: int = NUM_BUCKETS) -> list[int]:
    """The bucket of every unigram .. ``n``-gram of ``text``, one entry per occurrence."""
    words = words_of(text)
    out = [bucket(word, num_buckets) for word in words]
    for size in range(2, n + 1):
        out += [
            bucket(" ".join(words[start : start + size]), num_buckets)
            for start in range(len(words) - size + 1)
        ]
    return out


def ngram_counts(
    text: str, n: int = 2, num_buckets: int = NUM_BUCKETS, out: np.ndarray | None = None
) -> np.ndarray:
    """Hashed counts ``[num_buckets]`` of the unigrams .. ``n``-grams of ``text`` (added to ``out``)."""
    counts = np.zeros(num_buckets, dtype=np.int64) if out is None else out
    np.add.at(counts, np.asarray(ngram_buckets(text, n, num_buckets), dtype=np.int64), 1)
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


def log_ratio(
    raw_texts: Iterable[str],
    target_texts: dict[str, Sequence[str]],
    n: int = 2,
    num_buckets: int = NUM_BUCKETS,
) -> tuple[np.ndarray, list[str]]:
    """``log(p_t + ε) − log(p_raw + ε)`` ``[T, buckets]`` (targets in sorted name order) and
    the target names: one pass over ``raw_texts``, so the corpus may be a stream."""
    names = sorted(target_texts)
    raw = fit_distribution(raw_texts, n, num_buckets)
    targets = np.stack([fit_distribution(target_texts[name], n, num_buckets) for name in names])
    return np.log(targets + SMOOTHING) - np.log(raw + SMOOTHING), names


def block_weights(texts: Iterable[str], log_diff: np.ndarray, n: int = 2) -> np.ndarray:
    """``w`` ``[b, T]`` of a block of texts: ``w_it = Σ_b c_ib · log_diff[t, b]``, summed over
    each text's n-gram occurrences (``c_ib`` of them in bucket b)."""
    buckets: list[int] = []
    starts: list[int] = []
    for text in texts:
        starts.append(len(buckets))
        buckets += ngram_buckets(text, n, log_diff.shape[1])
    weights = np.zeros((len(starts), log_diff.shape[0]))
    if buckets:
        per_gram = log_diff[:, np.asarray(buckets, dtype=np.int64)].T  # [occurrences, T]
        sizes = np.diff(np.asarray([*starts, len(buckets)]))
        filled = sizes > 0
        weights[filled] = np.add.reduceat(per_gram, np.asarray(starts)[filled], axis=0)
    return weights


def log_importance_weights(
    raw_texts: Sequence[str],
    target_texts: dict[str, Sequence[str]],
    n: int = 2,
    num_buckets: int = NUM_BUCKETS,
) -> tuple[np.ndarray, list[str]]:
    """``w`` ``[N, T]`` (one column per target, in sorted name order) and the target names."""
    log_diff, names = log_ratio(raw_texts, target_texts, n, num_buckets)
    return block_weights(raw_texts, log_diff, n), names


def budget_shares(budget: int, n_targets: int, proportions: Sequence[float] | None) -> list[int]:
    """Rows per target: ``int(budget · p_t)``, the remainder to the last (the package's split)."""
    shares = np.full(n_targets, 1.0 / n_targets) if proportions is None else np.asarray(proportions)
    shares = shares / shares.sum()
    counts = [int(budget * p) for p in shares]
    counts[-1] += budget - sum(counts)
    return counts


class StreamingResample:
    """DSIR's resampling over a stream of weight blocks, holding ``O(B·T)`` numbers.

    Target t takes its ``count_t`` rows by Gumbel-top-k on ``w_it + g_it`` among rows no
    earlier target took. The rows earlier targets take number at most
    ``Σ_{s<t} count_s``, so target t's rows lie among its ``Σ_{s≤t} count_s ≤ B`` best
    keys: keeping each target's best ``B`` keys over the stream (``StreamingTopB``, ties to
    the lower row) and resolving the targets in order at the end is exact. The noise
    ``g_it`` is drawn per block from one seeded generator, in row order.
    """

    def __init__(
        self,
        budget: int,
        n_targets: int,
        seed: int,
        proportions: Sequence[float] | None = None,
        top_k: bool = False,
    ) -> None:
        from grasp_cli.select.stream import StreamingTopB

        self.budget, self.top_k = budget, top_k
        self.counts = budget_shares(budget, n_targets, proportions)
        self.rng = np.random.default_rng(seed)
        self.pools = [StreamingTopB(budget, keep_rows=False) for _ in range(n_targets)]
        self.rows = 0

    def push(self, weights: np.ndarray) -> None:
        """The weights ``[b, T]`` of the next ``b`` rows."""
        weights = np.asarray(weights, dtype=np.float64)
        keys = weights if self.top_k else weights + self.rng.gumbel(size=weights.shape)
        rows = np.arange(self.rows, self.rows + len(weights))
        for t, pool in enumerate(self.pools):
            pool.push(rows, keys[:, t])
        self.rows += len(weights)

    def result(self) -> np.ndarray:
        """Sorted row indices of the ``budget`` rows DSIR picks."""
        if not 0 < self.budget <= self.rows:
            raise ValueError(f"budget {self.budget} must lie in 1..{self.rows}")
        taken: set[int] = set()
        chosen: list[int] = []
        for pool, count in zip(self.pools, self.counts, strict=True):
            ranked, _ = pool.result()  # best key first, ties: lower row
            picked = [int(r) for r in ranked if int(r) not in taken][:count]
            taken.update(picked)
            chosen += picked
        return np.sort(np.asarray(chosen, dtype=np.int64))


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
    Gumbel-top-k (``top_k=True``: plain top-k) among rows no earlier target took
    (``StreamingResample`` on one block).
    """
    weights = np.asarray(log_weights, dtype=np.float64)
    if weights.ndim == 1:
        weights = weights[:, None]
    sampler = StreamingResample(budget, weights.shape[1], seed, proportions, top_k)
    sampler.push(weights)
    return sampler.result()


def dsir_rows(
    raw_texts: Iterable[str],
    target_texts: dict[str, Sequence[str]],
    budget: int,
    seed: int,
    block_rows: int = 8192,
    top_k: bool = False,
) -> np.ndarray:
    """DSIR's ``budget`` rows (sorted) from a corpus of texts read twice as a stream: one
    pass fits ``p_raw``, the next computes each block's weights and feeds the resampler.
    ``raw_texts`` must be iterable more than once (a list, or a reader that re-opens the
    corpus); memory is a block of texts and ``O(B·T)``."""
    log_diff, _ = log_ratio(raw_texts, target_texts)
    sampler = StreamingResample(budget, log_diff.shape[0], seed, top_k=top_k)
    block: list[str] = []
    for text in raw_texts:
        block.append(text)
        if len(block) == block_rows:
            sampler.push(block_weights(block, log_diff))
            block = []
    if block:
        sampler.push(block_weights(block, log_diff))
    return sampler.result()
