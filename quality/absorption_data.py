"""The words and prompts of the first-letter task (feature absorption, Chanin et al. 2024, as
SAEBench runs it), and the residuals the model writes at each word.

- Words: the tokens of the model's vocabulary that decode to ASCII letters only (a leading space
  allowed), at least `MIN_WORD_LETTERS` of them, special tokens left out; their label is the first
  letter, lower-cased. A seeded 80/20 split gives the train words (probe, main latents) and the
  test words (probe F1, absorption).
- Prompt: `ICL_LINES` lines "{w} has the first letter: {W}" of train words drawn at random (seeded,
  per word), a newline, then the word's own token and " has the first letter:". The word's token
  id is placed into the ids as it is (never re-tokenized from text), so its position is known
  exactly for every tokenizer rather than assumed at -6 from the end.
- Residuals: one batched forward per word set (right-padded: a causal model's positions before the
  padding do not see it), stopped after the deepest layer asked for; the hidden state at the word's
  position, in Hugging Face `hidden_states` numbering (the SAEs' own; SAEBench's resid_post).
"""

from __future__ import annotations

import random
from typing import Any, NamedTuple

import numpy as np

from routesae.errors import RouteSAEError

ICL_LINES = 10
"""In-context example lines before the word, as SAEBench."""
MIN_WORD_LETTERS = 2
"""Shortest word kept: a one-letter token is its own answer."""
MIN_WORDS = 52
"""Fewest words the task runs on (two per letter): fewer means the tokenizer has no usable vocabulary."""
TEMPLATE = "{word} has the first letter:"
"""The question; an example line adds ' {LETTER}'."""


class Word(NamedTuple):
    """One single-token word."""

    token_id: int
    """Its token id."""
    text: str
    """The token decoded, leading space kept."""
    letter: str
    """First letter, 'a'..'z'."""


class WordSplit(NamedTuple):
    """The words of the task, split once (seeded)."""

    train: list[Word]
    """80%: the probe and the main latents are fitted on these."""
    test: list[Word]
    """20%: probe F1 and absorption are measured on these."""
    n_vocab_words: int
    """Single-token alphabetic words in the vocabulary before any cap."""


def vocab_words(tokenizer: Any) -> list[Word]:
    """The tokenizer's single-token alphabetic words, by token id."""
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    n = len(tokenizer)
    ids = [i for i in range(n) if i not in special]
    texts = tokenizer.batch_decode([[i] for i in ids])
    words = []
    for i, text in zip(ids, texts):
        bare = text[1:] if text.startswith(" ") else text
        if len(bare) >= MIN_WORD_LETTERS and bare.isascii() and bare.isalpha():
            words.append(Word(i, text, bare[0].lower()))
    return words


def split_words(words: list[Word], seed: int = 0, max_words: int | None = None, test_share: float = 0.2,
                what: str = "the tokenizer") -> WordSplit:
    """Seeded shuffle, an optional cap (a seeded sample of max_words), then train/test 80/20."""
    if len(words) < MIN_WORDS:
        raise RouteSAEError(
            f"{what} has {len(words)} single-token alphabetic words (at least {MIN_WORDS} needed): "
            "no usable vocabulary for the first-letter task"
        )
    order = list(words)
    random.Random(seed).shuffle(order)
    if max_words:
        order = order[:max_words]
    n_test = max(1, round(len(order) * test_share))
    return WordSplit(train=order[n_test:], test=order[:n_test], n_vocab_words=len(words))


class Prompt(NamedTuple):
    """A word's prompt as token ids."""

    ids: list[int]
    """The whole prompt."""
    position: int
    """Index of the word's own token in ids."""


def build_prompts(tokenizer: Any, words: list[Word], examples: list[Word], seed: int = 0,
                  icl_lines: int = ICL_LINES) -> list[Prompt]:
    """One prompt per word: icl_lines example lines of words drawn from `examples` (never the word
    itself), then the word's question. Seeded: the same words give the same prompts."""
    rng = random.Random(seed)
    suffix = tokenizer(TEMPLATE.format(word=""), add_special_tokens=False)["input_ids"]
    prompts = []
    for word in words:
        pool = [w for w in rng.sample(examples, min(len(examples), icl_lines + 1)) if w.token_id != word.token_id]
        lines = [f"{TEMPLATE.format(word=w.text.strip())} {w.letter.upper()}" for w in pool[:icl_lines]]
        prefix = tokenizer("\n".join(lines) + "\n", add_special_tokens=True)["input_ids"]
        prompts.append(Prompt([*prefix, word.token_id, *suffix], len(prefix)))
    return prompts


def word_residuals(model: Any, prompts: list[Prompt], layers: list[int], batch_size: int = 32,
                   pad_id: int = 0, progress: bool = True, desc: str = "words") -> dict[int, np.ndarray]:
    """The hidden states at each prompt's word position: layer -> [n_prompts, d_model] float32."""
    import torch
    from tqdm.auto import tqdm

    from routesae.model.hooks import HiddenStateCapture

    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i].ids))  # similar lengths, less padding
    rows: dict[int, list[np.ndarray]] = {layer: [None] * len(prompts) for layer in layers}  # type: ignore[list-item]
    with HiddenStateCapture(model, sorted(set(layers))) as capture, \
            tqdm(total=len(prompts), unit="word", desc=desc, disable=not progress, dynamic_ncols=True) as bar:
        for start in range(0, len(order), batch_size):
            batch = [prompts[i] for i in order[start:start + batch_size]]
            width = max(len(p.ids) for p in batch)
            ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            for b, p in enumerate(batch):
                ids[b, :len(p.ids)] = torch.tensor(p.ids)
            hidden = capture(ids.to(device))  # [n_layers, batch, seq, d]
            pos = torch.tensor([p.position for p in batch], device=hidden.device)
            picked = hidden[:, torch.arange(len(batch), device=hidden.device), pos].float().cpu().numpy()
            for j, layer in enumerate(capture.layers):
                for b, i in enumerate(order[start:start + batch_size]):
                    rows[layer][i] = picked[j, b]
            bar.update(len(batch))
    return {layer: np.stack(rows[layer]).astype(np.float32) for layer in layers}
