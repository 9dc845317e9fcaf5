"""`routesae circuit`: a sweep of learned-mask circuits over SAE latents at spaced layers, against
integrated gradients and attribution patching cut at the same node counts; writes circuit.json,
circuit.md and faithfulness.png (docs/circuits.md)."""

from __future__ import annotations

import json
import math
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import torch
from routesae.circuits.attribution import (
    accumulate,
    attribution_patching,
    integrated_gradients,
    share_positions,
    top_n_circuit,
)
from routesae.atomic_files import save_figure, write_json, write_text
from routesae.circuits.masks import MaskConfig, train_masks
from routesae.circuits.metrics import baselines, score_circuit, stability
from routesae.circuits.progress import QUIET, Progress
from routesae.circuits.splice import CircuitModel, Means, PairBatch
from routesae.errors import RouteSAEError
from torch import Tensor

FORMAT = "routesae-circuit"
VERSION = 1


@dataclass
class CircuitConfig:
    """The arguments of `routesae circuit`."""

    task: str
    """The task's JSON Lines file (routesae circuit-data): clean/patch prefixes and answers, split."""
    saes: list[str]
    """Single-layer SAE folders, one per layer, trained on one store (one model)."""
    out: str
    """Output folder: circuit.json, circuit.md, faithfulness.png."""
    lambdas: str = "0.01:0.2:5"
    """Penalties: 'lo:hi:n' (n values, quadratic spacing) or a comma list."""
    steps: int = 200
    """Adam steps per penalty."""
    lr: float = 0.1
    """Adam's learning rate on the mask logits."""
    beta_max: float = 200.0
    """Final beta of the annealed sigmoid (from 1)."""
    shared_positions: bool = False
    """One mask logit per latent for every position, instead of per (position, latent)."""
    ablation: str = "mean"
    """An off latent takes: 'mean' (patch mean at that position) or 'zero'."""
    error: str = "mean"
    """The SAEs' error terms: 'mean' (patch mean), 'kept' (from the clean run) or 'dropped'."""
    ig_steps: int = 10
    """Integrated-gradients steps from patch to clean."""
    batch_size: int = 16
    """Prompt pairs per batch."""
    seed: int = 0
    """Seed of the batch order."""
    model: str | None = None
    """Load the model from here instead of the SAEs' recorded model id."""
    device: str = "auto"
    """'auto', 'cpu', 'cuda', ..."""
    dtype: str = "auto"
    """The model's compute dtype: 'auto' (the SAEs' recorded dtype where the device multiplies it
    natively, else float32: model/compute_dtype.py), 'float32', 'bfloat16' or 'float16'."""
    progress: bool = True
    """Phase lines and progress bars on stderr."""
    contexts: list[str] = field(default_factory=list)
    """`routesae contexts` folders (one per SAE, or a parent of one folder per SAE name)."""
    top_contexts: int = 3
    """Top contexts listed per circuit latent."""


def parse_lambdas(spec: str) -> list[float]:
    """'lo:hi:n' -> n values from lo to hi, quadratically spaced (dense at the low end); or 'a,b,c'."""
    try:
        if ":" in spec:
            lo, hi, n = spec.split(":")
            lo_f, hi_f, count = float(lo), float(hi), int(n)
            if count < 1:
                raise ValueError
            if count == 1:
                return [lo_f]
            return [lo_f + (hi_f - lo_f) * (i / (count - 1)) ** 2 for i in range(count)]
        values = [float(v) for v in spec.split(",") if v.strip()]
    except ValueError:
        raise RouteSAEError(f"--lambdas {spec!r}: give lo:hi:n (e.g. 0.01:0.2:5) or a comma list") from None
    if not values or any(not math.isfinite(v) or v < 0 for v in values):
        raise RouteSAEError(f"--lambdas {spec!r}: penalties must be finite and >= 0")
    return values


# --- the task ------------------------------------------------------------------------------------
class TaskData(NamedTuple):
    """A task tokenized and batched by token length."""

    train: list[tuple[PairBatch, Means | None]]
    eval: list[tuple[PairBatch, Means | None]]
    n_pos: int
    """Positions after BOS of the longest prompt: the mask's rows."""
    skipped: dict[str, int]
    """Records left out, by reason."""


