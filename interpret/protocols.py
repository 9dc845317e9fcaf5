"""What the judge is asked and how its answers are read and scored: the RouteSAE paper's protocol
(category, 1-5 consistency score, explanation from the latent's contexts) and delphi's (an
explanation from the training examples, then detection and fuzzing on held-out windows, scored by
balanced accuracy). Pure functions on one latent's record of `latents.jsonl` (formats.md): no
network here, so every prompt and parser is testable on its own."""

from __future__ import annotations

import json
import re
from typing import Any, NamedTuple, Sequence

import numpy as np
from routesae.errors import RouteSAEError

Messages = list[dict[str, str]]
CATEGORIES = ("low-level", "high-level", "undiscernible")
MARK_FRACTION = 0.3
"""delphi's rule: a token is marked when its activation is at least this fraction of its window's largest."""
MARK_OPEN, MARK_CLOSE = "<<", ">>"


class Vocab:
    """Token id -> text, from a contexts folder's `tokens.json`."""

    def __init__(self, texts: Sequence[str]):
        self.texts = list(texts)

    def text(self, token_id: int) -> str:
        if 0 <= token_id < len(self.texts):
            return self.texts[token_id]
        return f"<id {token_id}>"


def _visible(text: str) -> str:
    """One window per line: newlines and tabs inside a window are shown, not obeyed."""
    return text.replace("\r", "\\r").replace("\n", "\\n").replace("\t", "\\t")


def _marked(text: str) -> str:
    # Leading spaces stay outside the marks ("the <<cat>>", not "the<< cat>>"): easier to read.
    core = text.lstrip()
    return text[: len(text) - len(core)] + MARK_OPEN + (core or text) + MARK_CLOSE


def render(token_ids: Sequence[int], vocab: Vocab, marked: set[int] | frozenset[int] = frozenset()) -> str:
    """A window's text on one line, the tokens at positions `marked` as <<token>>."""
    return _visible("".join(_marked(vocab.text(t)) if i in marked else vocab.text(t) for i, t in enumerate(token_ids)))


def strong_positions(example: dict[str, Any]) -> list[int]:
    """Positions of a window whose activation is >= MARK_FRACTION of the window's largest (the
    activating token alone when the example carries no per-token `acts`)."""
    acts = example.get("acts")
    if not acts:
        return [example["mark"]] if example.get("mark") is not None else []
    top = max(acts)
    if top <= 0:
        return []
    return [i for i, a in enumerate(acts) if a > 0 and a >= MARK_FRACTION * top]


def _span(example: dict[str, Any]) -> tuple[int, int]:
    return example["start"], example["start"] + len(example["token_ids"])


def training_examples(rec: dict[str, Any]) -> list[dict[str, Any]]:
    """The examples an explanation is written from: `top`, then `quantiles` (lowest first)."""
    return list(rec.get("top") or []) + [ex for q in (rec.get("quantiles") or []) for ex in q]


def check_disjoint(rec: dict[str, Any]) -> None:
    """formats.md promises held-out windows that the explainer never saw; check it rather than trust
    it. `samples` must not overlap any training window; `negatives` (zero throughout) may share text
    with a training window, but never hold one of its activating tokens."""
    train = training_examples(rec)
    spans = sorted(_span(ex) for ex in train)
    tokens = {ex["token_index"] for ex in train}
    for ex in rec.get("samples") or []:
        a, b = _span(ex)
        if any(x < b and a < z for x, z in spans):
            raise RouteSAEError(f"latent {rec['latent']}: held-out window at store token {a} overlaps a training example; "
                                "the contexts folder breaks formats.md (rebuild it with routesae contexts)")
    for ex in rec.get("negatives") or []:
        a, b = _span(ex)
        if any(a <= t < b for t in tokens) or any(ex.get("acts") or ()):
            raise RouteSAEError(f"latent {rec['latent']}: negative window at store token {a} holds an activation; "
                                "the contexts folder breaks formats.md (rebuild it with routesae contexts)")


# -- the RouteSAE paper's protocol ---------------------------------------------------------------

