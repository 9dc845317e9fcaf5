"""`routesae diff`: which latents tell two prompt sets apart (the Goodfire-SAE study of prompt
styles). The model recorded with the SAE runs every prompt live, the SAE encodes each token (BOS and
other special tokens left out) and a prompt's activation of a latent is the mean, max or last of its
tokens'. Then, per set and between the sets: active latents per prompt, exclusive latents, latents
active on every prompt of one set and none of the other, a ranking by frequency difference, and,
for paired sets (line i with line i), per-latent McNemar tests."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from tqdm.auto import tqdm

from routesae.atomic_files import save_figure, write_json, write_text
from routesae.errors import RouteSAEError
from routesae.interpret.builtin_prompts import SETS
from routesae.interpret.choices import REDUCTIONS
from routesae.interpret.codes import sae_input, token_codes

ALPHA = 0.05
"""Significance level of the McNemar counts (uncorrected, and Bonferroni over the latents tested)."""


@dataclass
class DiffConfig:
    """The arguments of `routesae diff`."""

    sae: str
    """SAE folder."""
    a: str
    """First prompt set: a text file (one prompt per line), a .jsonl (a `text` field), or builtin:novice / builtin:expert."""
    b: str
    """Second prompt set, the same kinds."""
    out: str
    """Output folder: diff.md, diff.json, diff.png."""
    reduce: str = "max"
    """How a prompt's activation of a latent comes from its tokens': mean, max or last."""
    top: int = 20
    """Latents listed per ranking."""
    model: str | None = None
    """Load the LLM from here instead of the SAE's recorded model id (same revision)."""
    device: str = "auto"
    """auto, cpu, cuda, cuda:N."""
    dtype: str = "auto"
    """The model's compute dtype: 'auto' (the recorded one where the device multiplies it natively,
    else float32: model/compute_dtype.py) or a dtype name."""
    progress: bool = True
    """Show a progress bar."""


def read_prompts(spec: str) -> list[str]:
    """A prompt set: builtin name, .jsonl with a `text` field, or one prompt per non-empty line."""
    if spec in SETS:
        return list(SETS[spec])
    path = Path(spec)
    if not path.is_file():
        raise RouteSAEError(f"no prompt file {spec} (or use {' / '.join(SETS)})")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        prompts = []
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                raise RouteSAEError(f"{spec}:{i}: not a JSON line") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise RouteSAEError(f"{spec}:{i}: a JSON object with a string 'text' field is expected")
            prompts.append(record["text"])
    else:
        prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise RouteSAEError(f"{spec} holds no prompts")
    return prompts


@torch.no_grad()
def prompt_activations(model: Any, tokenizer: Any, sae: torch.nn.Module, prompts: list[str], reduce: str,
                       progress: bool = False, desc: str = "") -> np.ndarray:
    """[n_prompts, n_latents] each prompt's activation of each latent (0: it never fires)."""
    from routesae.model.special_tokens import SpecialTokens

    special = SpecialTokens.of(tokenizer)
    layers = sorted(set(sae.config.layers))
    device = next(model.parameters()).device
    out = np.zeros((len(prompts), sae.config.n_latents), dtype=np.float32)
    for i, text in enumerate(tqdm(prompts, desc=desc, disable=not progress, dynamic_ncols=True, leave=False)):
        ids = np.asarray([special.bos, *tokenizer(text, add_special_tokens=False)["input_ids"]], dtype=np.int64)
        keep = torch.from_numpy(~special.mask(ids))
        if not bool(keep.any()):
            continue
        hidden = model(torch.from_numpy(ids)[None].to(device), output_hidden_states=True).hidden_states
        acts = {layer: hidden[layer][0][keep.to(device)].float() for layer in layers}
        codes = token_codes(sae, sae_input(sae, acts))
        z = torch.zeros(int(keep.sum()), sae.config.n_latents)
        z[codes.rows.cpu(), codes.latents.cpu()] = codes.values.cpu()
        out[i] = (z.mean(0) if reduce == "mean" else z.amax(0) if reduce == "max" else z[-1]).numpy()
    return out


class SetSummary(NamedTuple):
    """One prompt set's activity."""

    prompts: int
    active_mean: float
    """Active latents per prompt, mean."""
    active_std: float
    """... and its standard deviation over prompts."""
    strength: float
    """Mean activation over the (prompt, latent) pairs that are active."""
    latents_used: int
    """Latents active on at least one prompt."""


