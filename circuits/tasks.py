"""The circuit task generators: clean/patch prompt pairs for subject-verb agreement, IOI, Python
list indexing and dictionary key lookup, built from the templates of `task_words` and kept only
when the model's tokenizer gives the two prompts the same length and each answer one token.

Tokenization: prompts are plain text (no chat template); the model sees its BOS, then the prompt's
tokens (`add_special_tokens=False`), as routesae runs prompts elsewhere. An answer is one token iff
tokenizing `prefix + answer` gives the tokens of `prefix` plus exactly one more."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
from routesae.circuits import task_words as w
from routesae.errors import RouteSAEError


class Candidate(NamedTuple):
    """One generated pair before the tokenizer checks it."""

    clean_prefix: str
    patch_prefix: str
    clean_answer: str
    patch_answer: str
    variant: str
    """Which template family made it (e.g. SVA "pp"), kept in the record for per-variant analysis."""


class TaskData(NamedTuple):
    """A task's kept records and what was dropped."""

    records: list[dict[str, Any]]
    dropped: int
    """Candidates that failed the length or single-token checks."""
    duplicates: int
    """Candidates identical to one already kept (skipped, not counted as dropped)."""


@dataclass
class TaskConfig:
    """What to generate."""

    task: str
    """sva, ioi, list-index or dict-key."""
    n: int = 512
    """Pairs to keep."""
    seed: int = 0
    """Seeds the generator and the train/eval split."""
    eval_fraction: float = 0.2
    """Share of the pairs in the eval split."""
    max_tries_per_pair: int = 50
    """Give up after n times this many candidates (a tokenizer the lists do not fit)."""


def _pick(rng: np.random.Generator, seq):
    return seq[int(rng.integers(len(seq)))]


def sva(rng: np.random.Generator, tokenizer: Any) -> Candidate:
    """Subject-verb agreement: the patch flips the subject's number, so the verb's number flips."""
    variant, template = _pick(rng, w.SVA_TEMPLATES)
    sing, plur = _pick(rng, w.NOUNS)
    other = _pick(rng, w.NOUNS)[int(rng.integers(2))]
    attr = _pick(rng, w.ATTRACTORS)[int(rng.integers(2))]  # attractor of either number: both kinds of test
    fields = {"prep": _pick(rng, w.PREPOSITIONS), "attr": attr, "other": other, "rcverb": _pick(rng, w.RC_VERBS)}
    verb_sing, verb_plur = _pick(rng, w.RC_AGREE_VERBS if variant == "within_rc" else w.VERBS)
    plural_clean = bool(rng.integers(2))
    a = template.format(subj=plur if plural_clean else sing, **fields)
    b = template.format(subj=sing if plural_clean else plur, **fields)
    ans_a, ans_b = (verb_plur, verb_sing) if plural_clean else (verb_sing, verb_plur)
    return Candidate(a, b, " " + ans_a, " " + ans_b, variant)


def ioi(rng: np.random.Generator, tokenizer: Any) -> Candidate:
    """Indirect object identification. The patch repeats the other name as the subject (S2 swap):
    "Then, A and B ... A gave a book to" -> " B" becomes "... B gave a book to" -> " A"."""
    template = _pick(rng, w.IOI_TEMPLATES)
    i, j = rng.choice(len(w.NAMES), size=2, replace=False)
    a, b = w.NAMES[int(i)], w.NAMES[int(j)]
    fields = {"a": a, "b": b, "place": _pick(rng, w.PLACES), "obj": _pick(rng, w.OBJECTS)}
    return Candidate(template.format(s=a, **fields), template.format(s=b, **fields), " " + b, " " + a, "s2-swap")


def _values(rng: np.random.Generator, k: int) -> list[int]:
    """k two-digit numbers with distinct first digits, so any two positions answer differently."""
    firsts = rng.choice(np.arange(1, 10), size=k, replace=False)
    return [int(f) * 10 + int(rng.integers(10)) for f in firsts]


def list_index(rng: np.random.Generator, tokenizer: Any) -> Candidate:
    """Python list indexing. Half the pairs change the index (variant "index": another position,
    whose value has another first digit); half change the list (variant "value": the same index,
    0 or -1, the ends a small model reads best, and the patch replaces that value by one with a
    first digit not in the list)."""
    template = _pick(rng, w.LIST_TEMPLATES)
    k = int(rng.integers(3, 7))
    vals = _values(rng, k + 1)  # one spare value, with a first digit the list lacks, for the "value" patch
    spare, vals = vals[k], vals[:k]
    var = _pick(rng, w.VARIABLES)
    items = ", ".join(str(v) for v in vals)
    if rng.integers(2):
        i, j = (int(v) for v in rng.choice(k, size=2, replace=False))
        return Candidate(template.format(var=var, items=items, idx=i), template.format(var=var, items=items, idx=j),
                         str(vals[i])[0], str(vals[j])[0], "index")
    i = 0 if rng.integers(2) else -1
    patched = list(vals)
    patched[i] = spare
    return Candidate(template.format(var=var, items=items, idx=i),
                     template.format(var=var, items=", ".join(str(v) for v in patched), idx=i),
                     str(vals[i])[0], str(spare)[0], "value")


def _error_token(tokenizer: Any, prefix: str) -> str:
    """The first token of the interpreter's error reply after `prefix` ("Traceback" is two tokens
    in SmolLM2's vocabulary, "Trace" + "back"), so the answer stays a single token."""
    base = len(tokenizer(prefix, add_special_tokens=False)["input_ids"])
    ids = tokenizer(prefix + w.ERROR_REPLY, add_special_tokens=False)["input_ids"]
    return tokenizer.decode(ids[base:base + 1])