SPLITS = ("train", "eval")
NEEDED = ("clean_prefix", "patch_prefix", "clean_answer", "patch_answer")
"""The string fields every task record has (routesae circuit-data writes them)."""


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """The task file's records, checked as far as they can be without the model (fields, splits,
    both splits present): run before anything loads, so a wrong file fails in a second."""
    p = Path(path)
    if not p.is_file():
        raise RouteSAEError(f"no task file at {p}")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise RouteSAEError(f"{p} is not UTF-8 text (a task file is JSON Lines from routesae circuit-data)") from None
    records = []
    counts = dict.fromkeys(SPLITS, 0)
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            raise RouteSAEError(f"{p}:{i} is not JSON (a task file is JSON Lines from routesae circuit-data)") from None
        if not isinstance(r, dict) or any(not isinstance(r.get(k), str) for k in NEEDED):
            raise RouteSAEError(f"{p}:{i} lacks one of {', '.join(NEEDED)} (strings)")
        split = r.get("split", "train")
        if split not in SPLITS:
            raise RouteSAEError(f"{p}:{i}: split must be 'train' or 'eval', got {split!r}")
        counts[split] += 1
        records.append(r)
    if not records:
        raise RouteSAEError(f"{p} holds no records")
    for split, n in counts.items():
        if n == 0:
            raise RouteSAEError(f"{p} has no {split} records ({counts['train']} train, {counts['eval']} eval): "
                                "the masks train on the train split and are scored on the eval split; make the "
                                "task with routesae circuit-data (--eval-fraction between 0 and 1)")
    return records


def _answer_token(tokenizer: Any, prefix: list[int], prefix_text: str, answer: str) -> int | None:
    full = tokenizer(prefix_text + answer, add_special_tokens=False)["input_ids"]
    if len(full) != len(prefix) + 1 or full[:len(prefix)] != prefix:
        return None
    return int(full[-1])


def tokenize_task(records: list[dict[str, Any]], tokenizer: Any, bos: int, batch_size: int) -> TaskData:
    """Token ids with BOS prepended; pairs whose prefixes differ in length or whose answers are
    not one token are skipped (counted); batches group one token length."""
    groups: dict[tuple[str, int], list[tuple[list[int], list[int], int, int]]] = defaultdict(list)
    skipped: dict[str, int] = defaultdict(int)
    for r in records:
        c = tokenizer(r["clean_prefix"], add_special_tokens=False)["input_ids"]
        p = tokenizer(r["patch_prefix"], add_special_tokens=False)["input_ids"]
        if len(c) != len(p) or not c:
            skipped["prefix lengths differ"] += 1
            continue
        ca = _answer_token(tokenizer, c, r["clean_prefix"], r["clean_answer"])
        pa = _answer_token(tokenizer, p, r["patch_prefix"], r["patch_answer"])
        if ca is None or pa is None:
            skipped["answer not one token"] += 1
            continue
        split = r.get("split", "train")
        if split not in SPLITS:
            raise RouteSAEError(f"record {r.get('id')}: split must be 'train' or 'eval', got {split!r}")
        groups[(split, len(c) + 1)].append(([bos, *c], [bos, *p], ca, pa))
    out: dict[str, list[tuple[PairBatch, Means | None]]] = {"train": [], "eval": []}
    for (split, _), rows in sorted(groups.items()):
        for i in range(0, len(rows), batch_size):
            chunk = rows[i:i + batch_size]
            out[split].append((PairBatch(torch.tensor([r[0] for r in chunk]), torch.tensor([r[1] for r in chunk]),
                                         torch.tensor([r[2] for r in chunk]), torch.tensor([r[3] for r in chunk])),
                               None))
    if not out["train"] or not out["eval"]:
        raise RouteSAEError(f"the task needs usable pairs in both splits (train {len(out['train'])} batches, "
                            f"eval {len(out['eval'])}; skipped: {dict(skipped) or 'none'})")
    n_pos = max(length for _, length in groups) - 1
    return TaskData(out["train"], out["eval"], n_pos, dict(skipped))


