"""Tokenization into fixed-length training rows: the one place that turns text into tokens.

Two vocabularies:

- **bytes** (the default, ``prepare.tokenizer = "bytes"``): UTF-8 bytes are the tokens (ids
  0..255, pad 256); ``byte_sequences`` / ``sequences_of_chunks`` cut them into rows.
- **a token space** (``TokenSpace``): a ``tokenizer.json`` (``prepare.tokenizer = PATH``) or
  ids that are already tokenized (``prepare.eos_id`` / ``vocab_size``). A document becomes its
  ids followed by the end-of-document id (EOS), cut by ``token_windows``.

Either way a document's rows are windows of ``seq_len + 1`` tokens with stride ``seq_len``
(window j starts at token ``j * seq_len`` of the document, so every token after the first is
a target once); a row never spans two documents (each row belongs to one document: the split
keeps a document whole, and the ``doc``/``offset`` columns map a row back to it). A short last
window is padded with the pad id (ignored by the loss) or dropped if it has fewer than
``MIN_TAIL_TOKENS`` tokens.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from grasp_cli.artifacts.examples import BYTE_PAD_ID as PAD_ID
from grasp_cli.errors import ConfigError, InputError
from grasp_cli.prepare.units import Unit

MIN_TAIL_TOKENS = 16  # a document's last piece is kept (padded) only if it has this many tokens
CHUNK_ROWS = 4096  # rows per piece when a long text is tokenized in pieces
# End-of-document tokens looked up in a tokenizer, in this order (GPT-2/Pythia, Llama-2/T5-style,
# Gemma, Llama-3); prepare.eos_token names another.
EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>")
PAD_CANDIDATES = ("<pad>", "<|pad|>", "[PAD]")


def windows(tokens: np.ndarray, seq_len: int, pad_id: int) -> np.ndarray:
    """Rows of ``seq_len + 1`` tokens (int32 ``[R, seq_len+1]``) of one token sequence.

    Window j covers tokens ``[j*seq_len, j*seq_len + seq_len + 1)``; a short tail is padded
    with ``pad_id`` or dropped if it has fewer than ``MIN_TAIL_TOKENS`` tokens."""
    tokens = np.ascontiguousarray(tokens, dtype=np.int32)
    n, width = len(tokens), seq_len + 1
    full = (n - width) // seq_len + 1 if n >= width else 0
    # row j is the view tokens[j*seq_len : j*seq_len + width]; `full` keeps every row in bounds
    step = tokens.strides[0]
    rows = np.lib.stride_tricks.as_strided(
        tokens, shape=(full, width), strides=(seq_len * step, step), writeable=False
    )
    tail_start = full * seq_len
    if tail_start < n - 1 and n - tail_start >= MIN_TAIL_TOKENS:  # a short last window
        tail = np.full((1, width), pad_id, np.int32)
        tail[0, : n - tail_start] = tokens[tail_start:]
        rows = np.concatenate([rows, tail])
    return np.ascontiguousarray(rows, dtype=np.int32).reshape(-1, width)


def byte_sequences(data: bytes | str, seq_len: int) -> np.ndarray:
    """``windows`` of the UTF-8 bytes of ``data`` with grasp's byte pad ``PAD_ID`` (256)."""
    raw = data.encode("utf-8") if isinstance(data, str) else data
    return windows(np.frombuffer(raw, dtype=np.uint8), seq_len, PAD_ID)


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