def dict_key(rng: np.random.Generator, tokenizer: Any) -> Candidate:
    """Dictionary lookup: the clean prompt reads an existing key (answer: its value's first digit),
    the patch a missing key of the same token length (answer: the first token of "Traceback")."""
    template = _pick(rng, w.DICT_TEMPLATES)
    k = int(rng.integers(2, 5))
    keys = [w.KEYS[int(i)] for i in rng.choice(len(w.KEYS), size=k + 1, replace=False)]
    present, missing = keys[:k], keys[k]
    vals = _values(rng, k)
    var = _pick(rng, w.VARIABLES)
    items = ", ".join(f"'{key}': {v}" for key, v in zip(present, vals))
    i = int(rng.integers(k))
    clean = template.format(var=var, items=items, key=present[i])
    patch = template.format(var=var, items=items, key=missing)
    return Candidate(clean, patch, str(vals[i])[0], _error_token(tokenizer, patch),
                     "print" if "print" in template else "repl")


GENERATORS: dict[str, Callable[[np.random.Generator, Any], Candidate]] = {
    "sva": sva, "ioi": ioi, "list-index": list_index, "dict-key": dict_key,
}


class Checked(NamedTuple):
    """A candidate's token facts, or why it fails."""

    ok: bool
    n_tokens: int
    clean_answer_id: int
    patch_answer_id: int


def answer_id(tokenizer: Any, prefix: str, answer: str) -> int | None:
    """The answer's token id after `prefix`, or None when it is not exactly one token there (or the
    prefix's own tokens change when the answer is appended)."""
    base = tokenizer(prefix, add_special_tokens=False)["input_ids"]
    full = tokenizer(prefix + answer, add_special_tokens=False)["input_ids"]
    if len(full) != len(base) + 1 or list(full[:len(base)]) != list(base):
        return None
    return int(full[-1])


def check(tokenizer: Any, c: Candidate) -> Checked:
    """Equal prompt lengths, single-token answers, and answers that differ."""
    n_clean = len(tokenizer(c.clean_prefix, add_special_tokens=False)["input_ids"])
    n_patch = len(tokenizer(c.patch_prefix, add_special_tokens=False)["input_ids"])
    ca, pa = answer_id(tokenizer, c.clean_prefix, c.clean_answer), answer_id(tokenizer, c.patch_prefix, c.patch_answer)
    # Both answers must be single tokens after *both* prompts: the metric reads both logits at both.
    cross = (answer_id(tokenizer, c.patch_prefix, c.clean_answer), answer_id(tokenizer, c.clean_prefix, c.patch_answer))
    ok = (n_clean == n_patch and ca is not None and pa is not None and ca != pa
          and cross == (ca, pa) and c.clean_prefix != c.patch_prefix)
    return Checked(ok, n_clean, ca if ca is not None else -1, pa if pa is not None else -1)


def generate(cfg: TaskConfig, tokenizer: Any, tick: Callable[[], None] | None = None) -> TaskData:
    """Draw candidates until cfg.n pass the checks; split them train/eval by cfg.seed. tick: called
    per pair kept (a progress bar's update)."""
    if cfg.task not in GENERATORS:
        raise RouteSAEError(f"unknown task {cfg.task!r}: choose from {', '.join(GENERATORS)}")
    if cfg.n < 1:
        raise RouteSAEError(f"--n must be at least 1, got {cfg.n}")
    if not 0 <= cfg.eval_fraction < 1:
        raise RouteSAEError(f"the eval fraction must be in [0, 1), got {cfg.eval_fraction}")
    gen = GENERATORS[cfg.task]
    rng = np.random.default_rng(cfg.seed)
    records: list[dict[str, Any]] = []
    seen: set[tuple[str, str]] = set()
    dropped = duplicates = 0
    for _ in range(cfg.n * cfg.max_tries_per_pair):
        if len(records) == cfg.n:
            break
        c = gen(rng, tokenizer)
        if (c.clean_prefix, c.patch_prefix) in seen:
            duplicates += 1
            continue
        seen.add((c.clean_prefix, c.patch_prefix))
        chk = check(tokenizer, c)
        if not chk.ok:
            dropped += 1
            continue
        records.append({"clean_prefix": c.clean_prefix, "patch_prefix": c.patch_prefix,
                        "clean_answer": c.clean_answer, "patch_answer": c.patch_answer,
                        "task": cfg.task, "variant": c.variant, "n_tokens": chk.n_tokens,
                        "clean_answer_id": chk.clean_answer_id, "patch_answer_id": chk.patch_answer_id,
                        "prepend_bos": True})
        if tick is not None:
            tick()
    if len(records) < cfg.n:
        raise RouteSAEError(f"only {len(records)} of {cfg.n} {cfg.task} pairs pass the tokenizer checks "
                            f"({dropped} dropped, {duplicates} duplicates): ask for fewer with --n")
    # The split: a seeded shuffle, the first eval_fraction of it is eval; ids keep generation order.
    order = np.random.default_rng(cfg.seed).permutation(len(records))
    n_eval = round(cfg.eval_fraction * len(records))
    eval_ids = {int(i) for i in order[:n_eval]}
    for i, r in enumerate(records):
        r["id"] = i
        r["split"] = "eval" if i in eval_ids else "train"
    return TaskData(records, dropped, duplicates)
