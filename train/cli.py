"""`routesae fit`: train RouteSAE, TopK and baseline SAEs from the activation cache."""

from __future__ import annotations

import click

from routesae.errors import RouteSAEError
from routesae.cli_args import parse_count
from routesae.train.config import AGGREGATES, NORMALIZATIONS, ROUTINGS, FitConfig

def parse_int_list(text: str, what: str, takes: str = "integers such as 32,64 or a range such as 7-22") -> list[int]:
    """'32,64,128' or '7-22' or '7-10,12' -> [ints]; `takes` says in the error what the option takes."""
    out: list[int] = []
    try:
        for part in text.split(","):
            part = part.strip()
            if "-" in part[1:]:
                a, b = part.split("-", 1)
                out.extend(range(int(a), int(b) + 1))
            elif part:
                out.append(int(part))
    except ValueError:
        raise RouteSAEError(f"{what} must be {takes}; got {text!r}") from None
    if not out:
        raise RouteSAEError(f"{what} is empty")
    return out


K_TAKES = "a whole number or a comma-separated list such as 32,64"
"""What --k takes, as its error says (a range parses too, but is no way to choose sparsities)."""


@click.command("fit")
@click.option("--cache", required=True, type=click.Path(), help="Activation store written by `routesae harvest`.")
@click.option("--out", required=True, type=click.Path(), help="Output folder (several SAEs: one subfolder each, ARCH-kK).")
@click.option("--arch", default="routesae", show_default=True,
              help="routesae, mlsae, crosscoder, topk, batchtopk, matryoshka, vanilla, gated, jumprelu, or a list: "
              "topk,routesae.")
@click.option("--k", "k", default=None, help="Active latents per token (the L0 that vanilla, gated and jumprelu are "
              "steered to); a list such as 32,64,128 trains one SAE each on the same batches [default: 64, or --target-l0].")
@click.option("--latents", default=None, help="Dictionary size (default: --expansion x d_model).")
@click.option("--expansion", default=8.0, show_default=True, type=float, help="Dictionary size as a multiple of d_model.")
@click.option("--layer", default=None, help="Layer (hidden_states index) of single-layer SAEs, or a list such as "
              "8,12,16,20 (one SAE each, ARCH-kK-lL, from one read of the store) [default: 3/4 depth].")
@click.option("--routed-layers", default=None, help="RouteSAE's layers, e.g. 7-22 [default: L/4 .. 3L/4].")
@click.option("--routing", type=click.Choice(ROUTINGS), default="hard", show_default=True)
@click.option("--aggregate", type=click.Choice(AGGREGATES), default="sum", show_default=True, help="Router input: sum or mean of the normalized routed layers.")
@click.option("--normalization", type=click.Choice(NORMALIZATIONS), default="token", show_default=True, help="token: per-token zero mean, unit variance (the paper); dataset: sqrt(d_model)/mean norm.")
@click.option("--tokens", default=None, help="Training budget in tokens (e.g. 50M) [default: --epochs passes over the training split].")
@click.option("--epochs", default=None, type=float, help="Training budget in passes over the training split [default: 1].")
@click.option("--batch-size", default="4096", show_default=True, help="Tokens per step.")
@click.option("--lr", default=5e-4, show_default=True, type=float, help="Peak Adam learning rate (5% warm-up, linear decay over the last 20%).")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--device", default="auto", show_default=True, help="auto (CUDA if present), cpu, cuda, cuda:1, ...")
@click.option("--dtype", default="auto", show_default=True, help="Encoder matmul dtype: auto (bf16 where the hardware has it), bfloat16, float32.")
@click.option("--eval-tokens", default="0.05", show_default=True, help="Held-out tail of the store, never trained on: a fraction (<1) or a token count.")
@click.option("--buffer-tokens", default="65536", show_default=True, help="Tokens per shuffle buffer; RAM holds two (x layers x d_model x 2 bytes).")
@click.option("--include-special", is_flag=True, help="Also train on BOS/EOS/pad tokens (left out by default).")
@click.option("--auxk/--no-auxk", default=False, show_default=True, help="AuxK loss on dead latents (k_aux = d_model/2; the paper has none).")
@click.option("--auxk-coef", default=1 / 32, show_default=True, type=float)
@click.option("--target-l0", default=None, type=float, help="The L0 every SAE aims at: k for the TopK-like ones, the "
              "target vanilla, gated and jumprelu are steered to (the same as --k N).")
@click.option("--sparsity-coef", default=None, type=float, help="Sparsity coefficient of vanilla, gated, jumprelu "
              "(NormMSE units), kept fixed [default: the coder's own; vanilla's and gated's steered toward L0 = k].")
