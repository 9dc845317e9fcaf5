"""`routesae circuit`: learned-mask circuits over SAE latents at spaced layers, against IG."""

from __future__ import annotations

import click
from routesae.cli_args import rerun_model_options, sae_paths


@click.command("circuit")
@click.argument("more_saes", nargs=-1, metavar="[RUN]...")
@click.option("--task", required=True, help="Task file (JSON Lines from routesae circuit-data).")
@click.option("--saes", "--sae", "saes", multiple=True, metavar="RUN",
              help="Single-layer SAE folders, one per layer (more may follow as plain arguments).")
@click.option("--out", required=True, help="Output folder: circuit.json, circuit.md, faithfulness.png.")
@click.option("--lambdas", default="0.01:0.2:5", show_default=True,
              help="Penalties: lo:hi:n (quadratic spacing) or a comma list.")
@click.option("--steps", default=200, show_default=True, help="Adam steps per penalty.")
@click.option("--lr", default=0.1, show_default=True, help="Adam's learning rate on the mask logits.")
@click.option("--beta-max", default=200.0, show_default=True, help="Final beta of the annealed sigmoid (from 1).")
@click.option("--shared-positions", is_flag=True, help="One mask logit per latent, shared by every position.")
@click.option("--ablation", type=click.Choice(["mean", "zero"]), default="mean", show_default=True,
              help="What an off latent takes: its patch mean at that position, or zero.")
@click.option("--error", type=click.Choice(["mean", "kept", "dropped"]), default="mean", show_default=True,
              help="The SAEs' error terms: patch mean, kept from the clean run, or dropped.")
@click.option("--ig-steps", default=10, show_default=True, help="Integrated-gradients steps from patch to clean.")
@click.option("--batch-size", default=16, show_default=True, help="Prompt pairs per batch.")
@click.option("--seed", default=0, show_default=True, help="Seed of the batch order.")
@rerun_model_options
@click.option("--contexts", multiple=True, help="routesae contexts folder(s): one per SAE, or a parent of them.")
@click.option("--quiet", is_flag=True, help="No phase lines or progress bars.")
def circuit(more_saes, task, saes, out, lambdas, steps, lr, beta_max, shared_positions, ablation, error, ig_steps,
            batch_size, seed, model, device, dtype, contexts, quiet) -> None:
    """Find circuits over the SAEs' latents with learned binary masks, swept over the penalty, and
    compare them with integrated gradients and attribution patching at equal node counts."""
    from routesae.circuits.run_circuit import CircuitConfig, run_circuit

    cfg = CircuitConfig(task=task, saes=sae_paths(saes, more_saes), out=out, lambdas=lambdas, steps=steps, lr=lr,
                        beta_max=beta_max, shared_positions=shared_positions, ablation=ablation, error=error,
                        ig_steps=ig_steps, batch_size=batch_size, seed=seed, model=model, device=device,
                        dtype=dtype, progress=not quiet, contexts=list(contexts))
    result = run_circuit(cfg)
    for c in result["circuits"]:
        click.echo(f"lambda {c['lambda']:.4g}: {c['n_nodes']} nodes, faithfulness (baselined) masks "
                   f"{c['masks']['faithfulness_baselined']:.3f}, IG {c['ig']['faithfulness_baselined']:.3f}, "
                   f"AtP {c['attribution_patching']['faithfulness_baselined']:.3f}")
    click.echo(f"wrote {out}/circuit.json, circuit.md, faithfulness.png")