def attach_means(cm: CircuitModel, data: TaskData, batch_size: int, progress: Progress = QUIET) -> TaskData:
    """Each batch with the per-position means over every patch prompt of its token length (both splits)."""
    by_len: dict[int, list[Tensor]] = defaultdict(list)
    for b, _ in data.train + data.eval:
        by_len[b.patch.shape[1]].append(b.patch)
    means: dict[int, Means] = {}
    n_forwards = sum(math.ceil(sum(c.shape[0] for c in chunks) / batch_size) for chunks in by_len.values())
    bar = progress.bar(n_forwards, "patch means")
    for length, chunks in by_len.items():
        patch = torch.cat(chunks)
        sums_z: dict[int, Tensor] = {}
        sums_e: dict[int, Tensor] = {}
        for i in range(0, patch.shape[0], batch_size):
            part = patch[i:i + batch_size]
            mu = cm.means(part)
            for layer in cm.layers:
                sums_z[layer] = sums_z.get(layer, 0) + mu.z[layer] * part.shape[0]
                sums_e[layer] = sums_e.get(layer, 0) + mu.error[layer] * part.shape[0]
            bar.update(1)
        n = patch.shape[0]
        means[length] = Means({k: v / n for k, v in sums_z.items()}, {k: v / n for k, v in sums_e.items()})
    bar.close()
    attach = lambda split: [(b, means[b.patch.shape[1]]) for b, _ in split]
    return data._replace(train=attach(data.train), eval=attach(data.eval))


# --- contexts of the circuit latents ----------------------------------------------------------------
def load_contexts(folders: list[str], sae_names: list[str]) -> dict[str, tuple[Path, list[str]]]:
    """SAE name -> (its contexts folder, the vocabulary) where one is found: with one folder per SAE,
    folder i (or folder i/<name>) is SAE i's; otherwise each folder is a parent of <name>/ folders."""
    found: dict[str, tuple[Path, list[str]]] = {}
    for i, name in enumerate(sae_names):
        cands = [Path(folders[i]), Path(folders[i]) / name] if len(folders) == len(sae_names) else []
        cands += [Path(f) / name for f in folders]
        for cand in cands:
            if (cand / "latents.jsonl").is_file() and (cand / "tokens.json").is_file():
                found[name] = (cand, json.loads((cand / "tokens.json").read_text()))
                break
    return found


def latent_contexts(folder: Path, vocab: list[str], latents: set[int], n: int) -> dict[int, list[str]]:
    """latent -> the text of its top `n` contexts, the activating token in [[ ]]."""
    out: dict[int, list[str]] = {}
    with open(folder / "latents.jsonl") as f:
        for i, line in enumerate(f):
            if i not in latents:
                continue
            rec = json.loads(line)
            texts = []
            for ex in rec.get("top", [])[:n]:
                ids, mark = ex.get("token_ids", []), ex.get("mark")
                texts.append("".join(f"[[{vocab[t]}]]" if j == mark else vocab[t] for j, t in enumerate(ids)))
            out[i] = texts
    return out


# --- the sweep ------------------------------------------------------------------------------------
def _nodes(circuit: dict[int, Tensor], n_pos: int, shared: bool, logits: dict[int, Tensor] | None,
           ig: dict[int, Tensor], layer_names: dict[int, str]) -> list[dict[str, Any]]:
    rows = []
    for layer in sorted(circuit):
        for r, latent in circuit[layer].nonzero().tolist():
            rows.append({"layer": layer, "sae": layer_names[layer],
                         "position": "all" if shared else r - circuit[layer].shape[0],
                         "latent": latent,
                         "logit": None if logits is None else float(logits[layer][r, latent]),
                         "ig": float(ig[layer][r, latent])})
    return rows


def _step_done(bar: Any, loss: float) -> None:
    """A mask-training step's update of its bar, with the loss."""
    bar.set_postfix(loss=f"{loss:.4g}", refresh=False)
    bar.update(1)


