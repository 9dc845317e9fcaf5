"""`routesae contexts` (and the later interpretation commands)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from routesae.atomic_files import write_json, write_text
from routesae.cli_args import parse_count, sae_options, sae_paths
from routesae.interpret.choices import CONTEXTS_DEFAULTS as DEFAULTS
from routesae.interpret.choices import PAPER_THRESHOLD, RULES

if TYPE_CHECKING:  # the stage module loads torch: only when the command runs, never for --help
    from routesae.interpret.contexts import ContextsResult


def counts_table(results: list[ContextsResult], settings: dict[str, Any]) -> str:
    """The interpretable-feature counts of the SAEs side by side, as markdown, under what they count:
    the paper's rule only at its threshold, else the threshold used and the paper's beside it."""
    from routesae.interpret.contexts import rule_label

    label = rule_label(settings)
    above = "?" if label.threshold is None else f"{label.threshold:g}"
    head = (f"Interpretable features by {label.name} ({label.criteria}):" if label.paper
            else f"Features {label.name}: {label.criteria}:")
    lines = [head, "", f"| SAE | latents | interpretable (> {above}) | kept | active (> {above}) | dead |",
             "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r.name} | {r.n_latents} | {r.interpretable} | {r.kept} | {r.active} | {r.dead} |" for r in results]
    return "\n".join(lines)


def threshold_note(results: list[ContextsResult], threshold: float) -> str:
    """Why a count is 0: the paper's threshold is an absolute activation, sized for its models."""
    names = ", ".join(f"{r.name} (largest {r.max_activation:.2f})" for r in results)
    t = PAPER_THRESHOLD
    scaled = ", ".join(sorted({f"{t * math.sqrt(r.d_model / 2048):.1f} at d_model {r.d_model}" for r in results}))
    return (f"Note: no activation of {names} exceeds {threshold:g}, so the rule counts nothing. The paper's {t:g} is "
            "on its models' scale (inputs normalized per token to norm sqrt(d_model), d_model 2048 or 3072); the same "
            f"relative size is {t:g} * sqrt(d_model / 2048): {scaled}. Pass --threshold to count at another.")


@click.command("contexts")
@sae_options
@click.option("--cache", required=True, help="The activation store (its held-out tail is read).")
@click.option("--out", required=True, help="Output folder (one SAE), or the parent of one folder per SAE.")
@click.option("--all-tokens", is_flag=True, help="Read the whole store, not the SAEs' held-out tail.")
@click.option("--tokens", default=None, help="At most this many tokens (whole contexts): 100k, 1M, 20000.")
@click.option("--rule", type=click.Choice(list(RULES)), default="paper", show_default=True,
              help="Interpretable-feature rule: paper (at least 4 contexts) or paper-code (at least 5, as its code).")
@click.option("--top", default=DEFAULTS["top"], show_default=True, type=int, help="Top activations per latent.")
@click.option("--left", default=DEFAULTS["left"], show_default=True, type=int, help="Window tokens before the token.")
@click.option("--right", default=DEFAULTS["right"], show_default=True, type=int, help="Window tokens after it.")
@click.option("--quantiles", default=DEFAULTS["quantiles"], show_default=True, type=int,
              help="Activation quantiles to sample examples from.")
@click.option("--per-quantile", default=DEFAULTS["per_quantile"], show_default=True, type=int,
              help="Examples per quantile.")
@click.option("--samples", default=DEFAULTS["samples"], show_default=True, type=int,
              help="Activating examples per latent held out for scoring.")
@click.option("--negatives", default=DEFAULTS["negatives"], show_default=True, type=int,
              help="Windows per latent where it is zero.")
@click.option("--threshold", default=PAPER_THRESHOLD, show_default=True, type=float,
              help="Activation above which a latent counts as active (the paper's is 15; a count at another is "
                   "labelled with its threshold, not as the paper's rule).")
@click.option("--min-contexts", default=None, type=int, help="Paper rule: contexts needed (default: the rule's).")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the samples and negatives.")
@click.option("--model", default=None, help="Load the tokenizer from here instead of the store's model id.")
@click.option("--device", default="auto", show_default=True, help="auto (CUDA if present), cpu, cuda, cuda:N.")
@click.option("--overwrite", is_flag=True, help="Replace finished contexts of other settings.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def contexts(saes, more_saes, cache, out, all_tokens, tokens, rule, top, left, right, quantiles, per_quantile, samples,
             negatives, threshold, min_contexts, seed, model, device, overwrite, quiet) -> None:
    """Per latent: firing count, activation histogram, top and quantile contexts, held-out and
    zero windows, rebuilt from the store's token ids (no LLM run); and the interpretable-feature count
    per SAE: the RouteSAE paper's rule at its threshold (15), labelled with the threshold at another.

    Example: routesae contexts --sae runs/topk-k64 runs/routesae-k64 --cache store.zarr --out ctx"""
    from routesae.interpret.contexts import ContextsConfig, run_contexts

    paths = sae_paths(saes, more_saes)
    cfg = ContextsConfig(
        saes=paths, cache=cache, out=out, rule=rule, left=left, right=right, top=top, quantiles=quantiles,
        per_quantile=per_quantile, samples=samples, negatives=negatives, all_tokens=all_tokens,
        tokens=parse_count(tokens, "--tokens") if tokens is not None else None, threshold=threshold, min_contexts=min_contexts,
        seed=seed, model=model, device=device, progress=not quiet, overwrite=overwrite,
    )
    results = run_contexts(cfg)
    table = counts_table(results, cfg.settings())
    quiet_rule = [r for r in results if r.active == 0]
    if quiet_rule:
        table += "\n\n" + threshold_note(quiet_rule, threshold)
    click.echo(table)
    for r in results:
        click.echo(f"{r.name}: {'already there' if r.already_done else 'wrote'} {r.out}")
    if len(results) > 1:
        root = Path(out)
        write_text(root / "counts.md", table + "\n")
        write_json(root / "counts.json", [r._asdict() | {"out": str(r.out)} for r in results], indent=1)