def _summary(z: np.ndarray) -> SetSummary:
    active = z > 0
    per_prompt = active.sum(1)
    return SetSummary(len(z), float(per_prompt.mean()), float(per_prompt.std()),
                      float(z[active].mean()) if active.any() else 0.0, int(active.any(0).sum()))


def mcnemar_p(only_a: np.ndarray, only_b: np.ndarray) -> np.ndarray:
    """Exact two-sided McNemar p-values from the discordant pair counts (a binomial test at 1/2):
    twice the smaller tail, from scipy's binomial CDF, which stays finite at any count."""
    from scipy.stats import binom

    x, y = np.asarray(only_a, dtype=np.int64), np.asarray(only_b, dtype=np.int64)
    n = x + y
    tail = binom.cdf(np.minimum(x, y), np.maximum(n, 1), 0.5)
    return np.where(n > 0, np.minimum(1.0, 2 * tail), 1.0)


def compare(za: np.ndarray, zb: np.ndarray, top: int) -> dict[str, Any]:
    """The diff of two sets' [n_prompts, n_latents] activations, as plain JSON-ready data."""
    fa, fb = (za > 0).mean(0), (zb > 0).mean(0)
    latents = np.arange(za.shape[1])

    def entries(ids: np.ndarray) -> list[dict[str, Any]]:
        return [{"latent": int(i), "freq_a": float(fa[i]), "freq_b": float(fb[i]),
                 "mean_a": float(za[:, i].mean()), "mean_b": float(zb[:, i].mean())} for i in ids]

    diff = fa - fb
    # ties in the ranking broken by the stronger mean activation difference, then by index
    order = np.lexsort((latents, -(za.mean(0) - zb.mean(0)), -diff))
    result: dict[str, Any] = {
        "a": _summary(za)._asdict(), "b": _summary(zb)._asdict(),
        "exclusive_a": entries(latents[(fa > 0) & (fb == 0)]), "exclusive_b": entries(latents[(fb > 0) & (fa == 0)]),
        "separating_a": entries(latents[(fa == 1) & (fb == 0)]), "separating_b": entries(latents[(fb == 1) & (fa == 0)]),
        "more_in_a": entries([i for i in order[:top] if diff[i] > 0]),
        "more_in_b": entries([i for i in order[::-1][:top] if diff[i] < 0]),
        "paired": None,
    }
    if len(za) == len(zb):
        aa, bb = za > 0, zb > 0
        only_a, only_b = (aa & ~bb).sum(0), (bb & ~aa).sum(0)
        p = mcnemar_p(only_a, only_b)
        ranked = np.lexsort((latents, -np.abs(only_a - only_b), p))
        tested = only_a + only_b > 0  # a latent with no discordant pair has nothing to test
        n_tested = int(tested.sum())
        result["paired"] = {
            "pairs": len(za), "alpha": ALPHA, "tested": n_tested,
            "significant": int((tested & (p < ALPHA)).sum()),
            "significant_bonferroni": int((tested & (p * max(n_tested, 1) < ALPHA)).sum()),
            "only_a_per_pair": float((aa & ~bb).sum(1).mean()), "only_b_per_pair": float((bb & ~aa).sum(1).mean()),
            "both_per_pair": float((aa & bb).sum(1).mean()),
            "mcnemar": [{"latent": int(i), "only_a": int(only_a[i]), "only_b": int(only_b[i]),
                         "both": int((aa & bb)[:, i].sum()), "p": float(p[i])}
                        for i in ranked[:top] if only_a[i] + only_b[i] > 0],
        }
    return result


