"""Tokenization into fixed-length training rows: the one place that turns text into tokens.

``byte_sequences`` is the tokenizer (bytes in, rows of ``seq_len + 1`` token ids out);
``sequences_of_chunks`` feeds it a long text in pieces (a large ``.txt`` is never held
whole). Swapping the tokenizer means replacing these two functions; a tokenizer that is not
byte-local must also decide where a long text may be cut.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np

from grasp_cli.models.transformer import PAD_ID

MIN_TAIL_TOKENS = 16  # a document's last piece is kept (padded) only if it has this many tokens
CHUNK_ROWS = 4096  # rows per piece when a long text is tokenized in pieces


def byte_sequences(data: bytes | str, seq_len: int) -> np.ndarray:
    """Rows of ``seq_len + 1`` byte tokens (int32 ``[R, seq_len+1]``) of UTF-8 ``data``.

    Window j covers bytes ``[j*seq_len, j*seq_len + seq_len + 1)``, so every byte after the
    first is a target once. A short tail is padded with PAD_ID (ignored by the loss) or
    dropped if it has fewer than ``MIN_TAIL_TOKENS`` tokens.
    """
    raw = data.encode("utf-8") if isinstance(data, str) else data
    tokens = np.frombuffer(raw, dtype=np.uint8).astype(np.int32)
    n, width = len(tokens), seq_len + 1
    full = (n - width) // seq_len + 1 if n >= width else 0
    # row j is the view tokens[j*seq_len : j*seq_len + width]; `full` keeps every row in bounds
    step = tokens.strides[0]
    rows = np.lib.stride_tricks.as_strided(
        tokens, shape=(full, width), strides=(seq_len * step, step), writeable=False
    )
    tail_start = full * seq_len
    if tail_start < n - 1 and n - tail_start >= MIN_TAIL_TOKENS:  # a short last window
        tail = np.full((1, width), PAD_ID, np.int32)
        tail[0, : n - tail_start] = tokens[tail_start:]
        rows = np.concatenate([rows, tail])
    return np.ascontiguousarray(rows, dtype=np.int32).reshape(-1, width)


def sequences_of_chunks(chunks: Iterable[bytes], seq_len: int) -> Iterator[np.ndarray]:
    """``byte_sequences`` of the concatenated ``chunks``, yielded in pieces of at most
    ``CHUNK_ROWS`` rows. A piece ends on a row boundary and keeps the one byte that the
    next row shares with it, so the rows are exactly those of the whole text."""
    step = CHUNK_ROWS * seq_len
    buffer = b""
    for chunk in chunks:
        buffer += chunk
        while len(buffer) > step + 1:
            yield byte_sequences(buffer[: step + 1], seq_len)
            buffer = buffer[step:]
    rows = byte_sequences(buffer, seq_len)
    if len(rows):
        yield rows
