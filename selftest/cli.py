"""`routesae selftest`: one command that checks a device (a GPU first) end to end."""

from __future__ import annotations

import json
import sys

import click

from routesae.cli_args import parse_count


@click.command("selftest")
@click.option("--device", default="auto", show_default=True, help="auto (CUDA if present), cpu, cuda, cuda:N.")
@click.option("--model", default="smollm2", show_default=True,
              help="The model every stage runs: hub id, local folder, .gguf file, or smollm2 (offline).")
@click.option("--tiny", is_flag=True, help="A random-weight tiny Llama built in --out instead of --model, "
              "and CPU sizes: about a minute on a CPU (CI).")
@click.option("--tokens", default=None, help="Tokens to harvest: 2M, 250k, 32768 [default: 2M on CUDA, else 32768].")
@click.option("--context-len", default=None, type=click.IntRange(min=2),
              help="Tokens per context [default: 512, 64 with --tiny].")
@click.option("--batch-size", default=None, type=click.IntRange(min=1),
              help="Contexts per harvest forward (eval's batches follow) [default: 32 on CUDA, else 8].")
@click.option("--circuit-task", default=None, help="circuit-data's task [default: sva; list-index with --tiny].")
@click.option("--out", default=None, help="An absent or empty folder for the stages' outputs, kept "
              "[default: a temporary folder, removed after].")
@click.option("--quiet", is_flag=True, help="No line on stderr as each stage starts.")
def selftest(device, model, tiny, tokens, context_len, batch_size, circuit_task, out, quiet) -> None:
    """Run harvest, fit (TopK, RouteSAE, JumpReLU), eval --splice, contexts, steer and a circuit step
    on one device, each as the real command, and check the device against a CPU float32 reference
    computed in the same run: the first harvest batch's activations, the splice KL of one batch,
    the fit loss (NormMSE) going down. Prints JSON (tokens/s and seconds per stage, peak GPU memory and RSS,
    each check with its value and tolerance, the device) and exits 1 unless every check held.

    Example: routesae selftest --device cuda   (CI: routesae selftest --device cpu --tiny)"""
    from routesae.selftest.run import SelftestConfig, run_selftest

    cfg = SelftestConfig(device=device, model=model, tiny=tiny,
                         tokens=parse_count(tokens, "--tokens") if tokens is not None else None,
                         context_len=context_len, batch_size=batch_size, circuit_task=circuit_task, out=out,
                         progress=not quiet)
    result = run_selftest(cfg)
    click.echo(json.dumps(result, indent=2))
    if not result["ok"]:
        broken = [s for s, r in result["stages"].items() if not r["ok"]] + \
                 [c["name"] for c in result["checks"] if not c["held"]]
        click.echo(f"routesae selftest: FAILED: {'; '.join(broken)}", err=True)
        sys.exit(1)
