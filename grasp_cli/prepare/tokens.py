"""Byte-level tokenization into fixed-length training rows."""

from __future__ import annotations

import numpy as np

from grasp_cli.models.transformer import PAD_ID

MIN_TAIL_TOKENS = 16  # a document's last piece is kept (padded) only if it has this many tokens


def byte_sequences(text: str, seq_len: int) -> np.ndarray:
    """Rows of ``seq_len + 1`` byte tokens (int32 ``[R, seq_len+1]``): window j covers bytes
    ``[j*seq_len, j*seq_len + seq_len + 1)`` so every byte after the first is a target once.
    A short tail is padded with PAD_ID (ignored by the loss) or dropped if tiny."""
    data = np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)
    rows = []
    for start in range(0, max(len(data) - 1, 0), seq_len):
        window = data[start : start + seq_len + 1]
        if len(window) < seq_len + 1:
            if len(window) < MIN_TAIL_TOKENS:
                break
            window = np.concatenate([window, np.full(seq_len + 1 - len(window), PAD_ID, np.int32)])
        rows.append(window)
    if not rows:
        return np.zeros((0, seq_len + 1), dtype=np.int32)
    return np.stack(rows)
