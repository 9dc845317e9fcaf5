"""How well a model solves a circuit task: its logit difference at the last position of each
pair's prompts (clean answer minus patch answer on the clean prompt, patch answer minus clean answer
on the patch prompt) and how often it prefers the right answer. A task the model cannot do has no
circuit to find. Prompts run as BOS + the prompt's tokens; a batch holds prompts of one token
length, so there is no padding."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import torch
from routesae.model.special_tokens import SpecialTokens


class TaskScore(NamedTuple):
    """A model's figures on a task's pairs."""

    n: int
    """Pairs scored."""
    clean_logit_diff: float
    """Mean over pairs of logit(clean answer) - logit(patch answer) on the clean prompt."""
    patch_logit_diff: float
    """Mean over pairs of logit(patch answer) - logit(clean answer) on the patch prompt."""
    clean_accuracy: float
    """Share of clean prompts where the clean answer's logit is the larger of the two."""
    patch_accuracy: float
    """Share of patch prompts where the patch answer's logit is the larger of the two."""

    def as_dict(self) -> dict[str, float]:
        return self._asdict()


Tick = Callable[[int], None] | None
"""Called with the prompts of each forward done (a progress bar's update), or None."""


@torch.no_grad()
def last_logits(model: torch.nn.Module, tokenizer: Any, prompts: list[str], batch_size: int = 32,
                tick: Tick = None) -> torch.Tensor:
    """[len(prompts), vocab] float32 logits at each prompt's last token, BOS prepended; prompts are
    batched by token length so no batch needs padding."""
    bos = SpecialTokens.of(tokenizer).bos
    device = next(model.parameters()).device
    ids = [[bos, *tokenizer(p, add_special_tokens=False)["input_ids"]] for p in prompts]
    by_len: dict[int, list[int]] = defaultdict(list)
    for i, seq in enumerate(ids):
        by_len[len(seq)].append(i)
    out: list[torch.Tensor | None] = [None] * len(prompts)
    for idx in by_len.values():
        for start in range(0, len(idx), batch_size):
            chunk = idx[start:start + batch_size]
            batch = torch.tensor([ids[i] for i in chunk], device=device)
            logits = model(input_ids=batch, use_cache=False).logits[:, -1].float().cpu()  # no KV cache to build
            for row, i in enumerate(chunk):
                out[i] = logits[row]
            if tick is not None:
                tick(len(chunk))
    return torch.stack(out) if out else torch.empty(0)


class PairDiffs(NamedTuple):
    """Per-pair logit differences, the right answer's logit minus the wrong one's."""

    clean: np.ndarray
    """[n] on the clean prompts: clean answer - patch answer."""
    patch: np.ndarray
    """[n] on the patch prompts: patch answer - clean answer."""


def pair_diffs(model: torch.nn.Module, tokenizer: Any, records: list[dict[str, Any]], batch_size: int = 32,
               tick: Tick = None) -> PairDiffs:
    """The model's logit differences on each of `records` (the JSONL records of one task):
    2 * len(records) prompts (tick: per forward, with its prompt count)."""
    clean = last_logits(model, tokenizer, [r["clean_prefix"] for r in records], batch_size, tick)
    patch = last_logits(model, tokenizer, [r["patch_prefix"] for r in records], batch_size, tick)
    ca = torch.tensor([r["clean_answer_id"] for r in records])
    pa = torch.tensor([r["patch_answer_id"] for r in records])
    rows = torch.arange(len(records))
    return PairDiffs((clean[rows, ca] - clean[rows, pa]).numpy(), (patch[rows, pa] - patch[rows, ca]).numpy())


def summarize(d: PairDiffs) -> TaskScore:
    """Means and accuracies of per-pair differences."""
    if len(d.clean) == 0:
        return TaskScore(0, float("nan"), float("nan"), float("nan"), float("nan"))
    return TaskScore(len(d.clean), float(np.mean(d.clean)), float(np.mean(d.patch)),
                     float(np.mean(d.clean > 0)), float(np.mean(d.patch > 0)))


def score_task(model: torch.nn.Module, tokenizer: Any, records: list[dict[str, Any]],
               batch_size: int = 32, tick: Tick = None) -> tuple[TaskScore, dict[str, TaskScore]]:
    """The model's figures on `records`, overall and per template variant (tick: see pair_diffs)."""
    if not records:
        return summarize(PairDiffs(np.zeros(0), np.zeros(0))), {}
    d = pair_diffs(model, tokenizer, records, batch_size, tick)
    variants = np.array([r.get("variant", "") for r in records])
    by_variant = {v: summarize(PairDiffs(d.clean[variants == v], d.patch[variants == v]))
                  for v in sorted(set(variants.tolist()))}
    return summarize(d), by_variant


def format_score(task: str, s: TaskScore) -> str:
    """A small table of the figures."""
    return "\n".join([
        f"{task}: {s.n} eval pairs",
        f"  {'prompt':<7} {'mean logit diff':>16} {'accuracy':>9}",
        f"  {'clean':<7} {s.clean_logit_diff:>16.3f} {s.clean_accuracy:>9.3f}",
        f"  {'patch':<7} {s.patch_logit_diff:>16.3f} {s.patch_accuracy:>9.3f}",
    ])