def run_circuit(cfg: CircuitConfig, loaded: Any = None, saes: list[Any] | None = None) -> dict[str, Any]:
    """The sweep; writes the outputs and returns the JSON-ready result. `loaded`/`saes`: a model
    (LoadedModel) and SAEs already in memory (tests), else loaded from cfg.

    Everything that can be checked without the model is checked first (the arguments, the task
    file, the SAEs, then the task's tokenization with the tokenizer alone), so a wrong input fails
    in seconds, not after the model's load."""
    from routesae.model.compute_dtype import CHOICES, pick_compute_dtype
    from routesae.model.special_tokens import SpecialTokens
    from routesae.train.load import load_sae

    t0 = time.time()
    if cfg.steps < 1 or cfg.ig_steps < 1 or cfg.batch_size < 1:
        raise RouteSAEError("--steps, --ig-steps and --batch-size must be at least 1")
    lambdas = parse_lambdas(cfg.lambdas)
    if cfg.dtype not in CHOICES:
        raise RouteSAEError(f"--dtype {cfg.dtype!r}: use one of {', '.join(CHOICES)}")
    if saes is None and not cfg.saes:
        raise RouteSAEError("no SAE given: pass --saes RUN [RUN...]")
    records = read_records(cfg.task)
    progress = Progress(cfg.progress)
    if saes is None:
        progress.phase(f"loading {len(cfg.saes)} SAE(s) ...")
        saes = [load_sae(p) for p in cfg.saes]
    names = [Path(p).name for p in cfg.saes] if cfg.saes else [f"sae{i}" for i in range(len(saes))]
    compute = None
    if loaded is None:
        from routesae.model.loading import load_store_model, load_tokenizer, resolve_device, store_model_spec

        models = {json.dumps({k: s.config.model.get(k) for k in ("id", "revision")}, sort_keys=True) for s in saes}
        if len(models) != 1:
            raise RouteSAEError("the SAEs were trained on different models: a circuit needs SAEs of one model")
        recorded = dict(saes[0].config.model)
        if not recorded.get("id") and cfg.model is None:
            raise RouteSAEError(f"{cfg.saes[0]} records no model; pass --model")
        spec = store_model_spec(Path(cfg.saes[0]), recorded, cfg.model)
        compute = pick_compute_dtype(cfg.dtype, recorded.get("dtype", "bfloat16"), resolve_device(cfg.device))
        # the tokenizer alone (seconds) tells whether the task has usable pairs for this model
        tokenizer = load_tokenizer(spec)
        data = tokenize_task(records, tokenizer, SpecialTokens.of(tokenizer).bos, cfg.batch_size)
        progress.phase(f"loading model {spec} in {compute.name} ({compute.reason}) on {resolve_device(cfg.device)} ...")
        loaded = load_store_model(Path(cfg.saes[0]), recorded, cfg.model, cfg.device, "find circuits in",
                                  dtype=compute.name)
    else:
        data = tokenize_task(records, loaded.tokenizer, SpecialTokens.of(loaded.tokenizer).bos, cfg.batch_size)
    device = next(loaded.model.parameters()).device
    saes = [s.to(device) for s in saes]
    cm = CircuitModel(loaded.model, saes, error=cfg.error, ablation=cfg.ablation)
    layer_names = {int(s.config.layers[0]): n for s, n in zip(saes, names)}
    n_train = sum(b.clean.shape[0] for b, _ in data.train)
    n_eval = sum(b.clean.shape[0] for b, _ in data.eval)
    skipped = ", ".join(f"{n} {why}" for why, n in data.skipped.items()) or "none"
    progress.phase(f"task {cfg.task}: {n_train} train pairs in {len(data.train)} batches, {n_eval} eval pairs in "
                   f"{len(data.eval)} batches, {data.n_pos} positions; skipped: {skipped}")
    progress.phase("computing the patch means of the SAE codes and error terms ...")
    data = attach_means(cm, data, cfg.batch_size, progress)
    rows = 1 if cfg.shared_positions else data.n_pos
    progress.phase("scoring the eval split with every node on and every node off ...")
    bar = progress.bar(2 * len(data.eval), "m(M), m(empty)")
    base_eval = baselines(cm, data.eval, data.n_pos, rows, tick=partial(bar.update, 1))
    bar.close()
    with torch.no_grad():
        targets = [cm.metric(b, mu).mean() for b, mu in data.train]

    # baselines' scores over the train split, summed over prompts
    t_ig = time.time()
    progress.phase(f"integrated gradients ({cfg.ig_steps} steps per SAE) and attribution patching on the train "
                   f"split: {len(data.train) * (len(cm.layers) * cfg.ig_steps + 1)} forward+backward passes ...")
    bar = progress.bar(len(data.train) * (len(cm.layers) * cfg.ig_steps + 1), "IG + AtP", unit="pass")
    ig_total = atp_total = None
    for b, mu in data.train:
        ig_total = accumulate(ig_total, integrated_gradients(cm, b, mu, cfg.ig_steps, tick=partial(bar.update, 1)),
                              data.n_pos)
        atp_total = accumulate(atp_total, attribution_patching(cm, b, mu), data.n_pos)
        bar.update(1)
    bar.close()
    assert ig_total is not None and atp_total is not None
    if cfg.shared_positions:
        ig_total, atp_total = share_positions(ig_total), share_positions(atp_total)
    ig_seconds = time.time() - t_ig

    circuits: list[dict[str, Any]] = []
    mask_circuits = []
    for i, lam in enumerate(lambdas, 1):
        t_l = time.time()
        progress.phase(f"training masks at lambda {lam:.4g} ({i} of {len(lambdas)}): {cfg.steps} steps ...")
        bar = progress.bar(cfg.steps, f"masks lambda {lam:.4g}", unit="step")
        res = train_masks(cm, data.train, data.n_pos, MaskConfig(lam=lam, steps=cfg.steps, lr=cfg.lr,
                                                                 beta_max=cfg.beta_max,
                                                                 shared_positions=cfg.shared_positions,
                                                                 seed=cfg.seed), targets, tick=partial(_step_done, bar))
        bar.close()
        mask_circuits.append(res.circuit)
        entry: dict[str, Any] = {"lambda": lam, "n_nodes": res.n_nodes, "seconds": round(time.time() - t_l, 2),
                                 "final_loss": res.losses[-1]}
        progress.phase(f"lambda {lam:.4g}: {res.n_nodes} nodes; scoring it, and IG's and attribution patching's "
                       "circuits of that size, on the eval split ...")
        bar = progress.bar(6 * len(data.eval), f"scores lambda {lam:.4g}")
        entry["masks"] = score_circuit(cm, data.eval, res.circuit, base_eval, tick=partial(bar.update, 1))._asdict()
        for method, scores in (("ig", ig_total), ("attribution_patching", atp_total)):
            entry[method] = score_circuit(cm, data.eval, top_n_circuit(scores, res.n_nodes), base_eval,
                                          tick=partial(bar.update, 1))._asdict()
        bar.close()
        entry["nodes"] = _nodes(res.circuit, data.n_pos, cfg.shared_positions, res.logits, ig_total, layer_names)
        entry["per_layer"] = {layer_names[layer]: int(c.sum()) for layer, c in res.circuit.items()}
        circuits.append(entry)

    # stability: neighbouring penalties' circuits, in order of size
    stab = stability(mask_circuits)
    ctx = load_contexts(cfg.contexts, names) if cfg.contexts else {}
    if ctx:
        for name, (folder, vocab) in ctx.items():
            layer = next(la for la, n in layer_names.items() if n == name)
            wanted = {n["latent"] for c in circuits for n in c["nodes"] if n["layer"] == layer}
            texts = latent_contexts(folder, vocab, wanted, cfg.top_contexts)
            for c in circuits:
                for n in c["nodes"]:
                    if n["layer"] == layer:
                        n["contexts"] = texts.get(n["latent"], [])
    result = {
        "format": FORMAT, "version": VERSION,
        "config": asdict(cfg),
        "model": {**{k: loaded.info.get(k) for k in ("id", "revision", "dtype", "n_layers", "d_model")},
                  "dtype_reason": compute.reason if compute is not None else "the model passed in"},
        "saes": [{"name": n, "layer": int(s.config.layers[0]), "arch": s.config.arch,
                  "n_latents": int(s.config.n_latents)} for s, n in zip(saes, names)],
        "task": {"train_pairs": sum(b.clean.shape[0] for b, _ in data.train),
                 "eval_pairs": sum(b.clean.shape[0] for b, _ in data.eval), "positions": data.n_pos,
                 "skipped": data.skipped},
        "nodes_total": sum(rows * n for n in cm.n_latents.values()),
        "eval": {"m_full": base_eval.full, "m_empty": base_eval.empty,
                 "m_unspliced": float(torch.cat([cm.unspliced_metric(b) for b, _ in data.eval]).mean())},
        "penalty": "lambda * sum of mask values, averaged over the SAEs (not divided by the node count)",
        "circuits": circuits,
        "stability": stab,
        "contexts_found": sorted(ctx),
        "seconds": {"ig_and_attribution_patching": round(ig_seconds, 2), "total": round(time.time() - t0, 2)},
    }
    progress.phase(f"writing {cfg.out}/circuit.json, circuit.md, faithfulness.png")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "circuit.json", result, indent=1)
    write_text(out / "circuit.md", markdown(result))
    plot(result, out / "faithfulness.png")
    return result


