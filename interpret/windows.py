"""Where a token's window may reach: its context, cut at special tokens (the BOS that starts a
context, the EOS that packing put after each document, pads), so a window never spans two
documents or holds a special token. And the RouteSAE paper's sentence around a token."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

SENTENCE_ENDS = (".", "!", "?", '"')
"""A token whose text holds one of these ends a sentence (the RouteSAE code's rule)."""


def segments(special: Tensor, context_len: int) -> tuple[Tensor, Tensor]:
    """special [n] bool of whole contexts -> (first, end) [n] int64: the batch rows of the first
    token and one past the last token of each row's run of non-special tokens in its context."""
    n = special.numel()
    rows = torch.arange(n)
    pos = rows % context_len
    # a virtual special token just before each context and just after it
    left = torch.where(special, rows, torch.where(pos == 0, rows - 1, torch.full_like(rows, -1)))
    first = torch.cummax(left, 0).values + 1
    right = torch.where(special, rows, torch.where(pos == context_len - 1, rows + 1, torch.full_like(rows, n)))
    end = torch.flip(torch.cummin(torch.flip(right, [0]), 0).values, [0])
    return first, end


def window_bounds(rows: Tensor, first: Tensor, end: Tensor, left: int, right: int) -> tuple[Tensor, Tensor]:
    """-> (start, stop) batch rows of the windows around `rows`: `left` tokens before and `right`
    after, cut to the row's segment."""
    start = torch.maximum(rows - left, first[rows])
    stop = torch.minimum(rows + right + 1, end[rows])
    return start, stop


def sentence_bounds(token_ids: np.ndarray, special: np.ndarray, mark: int, ends: np.ndarray, half: int
                    ) -> tuple[int, int]:
    """The sentence around token `mark` of a stretch of tokens: back to just after the previous token
    ending a sentence, forward through the next one, never past a special token; when longer than
    2 * half tokens, cut to `half` tokens each side. ends [vocab] bool: the token ends a sentence.
    -> (start, stop) indices into the stretch."""
    start = mark
    while start > 0 and not special[start - 1] and not ends[token_ids[start - 1]] and mark - start <= 2 * half:
        start -= 1
    stop = mark + 1
    if not ends[token_ids[mark]]:
        while stop < len(token_ids) and not special[stop] and stop - mark <= 2 * half:
            stop += 1
            if ends[token_ids[stop - 1]]:
                break
    if stop - start > 2 * half:
        start, stop = max(start, mark - half), min(stop, mark + half)
    return start, stop


def sentence_end_tokens(vocab: list[str]) -> np.ndarray:
    """[vocab] bool: the token's text holds a sentence end."""
    return np.array([any(c in text for c in SENTENCE_ENDS) for text in vocab], dtype=bool)
