"""Pack documents into contexts of exactly context_len tokens: BOS first, documents separated by
EOS, no padding anywhere. The packer's position (document index, tokens consumed in it) after each
context is what a harvest commits, so a resumed harvest continues from that exact token."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from routesae.errors import RouteSAEError
from routesae.model.special_tokens import SpecialTokens


@dataclass(frozen=True)
class PackState:
    """Where the packer stands in the document stream."""

    doc: int = 0
    """Index of the first document not fully consumed."""
    offset: int = 0
    """Tokens of that document (its trailing EOS included) already placed in contexts."""

    def to_json(self) -> dict[str, int]:
        return asdict(self)


def pack_contexts(
    documents: Callable[[], Iterator[str]],
    tokenizer: Any,
    context_len: int,
    start: PackState = PackState(),
    tokenize_batch: int = 64,
) -> Iterator[tuple[np.ndarray, PackState]]:
    """Yield (token ids [context_len] int32, state after this context) until the documents run out.

    A trailing partial context is dropped: every context is exactly context_len tokens."""
    if context_len < 2:
        raise RouteSAEError("context length must be at least 2 (BOS plus one token)")
    special = SpecialTokens.of(tokenizer)
    body = context_len - 1
    docs = enumerate(documents())
    # Documents already committed are skipped without tokenizing them.
    docs = itertools.islice(docs, start.doc, None)

    buf = np.empty(body, dtype=np.int32)
    fill = 0
    while True:
        batch = list(itertools.islice(docs, tokenize_batch))
        if not batch:
            return
        texts = [text for _, text in batch]
        encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
        for (index, _), ids in zip(batch, encoded):
            if not ids:
                continue  # an empty document adds no separator either
            toks = np.asarray([*ids, special.eos], dtype=np.int32)
            pos = start.offset if index == start.doc else 0
            while pos < len(toks):
                take = min(body - fill, len(toks) - pos)
                buf[fill : fill + take] = toks[pos : pos + take]
                fill += take
                pos += take
                if fill == body:
                    state = PackState(index, pos) if pos < len(toks) else PackState(index + 1, 0)
                    yield np.concatenate([[special.bos], buf]).astype(np.int32), state
                    fill = 0
