"""`routesae interpret`: an LLM judge scores a sample of latents from a contexts folder."""

from __future__ import annotations

import click
from routesae.errors import RouteSAEError
from routesae.interpret.choices import PROTOCOLS

JUDGE_MODES = ("auto", "json_schema", "logprobs", "logit_bias", "constrained", "free")
"""--judge-mode's values: judge.JUDGE_MODES, spelled here so that --help loads no stage module (a test keeps them equal)."""


def _latents(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise RouteSAEError(f"--latents must be comma-separated latent indices such as 3,17,42; got {text!r}") from None


@click.command("interpret")
@click.option("--contexts", required=True, help="A contexts folder of one SAE (from routesae contexts).")
@click.option("--judge-url", default=None,
              help="Base URL of an OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1. The API key comes from "
                   "OPENAI_API_KEY (a dummy one when unset; local servers ignore it).")
@click.option("--judge-model", required=True,
              help="Model name as the server knows it, or local:PATH to run a transformers chat model in-process "
                   "(a folder, a .gguf file or smollm2; no --judge-url).")
@click.option("--judge-mode", default="auto", show_default=True, type=click.Choice(JUDGE_MODES),
              help="How the judge's answers are made to parse. auto: one probe request finds what the server "
                   "honours: json_schema (a JSON schema through response_format; OpenAI, vLLM, SGLang, llama.cpp), "
                   "logprobs (also detection and fuzzing scored from P(1)/(P(1)+P(0)), with AUROC), logit_bias (one "
                   "answer token forced; transformers serve), else free text. local:PATH runs constrained "
                   "(the answers' logits compared).")
@click.option("--judge-tokenizer", default=None,
              help="The judge's tokenizer (a folder or hub name) for logit_bias, when the model name is not the "
                   "served model's folder.")
@click.option("--features", default=100, show_default=True, type=int,
              help="Latents to draw at random among those with enough examples; clamped, with a warning, to those.")
@click.option("--latents", "latent_list", default=None, help="Judge these latents instead (comma-separated indices).")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the latent sample and held-out shuffles.")
@click.option("--out", required=True, help="The interp.json to write.")
@click.option("--protocols", default=",".join(PROTOCOLS), show_default=True,
              help="Comma-separated: paper (RouteSAE's category and 1-5 score), detection, fuzzing (delphi's).")
@click.option("--concurrency", default=4, show_default=True, type=int, help="Requests in flight at once.")
@click.option("--cache-dir", default=None, help="Reply cache, one JSON file per reply  [default: <out>.cache].")
@click.option("--max-retries", default=5, show_default=True, type=int,
              help="Retries per request on connection errors, timeouts, 408, 409, 429 and 5xx, with exponential "
                   "backoff or the wait the server asks for (Retry-After).")
@click.option("--temperature", default=0.0, show_default=True, type=float,
              help="Judge temperature: 0 is greedy and repeatable (the RouteSAE paper used 0.1).")
@click.option("--max-tokens", default=300, show_default=True, type=int, help="Longest judge reply, in tokens.")
@click.option("--timeout", default=600.0, show_default=True, type=float,
              help="Seconds the judge may stay silent on a request: before its reply starts, or between two tokens.")
@click.option("--batch", default=5, show_default=True, type=int,
              help="Held-out windows per detection/fuzzing request (free and json_schema modes; the others ask one "
                   "window a request).")
@click.option("--min-examples", default=4, show_default=True, type=int,
              help="Draw only latents with at least this many top examples (and held-out windows for detection/fuzzing).")
@click.option("--all-negatives", is_flag=True,
              help="Score on every negative window, not as many as there are activating ones.")
@click.option("--overwrite", is_flag=True,
              help="Replace an --out that holds another SAE's interpretation or another file (refused by default).")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def interpret(contexts, judge_url, judge_model, judge_mode, judge_tokenizer, features, latent_list, seed, out,
              protocols, concurrency, cache_dir, max_retries, temperature, max_tokens, timeout, batch, min_examples,
              all_negatives, overwrite, quiet) -> None:
    """Ask an LLM judge about a seeded sample of latents: the RouteSAE paper's protocol (category,
    1-5 consistency score, explanation) and delphi's detection and fuzzing of held-out windows
    (balanced accuracy). Every reply is cached: a rerun is free and a killed run resumes.

    Example: routesae interpret --contexts ctx/routesae-k64 --judge-url http://127.0.0.1:8000/v1
    --judge-model NAME --features 100 --out interp.json"""
    from routesae.interpret.run_interpret import InterpretConfig, run_interpret, summary_table

    cfg = InterpretConfig(
        contexts=contexts, out=out, judge_model=judge_model, judge_url=judge_url, features=features, seed=seed,
        protocols=tuple(p.strip() for p in protocols.split(",") if p.strip()), latents=_latents(latent_list),
        min_examples=min_examples, batch=batch, balance=not all_negatives, concurrency=concurrency, cache_dir=cache_dir,
        max_retries=max_retries, temperature=temperature, max_tokens=max_tokens, timeout=timeout, overwrite=overwrite,
        judge_mode=judge_mode, judge_tokenizer=judge_tokenizer, progress=not quiet,
    )
    result = run_interpret(cfg, warn=lambda message: click.echo(f"routesae: warning: {message}", err=True))
    click.echo(summary_table(result.summary))
    click.echo(f"judge mode: {result.mode.mode} ({result.mode.why})")
    click.echo(f"wrote {result.out} ({len(result.latents)} latents; judge mode {result.mode.mode}; "
               f"{result.requests} judge requests, {result.cached} replies from the cache)")