def token_windows(
    pieces: Iterable[np.ndarray], seq_len: int, pad_id: int
) -> Iterator[dict[str, np.ndarray]]:
    """``windows`` of the concatenated token ``pieces`` (one document), as blocks
    ``{"tokens": int32 [R, seq_len+1], "offset": int64 [R]}`` of at most ``CHUNK_ROWS`` rows;
    ``offset`` is the document position (in tokens) of each row's first token. Only a block's
    worth of tokens is held, so a document of any length streams."""
    step = CHUNK_ROWS * seq_len
    held: list[np.ndarray] = []
    size = 0
    first_row = 0

    def emit(tokens: np.ndarray) -> dict[str, np.ndarray]:
        nonlocal first_row
        rows = windows(tokens, seq_len, pad_id)
        offsets = (first_row + np.arange(len(rows), dtype=np.int64)) * seq_len
        first_row += len(rows)
        return {"tokens": rows, "offset": offsets}

    for piece in pieces:
        if not len(piece):
            continue
        held.append(np.asarray(piece, dtype=np.int32))
        size += len(piece)
        if size > step + 1:
            buffer = np.concatenate(held)
            while len(buffer) > step + 1:
                yield emit(buffer[: step + 1])
                buffer = buffer[step:]
            held, size = [buffer], len(buffer)
    if size:
        block = emit(np.concatenate(held))
        if len(block["tokens"]):
            yield block


# ---------------------------------------------------------------- token spaces


@dataclass
class TokenSpace:
    """The ids of a tokenized corpus: ``vocab_size`` ids ``0..vocab_size-1``, ``eos_id`` ends
    every document, ``pad_id`` fills short rows (never a target; it may lie outside the
    vocabulary). ``tokenizer`` (a ``tokenizers.Tokenizer``) encodes text; without one only
    pre-tokenized inputs can be read. ``origin`` names where the space came from (the
    tokenizer file, or "prepare.eos_id/vocab_size") for messages; ``digest`` identifies it."""

    eos_id: int
    pad_id: int
    vocab_size: int
    origin: str
    digest: str
    tokenizer: Any = None

    def encode(self, texts: list[str]) -> list[np.ndarray]:
        """Token ids (int32) of each text, without special tokens (EOS is added by the caller)."""
        encodings = self.tokenizer.encode_batch(texts, add_special_tokens=False)
        return [np.asarray(e.ids, dtype=np.int32) for e in encodings]

    def check(self, ids: np.ndarray, where: str, first: int | None = None) -> None:
        """Every id in ``0..vocab_size-1``, else an ``InputError`` naming ``where`` (and, when
        ``ids`` start at token ``first`` of a file, the position of the first bad id)."""
        if not len(ids):
            return
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= self.vocab_size:
            outside = (ids < 0) | (ids >= self.vocab_size)
            at = int(np.argmax(outside))
            place = f"{where}:token {first + at}" if first is not None else where
            raise InputError(
                f"{place}: token id {int(ids[at])} outside the vocabulary "
                f"0..{self.vocab_size - 1} ({self.origin})"
            )

    def manifest(self) -> dict:
        """What the corpus manifest records about the ids (``extra``)."""
        return {
            "tokenizer": self.origin,
            "tokenizer_digest": self.digest,
            "eos_id": self.eos_id,
            "pad_id": self.pad_id,
            "vocab_size": self.vocab_size,
        }


def tokenizer_file(setting: str) -> Path:
    """The ``tokenizer.json`` named by ``prepare.tokenizer``: the file, or in the folder."""
    path = Path(setting)
    if path.is_dir():
        path = path / "tokenizer.json"
        if not path.is_file():
            raise InputError(
                f"{setting}: no tokenizer.json in this folder (prepare.tokenizer needs a "
                "tokenizers-library tokenizer.json, e.g. saved with tokenizer.save)"
            )
    elif not path.is_file():
        raise InputError(f"{setting}: prepare.tokenizer: no such file or folder")
    return path