_PAPER_INTRO = """You study one latent feature of a sparse autoencoder trained on the internal activations of a language model. You are shown contexts where the feature fires. Each line reads
token | activation | context
that is: the token the feature fired on, how strongly it fired, and the text around that token, with the token itself marked <<like this>>."""
_PAPER_CATEGORY = "Category. low-level: the feature responds to one word or token, or to one particular meaning of a word (word-level, possibly polysemous). high-level: it responds to a pattern or concept that spans the context (a topic, a syntactic role, a longer-range structure), not to a fixed token. undiscernible: you see no pattern."
_PAPER_SCORE = "Score, from 1 to 5, for how consistently the contexts follow the pattern: 5 every context fits, no exception; 4 nearly all fit; 3 most fit, with clear exceptions; 2 a weak pattern with many exceptions; 1 no pattern."
_PAPER_EXPLANATION = "Explanation: one short sentence naming the pattern."
_PAPER_TASK = f"""{_PAPER_INTRO}

Judge three things.
1. {_PAPER_CATEGORY}
2. {_PAPER_SCORE}
3. {_PAPER_EXPLANATION}"""

PAPER_SYSTEM = f"""{_PAPER_TASK}

Answer with exactly these three lines and nothing else:
Category: <low-level, high-level or undiscernible>
Score: <a whole number from 1 to 5>
Explanation: <your sentence>"""

PAPER_JSON_SYSTEM = f"""{_PAPER_TASK}

Answer with one JSON object with the fields "category" (low-level, high-level or undiscernible), "score" (a whole number from 1 to 5) and "explanation" (your sentence)."""
"""The paper's question where the server holds its reply to PAPER_SCHEMA (json_schema and logprobs modes)."""

PAPER_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"category": {"type": "string", "enum": list(CATEGORIES)},
                   "score": {"type": "integer", "enum": [1, 2, 3, 4, 5]},
                   "explanation": {"type": "string"}},
    "required": ["category", "score", "explanation"], "additionalProperties": False,
}

# Where the judge can only be made to pick one token among a few (logit_bias, constrained), the
# paper's three answers are three questions: the category and the score as one digit each, the
# explanation as free text (any text is an explanation).
CATEGORY_DIGITS = {"1": "low-level", "2": "high-level", "3": "undiscernible"}
SCORE_DIGITS = ("1", "2", "3", "4", "5")
PAPER_CATEGORY_SYSTEM = f"""{_PAPER_INTRO}

Judge the feature's {_PAPER_CATEGORY[0].lower()}{_PAPER_CATEGORY[1:]}

Answer with one digit: 1 for low-level, 2 for high-level, 3 for undiscernible."""
PAPER_SCORE_SYSTEM = f"""{_PAPER_INTRO}

Judge the feature's {_PAPER_SCORE[0].lower()}{_PAPER_SCORE[1:]}

Answer with one digit from 1 to 5."""
PAPER_EXPLAIN_SYSTEM = f"""{_PAPER_INTRO}

Name the pattern the contexts follow in one short sentence. Answer with the sentence only."""


class PaperAnswer(NamedTuple):
    category: str
    score: int
    explanation: str


def paper_examples(rec: dict[str, Any]) -> tuple[list[dict[str, Any]], str]:
    """The contexts the paper's judge reads: the paper rule's when present and non-empty, else the
    top examples; and which of the two ('paper' or 'top')."""
    if rec.get("paper"):
        return list(rec["paper"]), "paper"
    return list(rec.get("top") or []), "top"


def paper_messages(rec: dict[str, Any], vocab: Vocab, system: str = PAPER_SYSTEM) -> tuple[Messages, str]:
    """The paper's question on one latent (system: PAPER_SYSTEM, or another way of asking it:
    PAPER_JSON_SYSTEM, PAPER_CATEGORY_SYSTEM, ...), and which contexts it shows."""
    examples, source = paper_examples(rec)
    lines = [f"{_visible(vocab.text(ex['token_ids'][ex['mark']]))} | {ex['activation']:.2f} | "
             f"{render(ex['token_ids'], vocab, {ex['mark']})}" for ex in examples]
    user = "token | activation | context\n" + "\n".join(lines)
    return [{"role": "system", "content": system}, {"role": "user", "content": user}], source