def markdown(result: dict[str, Any], cfg: DiffConfig, name: str) -> str:
    lines = [f"# routesae diff: {name}", "",
             f"A = {cfg.a}, B = {cfg.b}; a prompt's activation of a latent is the {cfg.reduce} over its tokens "
             "(special tokens left out); a latent is active on a prompt when that is above 0.", "",
             "| set | prompts | active latents per prompt | std | mean activation when active | latents used |",
             "|---|---:|---:|---:|---:|---:|"]
    for key in ("a", "b"):
        s = result[key]
        lines.append(f"| {key.upper()} | {s['prompts']} | {s['active_mean']:.1f} | {s['active_std']:.1f} | "
                     f"{s['strength']:.3f} | {s['latents_used']} |")
    lines += ["", f"Exclusive latents (active on some prompt of one set, none of the other): A {len(result['exclusive_a'])}, "
              f"B {len(result['exclusive_b'])}.",
              f"Perfectly separating (active on every prompt of one set, none of the other): A {len(result['separating_a'])}, "
              f"B {len(result['separating_b'])}.", ""]

    def table(title: str, rows: list[dict[str, Any]]) -> None:
        nonlocal lines
        lines += [f"## {title}", ""]
        if not rows:
            lines += ["(none)", ""]
            return
        lines += ["| latent | freq A | freq B | mean A | mean B |", "|---:|---:|---:|---:|---:|"]
        lines += [f"| {r['latent']} | {r['freq_a']:.2f} | {r['freq_b']:.2f} | {r['mean_a']:.3f} | {r['mean_b']:.3f} |"
                  for r in rows]
        lines.append("")

    table("Perfectly separating, A", result["separating_a"][: cfg.top])
    table("Perfectly separating, B", result["separating_b"][: cfg.top])
    table("Most more frequent in A", result["more_in_a"])
    table("Most more frequent in B", result["more_in_b"])
    paired = result["paired"]
    if paired:
        lines += ["## Paired (prompt i of A with prompt i of B)", "",
                  f"{paired['pairs']} pairs; per pair, latents active only in A's prompt {paired['only_a_per_pair']:.1f}, "
                  f"only in B's {paired['only_b_per_pair']:.1f}, in both {paired['both_per_pair']:.1f}. "
                  f"Exact McNemar tests per latent: {_significance(paired)}. Smallest p first (not corrected "
                  "for the number of latents):", "",
                  "| latent | only A | only B | both | p |", "|---:|---:|---:|---:|---:|"]
        lines += [f"| {r['latent']} | {r['only_a']} | {r['only_b']} | {r['both']} | {r['p']:.2g} |" for r in paired["mcnemar"]]
    return "\n".join(lines) + "\n"


def _significance(paired: dict[str, Any]) -> str:
    """How many latents a paired diff finds significant, uncorrected and with Bonferroni."""
    alpha = paired.get("alpha", ALPHA)
    return (f"{paired['significant']} of the {paired['tested']} latents with a discordant pair at p < {alpha:g} "
            f"({paired['significant_bonferroni']} with Bonferroni's correction)")


def summary(result: dict[str, Any], out: Path, few: int = 3) -> str:
    """A few lines for the terminal: the sets, how many latents differ significantly, the top few, and
    where the full tables and the figure are."""
    a, b = result["a"], result["b"]

    def latents(rows: list[dict[str, Any]]) -> str:
        shown = [f"{r['latent']} ({r['freq_a']:.2f} vs {r['freq_b']:.2f})" for r in rows[:few]]
        return ", ".join(shown) if shown else "none"

    lines = [f"{result.get('name', result['sae'])}: A = {result['set_a']} ({a['prompts']} prompts), "
             f"B = {result['set_b']} ({b['prompts']} prompts), {result['reduce']} over tokens",
             f"active latents per prompt: A {a['active_mean']:.1f}, B {b['active_mean']:.1f}; exclusive: "
             f"A {len(result['exclusive_a'])}, B {len(result['exclusive_b'])}; perfectly separating: "
             f"A {len(result['separating_a'])}, B {len(result['separating_b'])}"]
    paired = result["paired"]
    if paired:
        smallest = ", ".join(f"{r['latent']} (p {r['p']:.2g}, {r['only_a']} pairs only A, {r['only_b']} only B)"
                             for r in paired["mcnemar"][:few])
        lines += [f"paired, exact McNemar: {_significance(paired)}", f"smallest p: {smallest or 'none'}"]
    else:
        lines.append("not paired (the sets differ in size): no per-latent test, only the ranking by frequency "
                     "difference")
    lines += [f"more often in A (frequency A vs B): {latents(result['more_in_a'])}",
              f"more often in B (frequency A vs B): {latents(result['more_in_b'])}",
              f"tables: {out / 'diff.md'}; data: {out / 'diff.json'}; figure: {out / 'diff.png'}"]
    return "\n".join(lines)