def _f(v: float) -> str:
    return "nan" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"


def markdown(result: dict[str, Any]) -> str:
    ev = result["eval"]
    sae_list = ", ".join(f"{s['name']} (layer {s['layer']})" for s in result["saes"])
    lines = [f"# Circuits: {Path(result['config']['task']).name} on {result['model']['id']}", "",
             (f"SAEs: {sae_list}; "
              f"{result['nodes_total']} nodes; eval m(M) {ev['m_full']:.3f}, m(empty) {ev['m_empty']:.3f}, "
              f"unspliced {ev['m_unspliced']:.3f}."), "",
             ("| lambda | nodes | faith. masks | faith. IG | faith. AtP | baselined masks | baselined IG | "
              "baselined AtP | completeness masks | completeness IG | completeness AtP |"),
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for c in result["circuits"]:
        m, i, a = c["masks"], c["ig"], c["attribution_patching"]
        lines.append(f"| {c['lambda']:.4g} | {c['n_nodes']} | {_f(m['faithfulness'])} | {_f(i['faithfulness'])} | "
                     f"{_f(a['faithfulness'])} | {_f(m['faithfulness_baselined'])} | "
                     f"{_f(i['faithfulness_baselined'])} | {_f(a['faithfulness_baselined'])} | "
                     f"{_f(m['completeness'])} | {_f(i['completeness'])} | {_f(a['completeness'])} |")
    stab = ", ".join(_f(s) for s in result["stability"]) or "n/a"
    lines += ["", f"Stability (fraction of each circuit's nodes in the next larger): {stab}", ""]
    for c in result["circuits"]:
        per_layer = ", ".join(f"{k} {v}" for k, v in c["per_layer"].items())
        lines += [f"## lambda {c['lambda']:.4g}: {c['n_nodes']} nodes ({per_layer})", ""]
        if not c["nodes"]:
            lines += ["(empty)", ""]
            continue
        lines += ["| SAE | layer | position | latent | IG | top context |", "|---|---:|---:|---:|---:|---|"]
        for n in c["nodes"][:50]:
            top = (n.get("contexts") or [""])[0].replace("|", "\\|").replace("\n", "\\n")
            lines.append(f"| {n['sae']} | {n['layer']} | {n['position']} | {n['latent']} | {n['ig']:.3g} | {top} |")
        if len(c["nodes"]) > 50:
            lines.append(f"| ... {len(c['nodes']) - 50} more in circuit.json | | | | | |")
        lines.append("")
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    """Faithfulness (baselined) against node count: masks vs IG vs attribution patching."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, title in ((axes[0], "faithfulness_baselined", "baselined faithfulness"),
                           (axes[1], "faithfulness", "faithfulness m(C)/m(M)")):
        for method, label, style in (("masks", "learned masks", "o-"), ("ig", "integrated gradients", "s--"),
                                     ("attribution_patching", "attribution patching", "^:")):
            pts = sorted((c["n_nodes"], c[method][key]) for c in result["circuits"])
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=label)
        ax.set_xlabel("nodes")
        ax.set_ylabel(title)
        if any(c["n_nodes"] > 0 for c in result["circuits"]):
            ax.set_xscale("symlog", linthresh=1)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(f"{Path(result['config']['task']).name}: circuits at equal size")
    fig.tight_layout()
    save_figure(fig, path, dpi=100)