_OPEN = r"\s*\**\s*[:=\-]\s*\**\s*[\"'`\[(]?\s*"  # "Score:", "**Score:**", "Score = (", ...
_CATEGORY = re.compile(r"category" + _OPEN + r"(low[\s_-]*level|high[\s_-]*level|un-?discern\w*|indiscern\w*)", re.I)
_SCORE = re.compile(r"score" + _OPEN + r"([1-5])(?!\d|\.\d)", re.I)
_EXPLANATION = re.compile(r"explanation\s*\**\s*[:=\-]\s*\**(.*)", re.I)


def _clean(text: str) -> str:
    return text.strip().strip("*_`\"' ").strip()


def parse_paper(reply: str) -> PaperAnswer | None:
    """Category, score and explanation from a reply, tolerant of case, bold marks, '4/5'; None when
    the category or the score is missing (a template echoed back does not parse)."""
    if not reply:
        return None
    cat, score = _CATEGORY.search(reply), _SCORE.search(reply)
    if not cat or not score:
        return None
    word = cat.group(1).lower()
    category = "low-level" if word.startswith("low") else "high-level" if word.startswith("high") else "undiscernible"
    explanation = ""
    lines = reply.splitlines()
    for i, line in enumerate(lines):
        m = _EXPLANATION.search(line)
        if m:
            explanation = _clean(m.group(1)) or next((_clean(x) for x in lines[i + 1:] if _clean(x)), "")
            break
    return PaperAnswer(category, int(score.group(1)), explanation)


def _json_object(reply: str) -> dict[str, Any] | None:
    """The reply as a JSON object, also when a server wrapped it in a ```json fence; None otherwise."""
    text = (reply or "").strip()
    if text.startswith("```"):
        text = text.strip("`").removeprefix("json").strip()
    try:
        data = json.loads(text)
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def parse_paper_json(reply: str) -> PaperAnswer | None:
    """A reply to PAPER_SCHEMA; a reply that is not such JSON (a server that did not hold to the
    schema) is read as free text by parse_paper."""
    data = _json_object(reply)
    if data is None:
        return parse_paper(reply)
    category, score, explanation = data.get("category"), data.get("score"), data.get("explanation")
    if category not in CATEGORIES or isinstance(score, bool) or score not in (1, 2, 3, 4, 5):
        return None
    return PaperAnswer(category, int(score), _clean(explanation) if isinstance(explanation, str) else "")


class Choice(NamedTuple):
    """A reply to a question answered by one token among `choices`."""

    answer: str | None
    """The choice the reply holds; None when it holds none of them."""
    probs: dict[str, float] | None
    """Each choice's probability as the judge's log-probabilities give it (a choice absent from the
    candidates it returned counts 0); None when the reply carries none."""


def _choice_of(text: str, choices: Sequence[str]) -> str | None:
    word = text.strip().strip("\"'`*.").lower()
    return next((c for c in choices if c.lower() == word), None)


def parse_choice(reply: str, choices: Sequence[str]) -> Choice:
    """A one-token answer: plain text (logit_bias), or the JSON that the judge module makes of a reply
    with log-probabilities, {"content": ..., "top_logprobs": [[token, logprob], ...]} (logprobs and
    constrained modes), where each choice's probability sums its candidates ("1" and " 1")."""
    data = _json_object(reply) if (reply or "").lstrip().startswith("{") else None
    if data is None or not isinstance(data.get("top_logprobs"), list):
        return Choice(_choice_of(reply or "", choices), None)
    content = data.get("content") if isinstance(data.get("content"), str) else ""
    probs = {c: 0.0 for c in choices}
    for item in data["top_logprobs"]:
        if isinstance(item, (list, tuple)) and len(item) == 2 and isinstance(item[0], str):
            c = _choice_of(item[0], choices)
            if c is not None and item[0].strip():
                probs[c] += float(np.exp(float(item[1])))
    return Choice(_choice_of(content, choices), probs if any(v > 0 for v in probs.values()) else None)


def paper_from_choices(category: str, score: str, explanation: str) -> PaperAnswer | None:
    """The paper's answer from its three one-token questions' replies; None when the category or
    the score holds no choice."""
    cat, sc = parse_choice(category, tuple(CATEGORY_DIGITS)), parse_choice(score, SCORE_DIGITS)
    if cat.answer is None or sc.answer is None:
        return None
    return PaperAnswer(CATEGORY_DIGITS[cat.answer], int(sc.answer), parse_explanation(explanation) or "")


