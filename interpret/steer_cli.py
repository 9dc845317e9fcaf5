"""`routesae steer`: continue prompts with and without edits of an SAE's latents, side by side.

The model is the one the SAE's config records (id, revision), or `--model` (a moved copy of it:
another revision is refused), run in the recorded dtype where the device multiplies it natively,
else float32 (`--dtype auto`, model/compute_dtype.py: bf16 on a CPU without it is ~27x slower).
Each prompt is generated twice with the same settings and seed, once plain and once under
`steering` (interpret/steering.py), and the first steered forward is compared with the
baseline's: per token, KL(baseline || steered) of the next-token distribution.
"""

from __future__ import annotations

import json
import math
import shutil
import textwrap
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from routesae.errors import RouteSAEError
from routesae.interpret.choices import MODES, POSITIONS, WHERES
from routesae.cli_args import rerun_model_options
from routesae.model.compute_dtype import CHOICES

if TYPE_CHECKING:  # steering.py loads torch: only when the command runs, never for --help
    from routesae.interpret.steering import Comparison, Edit, GenerationSettings


def _default_settings() -> GenerationSettings:
    """GenerationSettings' defaults, imported only when a config is made (steering.py loads torch)."""
    from routesae.interpret.steering import GenerationSettings

    return GenerationSettings()


@dataclass
class SteerConfig:
    """The arguments of `routesae steer`."""

    sae: str
    """The SAE folder (config.json + sae.safetensors)."""
    edits: list[Edit]
    """The edits, applied together."""
    prompts: list[str]
    """The prompts, each continued twice."""
    settings: GenerationSettings = field(default_factory=_default_settings)
    """Decoding, the same for both runs."""
    model: str | None = None
    """Load the model from here instead of the SAE's recorded model id."""
    device: str = "auto"
    """'auto', 'cpu', 'cuda', 'cuda:N'."""
    dtype: str = "auto"
    """The model's compute dtype: 'auto' (the recorded dtype where the device multiplies it natively,
    else float32), 'float32', 'bfloat16' or 'float16'."""