def token_space(section: Any) -> TokenSpace | None:
    """The token space of the ``[prepare]`` settings: from ``prepare.tokenizer`` (a file or a
    folder with ``tokenizer.json``), or from ``prepare.eos_id``/``vocab_size`` for
    pre-tokenized inputs; None for grasp's byte corpus (tokenizer "bytes", no eos_id)."""
    if section.tokenizer == "bytes":
        if section.eos_id < 0:
            return None
        if section.vocab_size <= 0:
            raise ConfigError(
                "prepare.eos_id is set: also set prepare.vocab_size (the tokenizer's number of ids)"
            )
        if section.eos_id >= section.vocab_size:
            raise ConfigError(
                f"prepare.eos_id = {section.eos_id} is outside prepare.vocab_size = "
                f"{section.vocab_size}"
            )
        pad = section.pad_id if section.pad_id >= 0 else section.vocab_size
        _check_pad(pad, section.eos_id)
        origin = "prepare.eos_id/vocab_size"
        return TokenSpace(section.eos_id, pad, section.vocab_size, origin, origin)
    path = tokenizer_file(section.tokenizer)
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise ConfigError(
            "prepare.tokenizer needs the tokenizers package: pip install -e '.[hf]'"
        ) from None
    raw = path.read_bytes()
    try:
        tokenizer = Tokenizer.from_str(raw.decode("utf-8"))
    except Exception as exc:  # noqa: BLE001 - the Rust side raises plain Exceptions
        first = str(exc).strip().splitlines()
        raise InputError(
            f"{path}: not a readable tokenizer.json ({first[0][:160] if first else type(exc).__name__})"
        ) from None
    vocab = tokenizer.get_vocab_size(with_added_tokens=True)
    if section.vocab_size > 0 and section.vocab_size != vocab:
        raise ConfigError(
            f"prepare.vocab_size = {section.vocab_size} but {path} has {vocab} ids; drop the setting"
        )
    if section.eos_token:
        eos = tokenizer.token_to_id(section.eos_token)
        if eos is None:
            raise InputError(f"{path}: no token {section.eos_token!r} (prepare.eos_token)")
    elif section.eos_id >= 0:
        eos = section.eos_id
    else:
        found = [t for t in EOS_CANDIDATES if tokenizer.token_to_id(t) is not None]
        if not found:
            raise InputError(
                f"{path}: no end-of-document token (none of {', '.join(EOS_CANDIDATES)}); "
                "name it with prepare.eos_token"
            )
        eos = tokenizer.token_to_id(found[0])
    if not 0 <= eos < vocab:
        raise ConfigError(f"prepare.eos_id = {eos} is outside {path}'s ids 0..{vocab - 1}")
    if section.pad_id >= 0:
        pad = section.pad_id
    else:  # the tokenizer's own pad token, else the first id past the vocabulary
        pads = [tokenizer.token_to_id(t) for t in PAD_CANDIDATES]
        pad = next((p for p in pads if p is not None and p != eos), vocab)
    _check_pad(pad, eos)
    digest = hashlib.sha256(raw).hexdigest()[:16]
    return TokenSpace(eos, pad, vocab, str(path), digest, tokenizer)


def _check_pad(pad: int, eos: int) -> None:
    if pad == eos:
        raise ConfigError(
            f"prepare.pad_id = {pad} is the end-of-document id: padding is never a target, "
            "EOS is; choose another (or -1: the first id past the vocabulary)"
        )


def streamed_unit(
    doc: str,
    domain: str,
    where: str,
    pieces: Iterator[np.ndarray],
    seq_len: int,
    pad_id: int,
    key: str = "",
) -> Unit:
    """A document streamed from its id ``pieces`` (EOS included): rows of ``token_windows``,
    and the sha1 of its ids (int32) once its rows are consumed — the same digest whether the
    ids came from a tokenizer or a pre-tokenized file, so copies of a document match."""
    digest = hashlib.sha1()
    unit = Unit(doc, domain, where, (), key=key)

    def hashed() -> Iterator[np.ndarray]:
        for piece in pieces:
            piece = np.asarray(piece, dtype=np.int32)
            digest.update(piece.tobytes())
            yield piece

    def blocks() -> Iterator[dict[str, np.ndarray]]:
        yield from token_windows(hashed(), seq_len, pad_id)
        unit.digest = digest.digest()

    unit.blocks = blocks()
    return unit