def summarize_paper(entries: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean score overall and per low- and high-level latents, counts per category, parse failures."""
    parsed = [e for e in entries if not e.get("parse_failure")]

    def mean(values: list[int]) -> float | None:
        return float(np.mean(values)) if values else None

    return {
        "mean_score": mean([e["score"] for e in parsed]),
        "mean_score_low_level": mean([e["score"] for e in parsed if e["category"] == "low-level"]),
        "mean_score_high_level": mean([e["score"] for e in parsed if e["category"] == "high-level"]),
        "counts": {c: sum(e["category"] == c for e in parsed) for c in CATEGORIES},
        "parse_failures": len(entries) - len(parsed),
        "latents": len(entries),
    }


# -- delphi: explanation -----------------------------------------------------------------------

EXPLAIN_SYSTEM = """You explain one latent feature of a sparse autoencoder trained on the internal activations of a language model. Below are text examples where the feature fires. In each example the tokens where it fires strongly are marked <<like this>>, and the line after the example lists those tokens with how strongly it fired on each, from 0 to 10 (10 is its strongest activation over all examples).

Find what the marked tokens have in common: the token itself, its meaning, or the context around it. Be concise. The last line of your answer must be your explanation, starting with "Explanation:", in a few words or one short sentence."""


def explanation_messages(rec: dict[str, Any], vocab: Vocab) -> Messages:
    examples = training_examples(rec)
    scale = max((max(ex.get("acts") or [ex["activation"]]) for ex in examples), default=0.0) or 1.0
    blocks = []
    for i, ex in enumerate(examples, 1):
        marks = strong_positions(ex)
        acts = ex.get("acts") or {ex["mark"]: ex["activation"]}
        listed = ", ".join(f'("{_visible(vocab.text(ex["token_ids"][p]))}", {round(10 * acts[p] / scale)})' for p in marks)
        blocks.append(f"Example {i}: {render(ex['token_ids'], vocab, set(marks))}\nActivations: {listed}")
    return [{"role": "system", "content": EXPLAIN_SYSTEM}, {"role": "user", "content": "\n\n".join(blocks)}]


_EXPLANATION_LINE = re.compile(r"^\W*explanation\W*?[:=\-]\s*(.*)$", re.I)


def parse_explanation(reply: str) -> str | None:
    """The explanation: the last line that starts with 'Explanation:', else the last non-empty
    line (delphi's convention); None for an empty reply."""
    lines = [line for line in (reply or "").splitlines() if _clean(line)]
    if not lines:
        return None
    tagged = [m.group(1) for m in map(_EXPLANATION_LINE.match, lines) if m and _clean(m.group(1))]
    text = _clean(tagged[-1] if tagged else lines[-1])
    return text or None


# -- delphi: detection and fuzzing on held-out windows --------------------------------------------

DETECTION_SYSTEM = """A latent feature of a language model has been explained in a few words. You will see numbered text windows. For each window, decide from the explanation alone whether the feature fires anywhere in it: 1 if it does, 0 if it does not.

Answer with one list in square brackets, one entry per window in order, each entry 1 or 0: for five windows [x, x, x, x, x] with each x replaced by 1 or 0. Nothing else."""

FUZZING_SYSTEM = """A latent feature of a language model has been explained in a few words. You will see numbered text windows in which some tokens are marked <<like this>>. For each window, decide from the explanation whether the marked tokens are ones where the feature fires: 1 if the marks are correct, 0 if they are not.

Answer with one list in square brackets, one entry per window in order, each entry 1 or 0: for five windows [x, x, x, x, x] with each x replaced by 1 or 0. Nothing else."""

HELD_OUT = {"detection": DETECTION_SYSTEM, "fuzzing": FUZZING_SYSTEM}

_JSON_ANSWER = 'Answer with one JSON object {"answers": [...]}: one entry per window in order, each entry 1 or 0. Nothing else.'
HELD_OUT_JSON = {p: s.split("\n\nAnswer with one list")[0] + "\n\n" + _JSON_ANSWER for p, s in HELD_OUT.items()}
"""The same questions where the server holds its reply to held_out_schema(n) (json_schema mode)."""

DETECTION_ONE_SYSTEM = """A latent feature of a language model has been explained in a few words. You will see one text window. Decide from the explanation alone whether the feature fires anywhere in it.

Answer with one digit: 1 if it does, 0 if it does not."""

FUZZING_ONE_SYSTEM = """A latent feature of a language model has been explained in a few words. You will see one text window in which some tokens are marked <<like this>>. Decide from the explanation whether the marked tokens are ones where the feature fires.

Answer with one digit: 1 if the marks are correct, 0 if they are not."""

HELD_OUT_ONE = {"detection": DETECTION_ONE_SYSTEM, "fuzzing": FUZZING_ONE_SYSTEM}
"""One window a request, answered by one token (logprobs, logit_bias and constrained modes)."""
VERDICT_CHOICES = ("1", "0")
STYLES = ("list", "json", "one")
"""How held-out windows are asked: batched with a free-text list, batched with a JSON schema, one a request."""


def held_out_schema(n: int) -> dict[str, Any]:
    """The JSON schema of a reply to n windows: {"answers": [n entries, each 0 or 1]}."""
    return {"type": "object", "properties": {"answers": {"type": "array", "items": {"type": "integer", "enum": [0, 1]},
                                                        "minItems": n, "maxItems": n}},
            "required": ["answers"], "additionalProperties": False}


class Window(NamedTuple):
    """One held-out window as the judge sees it, and the truth."""

    text: str
    activating: int
    """1: from the latent's samples; 0: a negative."""


class HeldOutBatch(NamedTuple):
    messages: Messages
    truth: list[int]


def held_out_windows(rec: dict[str, Any], vocab: Vocab, protocol: str, rng: np.random.Generator,
                     balance: bool = True) -> list[Window]:
    """The latent's `samples` (activating) and `negatives` (zero throughout), shuffled. Detection
    shows them plain; fuzzing marks the strong tokens of activating windows and as many random
    tokens of each negative. balance: use no more negatives than activating windows."""
    positives = list(rec.get("samples") or [])
    negatives = list(rec.get("negatives") or [])
    if balance:
        negatives = [negatives[i] for i in sorted(rng.permutation(len(negatives))[: len(positives)])]
    windows = []
    counts = []
    for ex in positives:
        marks = strong_positions(ex) if protocol == "fuzzing" else []
        counts.append(max(1, len(marks)))
        windows.append(Window(render(ex["token_ids"], vocab, set(marks)), 1))
    for i, ex in enumerate(negatives):
        marks: set[int] = set()
        if protocol == "fuzzing":
            n = min(len(ex["token_ids"]), counts[i % len(counts)] if counts else 1)
            marks = {int(p) for p in rng.choice(len(ex["token_ids"]), size=n, replace=False)}
        windows.append(Window(render(ex["token_ids"], vocab, marks), 0))
    return [windows[i] for i in rng.permutation(len(windows))]


def held_out_batches(windows: list[Window], explanation: str, protocol: str, batch: int,
                     style: str = "list") -> list[HeldOutBatch]:
    """The windows `batch` to a request, each request answered with a list of 0s and 1s (style
    'list'), or with {"answers": [...]} (style 'json'); style 'one': one window a request, answered
    by one digit."""
    out = []
    if style == "one":
        for w in windows:
            user = f"Explanation: {_visible(explanation)}\n\nWindow: {w.text}\n\nAnswer 1 or 0."
            out.append(HeldOutBatch([{"role": "system", "content": HELD_OUT_ONE[protocol]},
                                     {"role": "user", "content": user}], [w.activating]))
        return out
    system = (HELD_OUT_JSON if style == "json" else HELD_OUT)[protocol]
    for a in range(0, len(windows), batch):
        chunk = windows[a:a + batch]
        body = "\n".join(f"Window {i}: {w.text}" for i, w in enumerate(chunk, 1))
        user = (f"Explanation: {_visible(explanation)}\n\n{body}\n\n"
                f"Answer with a list of {len(chunk)} values (0 or 1), one per window.")
        out.append(HeldOutBatch([{"role": "system", "content": system}, {"role": "user", "content": user}],
                                [w.activating for w in chunk]))
    return out


_LIST = re.compile(r"\[([^\[\]]*)\]")
_YES = {"1", "yes", "true", "y"}
_NO = {"0", "no", "false", "n"}


def _verdict(item: str) -> int | None:
    word = item.strip().strip("\"'`*.").lower()
    return 1 if word in _YES else 0 if word in _NO else None


def parse_verdicts(reply: str, n: int) -> list[int | None]:
    """The judge's n verdicts from its last [..] list; None for each one that does not parse (all of
    them when the list is missing or of another length). A bare 0/1/yes/no answers a batch of one."""
    lists = _LIST.findall(reply or "")
    if not lists:
        single = _verdict(reply or "")
        return [single] if n == 1 and single is not None else [None] * n
    items = [x for x in re.split(r"[,;\s]+", lists[-1].strip()) if x]
    if len(items) != n:
        return [None] * n
    return [_verdict(x) for x in items]


def parse_verdicts_json(reply: str, n: int) -> list[int | None]:
    """A reply to held_out_schema(n); one that is not such JSON is read as free text by parse_verdicts."""
    data = _json_object(reply)
    if data is None:
        return parse_verdicts(reply, n)
    answers = data.get("answers")
    if not isinstance(answers, list) or len(answers) != n:
        return [None] * n
    return [a if a in (0, 1) and not isinstance(a, bool) else None for a in answers]


def verdict_of_choice(reply: str) -> tuple[int | None, float | None]:
    """A one-window reply (style 'one'): the verdict, and P(1) / (P(1) + P(0)) when the reply carries
    log-probabilities (delphi's score). With probabilities the verdict is P(1) > 0.5 (what decides
    the thresholded accuracy), else the digit replied."""
    choice = parse_choice(reply, VERDICT_CHOICES)
    if choice.probs is not None:
        p = choice.probs["1"] / (choice.probs["1"] + choice.probs["0"])
        return int(p > 0.5), p
    return (None if choice.answer is None else int(choice.answer)), None


def auroc(truth: Sequence[int], scores: Sequence[float | None]) -> float | None:
    """The area under the ROC curve of the scores that exist (sklearn's roc_auc_score); None unless
    both classes are among them."""
    pairs = [(t, s) for t, s in zip(truth, scores) if s is not None]
    if len({t for t, _ in pairs}) < 2:
        return None
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score([t for t, _ in pairs], [s for _, s in pairs]))


def binary_scores(truth: Sequence[int], predicted: Sequence[int | None],
                  probs: Sequence[float | None] | None = None) -> dict[str, Any]:
    """Balanced accuracy (TP/P + TN/N)/2, precision, recall, F1 over the windows that parsed.
    Undefined figures (no positive or no negative window left, no positive prediction) are None.
    With probs (the judge's P(1) per window, None where it gave none): also `auroc`."""
    pairs = [(t, p) for t, p in zip(truth, predicted) if p is not None]
    tp = sum(t == 1 and p == 1 for t, p in pairs)
    fp = sum(t == 0 and p == 1 for t, p in pairs)
    tn = sum(t == 0 and p == 0 for t, p in pairs)
    fn = sum(t == 1 and p == 0 for t, p in pairs)
    pos, neg = tp + fn, tn + fp
    recall = tp / pos if pos else None
    precision = tp / (tp + fp) if tp + fp else None
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else None
    balanced = (tp / pos + tn / neg) / 2 if pos and neg else None
    out = {"balanced_accuracy": balanced, "precision": precision, "recall": recall, "f1": f1, "n": len(pairs),
           "parse_failures": len(predicted) - len(pairs)}
    if probs is not None:
        out["auroc"] = auroc(truth, probs)
    return out


def summarize_binary(entries: list[dict[str, Any] | None]) -> dict[str, Any]:
    """Means over latents of each figure (latents where it is undefined left out), parse failures
    summed; `auroc` too where the latents have one (the judge's log-probabilities were read)."""
    scored = [e for e in entries if e is not None]
    out: dict[str, Any] = {}
    keys = ["balanced_accuracy", "precision", "recall", "f1"] + (["auroc"] if any("auroc" in e for e in scored) else [])
    for key in keys:
        values = [e[key] for e in scored if e.get(key) is not None]
        out[key] = float(np.mean(values)) if values else None
    out["parse_failures"] = sum(e["parse_failures"] for e in scored)
    out["latents"] = len(scored)
    return out
