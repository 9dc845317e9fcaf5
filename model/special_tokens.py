"""The special tokens of a tokenizer as routesae uses them: the BOS that starts every context, the
EOS after every document, and every special id, which stores flag and metrics leave out. Shared by
the harvest's packing and by the stages that run prompts live."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from routesae.errors import RouteSAEError


@dataclass(frozen=True)
class SpecialTokens:
    """Token ids the packer inserts and the store flags as special."""

    bos: int
    eos: int
    flagged: frozenset[int]
    """BOS, EOS, pad, the tokenizer's other named special ids and every token its vocabulary marks
    special (chat and fill-in-the-middle markers, reserved ids): left out of training and statistics."""

    @classmethod
    def of(cls, tokenizer: Any) -> "SpecialTokens":
        bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else bos
        if bos is None:
            raise RouteSAEError("the tokenizer has neither a BOS nor an EOS token to mark context and document starts")
        ids = {bos, eos, tokenizer.pad_token_id, *getattr(tokenizer, "all_special_ids", []), *marked_special(tokenizer)}
        return cls(int(bos), int(eos), frozenset(int(i) for i in ids if i is not None))

    def mask(self, ids: np.ndarray) -> np.ndarray:
        return np.isin(ids, np.fromiter(self.flagged, dtype=np.int64))


def marked_special(tokenizer: Any) -> list[int]:
    """Ids of the added tokens the tokenizer marks special. `all_special_ids` names only the ones it
    has a role for (bos, eos, pad, unk, additional_special_tokens), but a document's text that spells
    any marked one (SmolLM2's <repo_name>, Llama 3's <|start_header_id|>) still encodes to its id."""
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    return [int(i) for i, token in added.items() if getattr(token, "special", False)]
