"""`routesae circuit-data`: write a circuit task's clean/patch pairs as JSON Lines, then report how
well the model solves the eval split."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import click
from routesae.atomic_files import atomic_open, write_json
from routesae.circuits.progress import Progress
from routesae.circuits.tasks import GENERATORS, TaskConfig, generate
from routesae.errors import RouteSAEError
from routesae.model.compute_dtype import CHOICES


@dataclass
class CircuitDataConfig:
    """The arguments of `routesae circuit-data`."""

    task: str
    """sva, ioi, list-index or dict-key."""
    out: str
    """The JSONL file to write; the summary goes to OUT.summary.json."""
    model: str = "smollm2"
    """The model whose tokenizer checks the pairs and which is scored on the eval split."""
    n: int = 512
    """Pairs to keep."""
    seed: int = 0
    """Seeds the generator and the split."""
    eval_fraction: float = 0.2
    """Share of the pairs in the eval split."""
    evaluate: bool = True
    """Run the model on the eval split."""
    device: str = "auto"
    """auto, cpu, cuda, cuda:N."""
    dtype: str = "float32"
    """Model dtype for the evaluation: float32, bfloat16, float16, or auto (bf16 where the device
    multiplies it natively, else float32: model/compute_dtype.py)."""
    batch_size: int = 32
    """Prompts per forward pass."""
    progress: bool = True
    """Phase lines and progress bars on stderr."""


class CircuitDataResult(NamedTuple):
    """What the command wrote and measured."""

    path: Path
    summary_path: Path
    summary: dict[str, Any]


def run_circuit_data(cfg: CircuitDataConfig) -> CircuitDataResult:
    """Generate, split, write, and (unless cfg.evaluate is off) score the model."""
    from routesae.model.compute_dtype import pick_compute_dtype
    from routesae.model.loading import load_model, load_tokenizer, resolve_device

    # Check the cheap arguments before any model load.
    if cfg.task not in GENERATORS:
        raise RouteSAEError(f"unknown task {cfg.task!r}: choose from {', '.join(GENERATORS)}")
    if cfg.n < 1:
        raise RouteSAEError(f"--n must be at least 1, got {cfg.n}")
    if cfg.dtype not in CHOICES:
        raise RouteSAEError(f"--dtype {cfg.dtype!r}: use one of {', '.join(CHOICES)}")
    compute = pick_compute_dtype(cfg.dtype, "bfloat16", resolve_device(cfg.device), "wanted") if cfg.evaluate else None
    progress = Progress(cfg.progress)
    # The tokenizer alone (quick) makes and checks the pairs; the model loads only to score them.
    tokenizer = load_tokenizer(cfg.model)
    progress.phase(f"generating {cfg.n} {cfg.task} pairs and checking their tokens ...")
    bar = progress.bar(cfg.n, cfg.task, unit="pair")
    try:
        data = generate(TaskConfig(cfg.task, cfg.n, cfg.seed, cfg.eval_fraction), tokenizer,
                        tick=partial(bar.update, 1))
    finally:
        bar.close()
    path = Path(cfg.out)
    with atomic_open(path) as f:
        for r in data.records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    splits = {s: sum(r["split"] == s for r in data.records) for s in ("train", "eval")}
    summary: dict[str, Any] = {
        "task": cfg.task, "model": cfg.model, "n": len(data.records), "dropped": data.dropped,
        "duplicates": data.duplicates, "splits": splits, "config": asdict(cfg),
        "tokenization": "prompts are plain text; the model sees its BOS token, then the prompt's tokens "
                        "(add_special_tokens=False); clean_answer_id/patch_answer_id are the answers' single "
                        "tokens after the prompt; the metric is read at the last prompt position",
    }
    if cfg.evaluate:
        from routesae.circuits.task_eval import score_task

        assert compute is not None
        progress.phase(f"wrote {path}; loading model {cfg.model} in {compute.name} ({compute.reason}) on "
                       f"{resolve_device(cfg.device)} ...")
        loaded = load_model(cfg.model, dtype=compute.name, device=cfg.device)
        summary["dtype"] = {"name": compute.name, "reason": compute.reason}
        eval_records = [r for r in data.records if r["split"] == "eval"]
        summary["scored_split"] = "eval" if eval_records else "all"  # --eval-fraction 0: score every pair
        eval_records = eval_records or data.records
        progress.phase(f"scoring the model on {len(eval_records)} {summary['scored_split']} pairs "
                       f"({2 * len(eval_records)} prompts) ...")
        bar = progress.bar(2 * len(eval_records), "scoring", unit="prompt")
        try:
            overall, by_variant = score_task(loaded.model, loaded.tokenizer, eval_records, cfg.batch_size,
                                             tick=bar.update)
        finally:
            bar.close()
        summary["eval"] = overall.as_dict()
        summary["eval_by_variant"] = {v: s.as_dict() for v, s in by_variant.items()}
    summary_path = path.with_name(path.name + ".summary.json")
    write_json(summary_path, summary)
    return CircuitDataResult(path, summary_path, summary)


@click.command("circuit-data")
@click.option("--task", required=True, help=f"The task: {', '.join(GENERATORS)}.")
@click.option("--model", default="smollm2", show_default=True,
              help="Model whose tokenizer checks the pairs and which is scored: hub id, folder, .gguf or smollm2.")
@click.option("--n", default=512, show_default=True, type=int, help="Pairs to keep.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seeds the generator and the train/eval split.")
@click.option("--eval-fraction", default=0.2, show_default=True, type=float, help="Share of pairs in the eval split.")
@click.option("--out", required=True, help="JSONL file to write (and OUT.summary.json beside it).")
@click.option("--no-eval", is_flag=True, help="Skip running the model on the eval split.")
@click.option("--device", default="auto", show_default=True, help="auto (CUDA if present), cpu, cuda, cuda:N.")
@click.option("--batch-size", default=32, show_default=True, type=int, help="Prompts per forward pass.")
@click.option("--dtype", type=click.Choice(CHOICES), default="float32", show_default=True,
              help="The model's dtype for the scoring. auto: bf16 where the device multiplies it natively "
                   "(CPU: AVX512-BF16/AMX; CUDA: Ampere on), else float32.")
@click.option("--quiet", is_flag=True, help="No phase lines or progress bars.")
def circuit_data(task, model, n, seed, eval_fraction, out, no_eval, device, batch_size, dtype, quiet) -> None:
    """Offline task datasets for circuit finding: clean/patch prompt pairs of equal token length with
    single-token answers, one JSON object per line, split train/eval by seed; then the model's mean
    logit difference and accuracy on the eval split.

    Example: routesae circuit-data --task sva --model smollm2 --n 512 --seed 0 --out sva.jsonl"""
    from routesae.circuits.task_eval import TaskScore, format_score

    res = run_circuit_data(CircuitDataConfig(task=task, out=out, model=model, n=n, seed=seed,
                                             eval_fraction=eval_fraction, evaluate=not no_eval,
                                             device=device, batch_size=batch_size, dtype=dtype,
                                             progress=not quiet))
    s = res.summary
    click.echo(f"{task}: kept {s['n']} pairs ({s['splits']['train']} train, {s['splits']['eval']} eval), "
               f"dropped {s['dropped']} failing the tokenizer checks, skipped {s['duplicates']} duplicates")
    if "eval" in s:
        click.echo(format_score(task, TaskScore(**s["eval"])))
        for variant, score in s["eval_by_variant"].items():
            click.echo(f"  {variant:<10} n {score['n']:>4}  clean {score['clean_logit_diff']:7.3f} "
                       f"({score['clean_accuracy']:.2f})  patch {score['patch_logit_diff']:7.3f} "
                       f"({score['patch_accuracy']:.2f})")
    click.echo(f"wrote {res.path} and {res.summary_path}")
