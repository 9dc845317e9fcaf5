"""`routesae synth` (write a synthetic store from a known dictionary) and `routesae synth-score`
(score SAEs fitted on it against the truth). Heavy imports stay inside the commands, so `--help`
loads neither torch nor zarr nor scipy."""

from __future__ import annotations

import click

from routesae.cli_args import parse_count, sae_options, sae_paths

PLACEMENT_CHOICES = ("one-layer", "spanning", "mixed")
"""quality/synth_data.py's PLACEMENTS (a test keeps the two equal)."""


@click.command("synth")
@click.option("--out", required=True, help="The store to write (a folder, absent or empty).")
@click.option("--tokens", default="20k", show_default=True, help="Tokens (whole contexts): 20k, 1M, 65536.")
@click.option("--d-model", default=32, show_default=True, type=int, help="Width of the activations.")
@click.option("--features", default=None, type=int, help="True features. Default: 4 x d-model.")
@click.option("--layers", "n_layers", default=1, show_default=True, type=int, help="Stored layers.")
@click.option("--placement", type=click.Choice(PLACEMENT_CHOICES), default="one-layer", show_default=True,
              help="one-layer: each feature in one layer, each token's features in one layer (RouteSAE's premise); "
                   "spanning: features over several consecutive layers (the crosscoder's); mixed: half each.")
@click.option("--context-len", default=64, show_default=True, type=int, help="Tokens per context (the first a BOS).")
@click.option("--noise", default=0.05, show_default=True, type=float, help="Std of the Gaussian noise on every value.")
@click.option("--max-freq", default=0.4, show_default=True, type=float, help="Firing probability of the most frequent feature.")
@click.option("--min-freq", default=0.01, show_default=True, type=float, help="Firing probability of the least frequent one.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seeds the dictionary, its structure and every token.")
@click.option("--overwrite", is_flag=True, help="Replace a routesae store at --out.")
def synth(out, tokens, d_model, features, n_layers, placement, context_len, noise, max_freq, min_freq, seed, overwrite) -> None:
    """Write an activation store made from a known sparse dictionary (unit features, Zipf
    frequencies, correlated and hierarchical firing, noise), with the truth in STORE/synth/.
    fit, eval and info read it as any store; synth-score scores SAEs against the truth.

    Example: routesae synth --out synth.zarr --layers 4 --placement one-layer --tokens 200k"""
    from routesae.quality.synth_data import SynthConfig, make_synthetic_store

    cfg = SynthConfig(d_model=d_model, n_features=features if features is not None else 4 * d_model,
                      n_layers=n_layers, placement=placement, tokens=parse_count(tokens, "--tokens"),
                      context_len=context_len, noise=noise, max_freq=max_freq, min_freq=min_freq, seed=seed)
    r = make_synthetic_store(cfg, out, overwrite)
    shares = ", ".join(f"{x:.1%}" for x in r.shares)
    click.echo(f"wrote {r.path}: {r.n_tokens:,} tokens, layers {r.layers}, {cfg.n_features} features in d_model "
               f"{cfg.d_model} ({placement}), true L0 {r.true_l0:.2f}; tokens per source layer {shares}")


@click.command("synth-score")
@sae_options
@click.option("--cache", required=True, help="A synthetic store (routesae synth) the SAEs were fitted on.")
@click.option("--threshold", default=0.9, show_default=True, type=float, help="|cos| at which a true feature counts as recovered.")
@click.option("--all-tokens", is_flag=True, help="Score reconstruction on the whole store, not the SAEs' held-out tail.")
@click.option("--tokens", default="64k", show_default=True, help="At most this many tokens (whole contexts).")
@click.option("--device", default="cpu", show_default=True, help="auto (CUDA if present), cpu, cuda, cuda:N.")
@click.option("--out", default=None, help="Folder for synth_score.json and synth_score.md.")
def synth_score(saes, more_saes, cache, threshold, all_tokens, tokens, device, out) -> None:
    """Score SAEs against a synthetic store's true features: MCC (best one-to-one matching of
    decoder rows with true features), the share recovered above a cosine threshold, explained
    variance, shrinkage, L0 against the true L0, and for RouteSAE the share of tokens routed to
    the layer their features live in.

    Example: routesae synth-score runs/synth --cache synth.zarr --out scores"""
    paths = sae_paths(saes, more_saes)
    from routesae.quality.synth_score import ScoreConfig, run_synth_score

    report = run_synth_score(ScoreConfig(saes=paths, cache=cache, threshold=threshold, all_tokens=all_tokens,
                                         tokens=parse_count(tokens, "--tokens"), device=device))
    for s in report.scores:
        click.echo(s.line(report.threshold))
    if out:
        written = report.write(out)
        click.echo("wrote " + ", ".join(str(p) for p in written))