def _number(text: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise RouteSAEError(f"{what} {text!r} is not a number") from None
    if not math.isfinite(value):
        raise RouteSAEError(f"{what} {text!r} is not a finite number")
    return value


def _integer(text: str, what: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        raise RouteSAEError(f"{what} {text!r} is not an integer") from None


def _per_edit(values: tuple[str, ...], n: int, name: str, default: str | None) -> list[str | None]:
    """One value for every edit, or one per edit in order."""
    if not values:
        return [default] * n
    if len(values) == 1:
        return list(values) * n
    if len(values) != n:
        raise RouteSAEError(f"{len(values)} {name} values for {n} latents: give one for all, or one per --latent")
    return list(values)


def parse_edits(latents: tuple[str, ...], modes: tuple[str, ...], values: tuple[str, ...], wheres: tuple[str, ...],
                positions: tuple[str, ...]) -> list[Edit]:
    """The command's repeated options -> edits; one-line errors for what is not a number or a known word."""
    from routesae.interpret.steering import Edit

    if not latents:
        raise RouteSAEError("no --latent given")
    n = len(latents)
    edits = []
    for latent, mode, value, where, pos in zip(latents, _per_edit(modes, n, "--mode", "set"),
                                               _per_edit(values, n, "--value", None),
                                               _per_edit(wheres, n, "--where", "all"),
                                               _per_edit(positions, n, "--positions", "all")):
        if mode not in MODES:
            raise RouteSAEError(f"unknown --mode {mode!r}: use one of {', '.join(MODES)}")
        if where not in WHERES:
            raise RouteSAEError(f"unknown --where {where!r}: use one of {', '.join(WHERES)}")
        if pos not in POSITIONS:
            raise RouteSAEError(f"unknown --positions {pos!r}: use one of {', '.join(POSITIONS)}")
        if value is None and mode != "zero":
            raise RouteSAEError(f"--mode {mode} needs a --value")
        edits.append(Edit(_integer(latent, "latent"), mode, 0.0 if value is None else _number(value, "value"),
                          where, pos))
    return edits


def read_prompts(prompts: tuple[str, ...], path: str | None) -> list[str]:
    """--prompt texts, then those of --prompts FILE (one per line, blank lines skipped; or .jsonl
    with a "text" field per line)."""
    out = list(prompts)
    if path is not None:
        file = Path(path)
        if not file.is_file():
            raise RouteSAEError(f"no prompts file at {file}")
        for i, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            if file.suffix == ".jsonl":
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise RouteSAEError(f"{file}:{i} is not JSON ({e.msg})") from None
                if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
                    raise RouteSAEError(f'{file}:{i} has no "text" string')
                out.append(rec["text"])
            else:
                out.append(line)
    if not out:
        raise RouteSAEError("no prompt given: pass --prompt TEXT or --prompts FILE (and a file that holds some)")
    for i, p in enumerate(out, 1):
        if not p:
            raise RouteSAEError(f"prompt {i} is empty")
    return out


def _describe_sae(sae: Any, name: str) -> str:
    layers = sae.config.layers
    where = f"layer {layers[0]}" if len(layers) == 1 else f"layers {layers[0]}..{layers[-1]}"
    return f"{name} ({sae.config.arch}, {where}; {sae.config.n_latents} latents)"


def run_steer(cfg: SteerConfig) -> dict[str, Any]:
    """Load the SAE and its model, continue every prompt plain and steered; -> the JSON-ready result
    (sae, model, edits, settings, clean_pass, results: one per prompt, seconds)."""
    from routesae.interpret.steering import check_edits, check_steerable, compare
    from routesae.model.loading import load_store_model
    from routesae.train.load import load_sae

    started = time.time()
    if cfg.dtype not in CHOICES:
        raise RouteSAEError(f"--dtype {cfg.dtype!r}: use one of {', '.join(CHOICES)}")
    sae_dir = Path(cfg.sae)
    sae = load_sae(sae_dir)
    edits = check_edits(cfg.edits, sae.config.n_latents)
    check_steerable(sae)
    if cfg.settings.max_new_tokens < 1:
        raise RouteSAEError("--max-new-tokens must be at least 1")
    recorded: dict[str, Any] = dict(sae.config.model)
    if not recorded.get("id") and cfg.model is None:
        raise RouteSAEError(f"{sae_dir} records no model to steer; pass --model")
    loaded = load_store_model(sae_dir, recorded, cfg.model, cfg.device, "steer with", dtype=cfg.dtype)
    sae = sae.to(next(loaded.model.parameters()).device)
    results = [compare(loaded.model, loaded.tokenizer, sae, edits, p, cfg.settings) for p in cfg.prompts]
    deepest = max(sae.config.layers)
    n_layers = loaded.info["n_layers"]
    return dict(
        sae={"path": str(sae_dir), "name": sae_dir.name, "arch": sae.config.arch, "layers": list(sae.config.layers),
             "n_latents": sae.config.n_latents},
        model={k: loaded.info.get(k) for k in ("id", "revision", "dtype", "n_layers", "d_model")},
        edits=[asdict(e) for e in edits],
        settings=asdict(cfg.settings),
        clean_pass=(f"each forward first runs the unedited model up to hidden state {deepest} "
                    f"(blocks 0..{deepest - 1}) to route its tokens: {deepest} of {n_layers} blocks more per "
                    "forward, and a second KV cache for them") if hasattr(sae, "route") else None,
        results=[_result_json(r, loaded.tokenizer) for r in results],
        seconds=round(time.time() - started, 2),
    )


def _result_json(r: Comparison, tokenizer: Any) -> dict[str, Any]:
    recs = r.records
    return {
        "prompt": r.prompt,
        "prompt_ids": r.prompt_ids,
        "baseline": {"text": r.baseline.text, "token_ids": r.baseline.token_ids},
        "steered": {"text": r.steered.text, "token_ids": r.steered.token_ids},
        "first_step": {"kind": r.first_step.kind, "positions": r.first_step.positions,
                       "tokens": [tokenizer.decode([t]) for t in r.first_step.token_ids],
                       "token_ids": r.first_step.token_ids, "kl": r.first_step.kl},
        "forwards": len(recs),
        "edited_forwards": sum(1 for x in recs if x.edited),
        "cached_steps": sum(1 for x in recs if x.start > 0),
        "edited_cached_steps": sum(1 for x in recs if x.start > 0 and x.edited),
        "edited_positions": sum(x.edited for x in recs),
    }


def _visible(text: str) -> str:
    return text.replace("\r", "\\r").replace("\n", "\\n").replace("\t", "\\t")


def _entries(items: list[str], width: int, indent: str = "    ") -> list[str]:
    """Items two spaces apart, as many to a line as fit (an item is never split)."""
    lines, line = [], ""
    for item in items:
        if line and len(indent) + len(line) + 2 + len(item) > width:
            lines.append(indent + line)
            line = ""
        line = f"{line}  {item}" if line else item
    return lines + ([indent + line] if line else [])


def side_by_side(left: str, right: str, width: int, titles: tuple[str, str] = ("baseline", "steered")) -> str:
    """Two texts in two wrapped columns."""
    col = max(20, (width - 5) // 2)
    a = textwrap.wrap(_visible(left), col, drop_whitespace=False) or [""]
    b = textwrap.wrap(_visible(right), col, drop_whitespace=False) or [""]
    rows = [f"  {titles[0]:<{col}} | {titles[1]}", f"  {'-' * col}-+-{'-' * col}"]
    for i in range(max(len(a), len(b))):
        rows.append(f"  {a[i] if i < len(a) else '':<{col}} | {b[i] if i < len(b) else ''}".rstrip())
    return "\n".join(rows)


def format_text(result: dict[str, Any], width: int) -> str:
    from routesae.interpret.steering import Edit

    s = result["settings"]
    decoding = (f"sampled (temperature {s['temperature']:g}, top-p {s['top_p']:g})" if s["sample"] else "greedy")
    sae = result["sae"]
    layers = sae["layers"]
    where = f"layer {layers[0]}" if len(layers) == 1 else f"layers {layers[0]}..{layers[-1]}"
    lines = [
        f"SAE {sae['name']} ({sae['arch']}, {where}; {sae['n_latents']} latents) on {result['model']['id']} "
        f"({result['model']['dtype']})",
        "edits: " + "; ".join(Edit(**e).describe() for e in result["edits"]),
        f"decoding: {decoding}, up to {s['max_new_tokens']} new tokens, seed {s['seed']}, "
        f"KV cache {'on' if s['use_cache'] else 'off'}",
    ]
    if result["clean_pass"]:
        lines.append(f"RouteSAE: {result['clean_pass']}")
    for i, r in enumerate(result["results"], 1):
        lines += ["", f"[{i}] prompt: {_visible(r['prompt'])}",
                  side_by_side(r["baseline"]["text"], r["steered"]["text"], width)]
        f = r["first_step"]
        if f["kind"] == "none":
            lines.append("  the edits changed no forward: the steered run is the baseline")
        else:
            span = f"position {f['positions'][0]}" if len(f["positions"]) == 1 else \
                f"positions {f['positions'][0]}-{f['positions'][-1]}"
            lines.append(f"  first steered step ({f['kind']}, {span}), KL(baseline||steered) per token, nats:")
            lines += _entries([f"{_visible(t)!r} {v:.3g}" for t, v in zip(f["tokens"], f["kl"])], width)
        lines.append(f"  edited {r['edited_positions']} positions in {r['edited_forwards']} of {r['forwards']} "
                     "forwards "
                     f"({r['edited_cached_steps']} of {r['cached_steps']} cached one-token steps)")
    lines.append(f"\n{result['seconds']:.1f} s")
    return "\n".join(lines)


@click.command("steer")
@click.option("--sae", "sae", required=True, metavar="PATH", help="The SAE folder.")
@click.option("--latent", "latents", multiple=True, metavar="INDEX",
              help="Latent to edit; repeat for several edits at once (the other options: one for all, or one each).")
@click.option("--mode", "modes", multiple=True, metavar="MODE",
              help=f"{'|'.join(MODES)}: clamp to --value, add it, multiply by it, or ablate. Default set.")
@click.option("--value", "values", multiple=True, metavar="NUMBER", help="The number (not needed by zero).")
@click.option("--where", "wheres", multiple=True, metavar="WHERE",
              help="all (default): every position; active: only where the latent already fires.")
@click.option("--positions", "positions", multiple=True, metavar="WHICH",
              help="all (default), prompt or generated: which tokens are edited.")
@click.option("--prompt", "prompts", multiple=True, metavar="TEXT", help="A prompt; repeatable.")
@click.option("--prompts", "prompts_file", default=None, metavar="FILE",
              help='Prompts, one per line, or a .jsonl file with a "text" field per line.')
@click.option("--max-new-tokens", default=64, show_default=True, type=int)
@click.option("--sample", is_flag=True, help="Sample (default: greedy).")
@click.option("--temperature", default=1.0, show_default=True, type=float, help="With --sample.")
@click.option("--top-p", default=1.0, show_default=True, type=float, help="With --sample.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seeds both runs alike.")
@click.option("--no-cache", is_flag=True, help="Generate without the key-value cache (slower; the same greedy output).")
@rerun_model_options
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def steer(sae, latents, modes, values, wheres, positions, prompts, prompts_file, max_new_tokens, sample, temperature,
          top_p, seed, no_cache, model, device, dtype, as_json) -> None:
    """Continue prompts with and without edits of SAE latents, side by side: the same seed and decoding
    (greedy by default), plus the per-token KL of the first steered forward. The edit keeps the SAE's
    error term (x + decode(z') - decode(z)) and applies on every forward, prompt and generated tokens.

    Example: routesae steer --sae runs/topk-k32 --latent 1234 --mode set --value 20 --prompt "The weather"
    """
    from routesae.interpret.steering import GenerationSettings

    edits = parse_edits(latents, modes, values, wheres, positions)
    cfg = SteerConfig(
        sae=sae, edits=edits, prompts=read_prompts(prompts, prompts_file),
        settings=GenerationSettings(max_new_tokens=max_new_tokens, sample=sample, temperature=temperature, top_p=top_p,
                                    seed=seed, use_cache=not no_cache),
        model=model, device=device, dtype=dtype,
    )
    result = run_steer(cfg)
    if as_json:
        click.echo(json.dumps(result, ensure_ascii=False))
    else:
        click.echo(format_text(result, shutil.get_terminal_size((100, 24)).columns))