@click.option("--matryoshka-prefixes", default=None, help="Matryoshka's nested dictionary sizes below the latent "
              "count, e.g. 288,576,1152,2304 [default: 1/16, 1/8, 1/4, 1/2 of it].")
@click.option("--sparsity-warmup", default=0.05, show_default=True, type=float,
              help="Fraction of the budget over which the sparsity coefficient ramps up from 0.")
@click.option("--dead-tokens", default=None, help="Tokens without firing before a latent counts as dead [default: 10M, or budget/4 if less].")
@click.option("--log-every", default=20, show_default=True, type=int, help="Steps between lines of metrics.jsonl.")
@click.option("--checkpoint-every", default=500, show_default=True, type=int,
              help="Steps between checkpoints (or --checkpoint-minutes, whichever comes first).")
@click.option("--checkpoint-minutes", default=10.0, show_default=True, type=float,
              help="Minutes of training between checkpoints (or --checkpoint-every steps, whichever comes first).")
@click.option("--progress/--no-progress", default=True, show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace a fit of another store or other settings in --out "
              "(the same fit resumes or is kept, as without it).")
def fit(**kw) -> None:
    """Train SAEs from the activation cache (the LLM is never run).

    Rerunning the same command resumes from the last checkpoint in --out."""
    from routesae.train.trainer import fit as run_fit

    if kw["tokens"] is not None and kw["epochs"] is not None:
        raise RouteSAEError("give --tokens or --epochs, not both")
    eval_tokens = float(kw["eval_tokens"]) if _is_fraction(kw["eval_tokens"]) else parse_count(kw["eval_tokens"], "--eval-tokens")
    cfg = FitConfig(
        cache=kw["cache"],
        out=kw["out"],
        archs=[a.strip() for a in kw["arch"].split(",") if a.strip()],
        ks=parse_int_list(kw["k"], "--k", K_TAKES) if kw["k"] is not None else [round(kw["target_l0"] or 64)],
        latents=parse_count(kw["latents"], "--latents") if kw["latents"] is not None else None,
        expansion=kw["expansion"],
        layer=_one_or_list(parse_int_list(kw["layer"], "--layer")) if kw["layer"] is not None else None,
        routed_layers=parse_int_list(kw["routed_layers"], "--routed-layers") if kw["routed_layers"] else None,
        routing=kw["routing"],
        aggregate=kw["aggregate"],
        normalization=kw["normalization"],
        tokens=parse_count(kw["tokens"], "--tokens") if kw["tokens"] is not None else None,
        epochs=kw["epochs"] if kw["epochs"] is not None else 1.0,
        batch_size=parse_count(kw["batch_size"], "--batch-size"),
        lr=kw["lr"],
        seed=kw["seed"],
        device=kw["device"],
        dtype=kw["dtype"],
        eval_tokens=eval_tokens,
        buffer_tokens=parse_count(kw["buffer_tokens"], "--buffer-tokens"),
        include_special=kw["include_special"],
        auxk=kw["auxk"],
        auxk_coef=kw["auxk_coef"],
        target_l0=kw["target_l0"],
        sparsity_coef=kw["sparsity_coef"],
        sparsity_warmup=kw["sparsity_warmup"],
        matryoshka_prefixes=(parse_int_list(kw["matryoshka_prefixes"], "--matryoshka-prefixes",
                                             "whole numbers such as 288,576,1152")
                             if kw["matryoshka_prefixes"] else None),
        dead_tokens=parse_count(kw["dead_tokens"], "--dead-tokens") if kw["dead_tokens"] is not None else None,
        log_every=kw["log_every"],
        checkpoint_every=kw["checkpoint_every"],
        checkpoint_minutes=kw["checkpoint_minutes"],
        progress=kw["progress"],
        overwrite=kw["overwrite"],
    )
    result = run_fit(cfg)
    if not result.main_process:  # another rank of a torchrun: rank 0 reports
        return
    if result.already_done:
        click.echo(f"{cfg.out} already holds this finished fit; nothing to do", err=True)
        return
    for path in result.outputs:
        click.echo(str(path))
    click.echo(
        f"trained {len(result.outputs)} SAE(s) on {result.tokens:,} tokens in {result.steps} steps "
        f"({result.steady_tokens_per_s:,.0f} tokens/s)",
        err=True,
    )


def _one_or_list(values: list[int]) -> int | list[int]:
    """A single value stays an int, so a one-layer fit's settings read as before."""
    return values[0] if len(values) == 1 else values


def _is_fraction(text: str) -> bool:
    try:
        return float(text) < 1
    except ValueError:
        return False