def _integer_bins(counts: np.ndarray, most: int = 30) -> np.ndarray:
    """Histogram edges for integer counts: bins of whole numbers (one count each while that makes at
    most `most` bins, else the same number of counts each), edges half-way between two integers."""
    lo, hi = int(counts.min()), int(counts.max())
    width = max(1, -(-(hi - lo + 1) // most))
    return np.arange(lo, hi + width + 1, width) - 0.5


def figure(za: np.ndarray, zb: np.ndarray, title: str) -> Any:
    """The diff's figure: where each latent sits by its frequency on A and on B, and how many latents a
    prompt uses. Legends sit below the axes, so none covers a corner where separating latents are."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fa, fb = (za > 0).mean(0), (zb > 0).mean(0)
    used = (fa > 0) | (fb > 0)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 5))
    sep = used & (((fa == 1) & (fb == 0)) | ((fb == 1) & (fa == 0)))
    excl = used & ((fa == 0) | (fb == 0)) & ~sep
    rest = used & ~sep & ~excl
    for mask, colour, label in ((rest, "#9aa5b1", "both sets"), (excl, "#e08a2c", "exclusive to one"),
                                (sep, "#c0392b", "perfectly separating")):
        # frequencies of a few prompts fall on a grid: the latents at one point are one marker, larger for more
        # (area as the square root, so a point of hundreds does not cover the panel)
        points, n = np.unique(np.stack([fa[mask], fb[mask]], 1), axis=0, return_counts=True)
        left.scatter(points[:, 0], points[:, 1], s=12 * np.sqrt(n), c=colour, alpha=0.7,
                     label=f"{label} ({int(mask.sum())})")
    left.plot([0, 1], [0, 1], color="#555", lw=0.8, ls="--")
    left.set(xlabel="fraction of A's prompts active", ylabel="fraction of B's prompts active",
             title="latents that fire on either set", xlim=(-0.05, 1.05), ylim=(-0.05, 1.05))
    legend = left.legend(loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=3, fontsize=8, frameon=False,
                         title="a larger marker: more latents at that point", title_fontsize=8)
    for handle in legend.legend_handles:
        handle.set_sizes([12])
    counts_a, counts_b = (za > 0).sum(1), (zb > 0).sum(1)
    bins = _integer_bins(np.concatenate([counts_a, counts_b]))
    right.hist(counts_a, bins=bins, alpha=0.6, label="A", color="#2c7fb8")
    right.hist(counts_b, bins=bins, alpha=0.6, label="B", color="#e08a2c")
    right.set(xlabel="active latents per prompt", ylabel="prompts", title="how many latents a prompt uses")
    right.xaxis.set_major_locator(MaxNLocator(integer=True))  # both axes count: no tick between two integers
    right.yaxis.set_major_locator(MaxNLocator(integer=True))
    right.legend(loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2, fontsize=8, frameon=False)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot(za: np.ndarray, zb: np.ndarray, path: Path, title: str) -> None:
    save_figure(figure(za, zb, title), path, dpi=110)


def run_diff(cfg: DiffConfig) -> tuple[dict[str, Any], Path]:
    """Run both sets, compare them and write diff.md, diff.json and diff.png; -> (result, out folder)."""
    from routesae.model.loading import load_store_model, resolve_device
    from routesae.sae_folders import load_saes

    if cfg.reduce not in REDUCTIONS:
        raise RouteSAEError(f"--reduce {cfg.reduce!r}: use {', '.join(REDUCTIONS)}")
    if cfg.top < 1:
        raise RouteSAEError("--top must be at least 1")
    prompts_a, prompts_b = read_prompts(cfg.a), read_prompts(cfg.b)
    device = resolve_device(cfg.device)
    (loaded,) = load_saes([cfg.sae], device)
    sae = loaded.sae
    if not sae.config.model.get("id") and not cfg.model:
        raise RouteSAEError(f"{cfg.sae} records no model to run the prompts with; pass --model")
    llm = load_store_model(loaded.path, sae.config.model, cfg.model, cfg.device, "run the prompts of", dtype=cfg.dtype)
    sae.to(next(llm.model.parameters()).device)
    za = prompt_activations(llm.model, llm.tokenizer, sae, prompts_a, cfg.reduce, cfg.progress, "A")
    zb = prompt_activations(llm.model, llm.tokenizer, sae, prompts_b, cfg.reduce, cfg.progress, "B")
    result = compare(za, zb, cfg.top)
    result = {"sae": str(Path(cfg.sae).resolve()), "name": loaded.name, "set_a": cfg.a, "set_b": cfg.b,
              "reduce": cfg.reduce, "n_latents": sae.config.n_latents, **result}
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "diff.json", result, indent=1)
    write_text(out / "diff.md", markdown(result, cfg, loaded.name))
    plot(za, zb, out / "diff.png", f"{loaded.name}: A = {cfg.a}, B = {cfg.b} ({cfg.reduce} over tokens)")
    return result, out
