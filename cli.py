"""The `routesae` command: a click group whose subcommands live beside the stage they run."""

from __future__ import annotations

import errno
import os
import signal
import sys
from typing import NoReturn

import click

from routesae.errors import RouteSAEError


class _OneLineErrors(click.Group):
    """Turns expected failures into one line on stderr and a non-zero exit, never a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except BrokenPipeError:
            _quiet_broken_pipe()
        except RouteSAEError as e:
            if os.environ.get("RANK", "0") != "0":  # a torchrun rank other than 0: rank 0 says it once
                sys.exit(1)
            _fail(f"routesae: error: {e}", 1)
        except KeyboardInterrupt as e:
            # a stage that knows what it kept says so by raising KeyboardInterrupt(message)
            said = str(e.args[0]) if e.args and e.args[0] else "committed work is kept, rerun the same command to resume"
            _fail(f"routesae: interrupted; {said}", 130)
        except OSError as e:
            if e.errno == errno.ENOSPC:
                _fail("routesae: error: disk full; committed work is kept, free space and rerun to resume", 1)
            _fail(f"routesae: error: {e.strerror or e}: {e.filename or ''}".rstrip(": "), 1)


def _fail(message: str, code: int) -> NoReturn:
    """End the command with `message` on a line of its own, whatever progress bar is showing."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):  # a bar left open by the error: end its line
        bar.leave = False
        bar.close()
    try:
        click.echo(message, err=True)
    except BrokenPipeError:
        pass
    sys.exit(code)


def _quiet_broken_pipe() -> NoReturn:
    """The reader of our output went away (`routesae info STORE | head`): stop quietly, as Unix
    tools do, and keep Python from complaining when it flushes stdout at exit."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    sys.exit(128 + signal.SIGPIPE)


# Each command's module, function and one-line help. Modules load only when their command runs or
# shows its own --help, so `routesae --help` imports neither torch nor transformers.
COMMANDS: dict[str, tuple[str, str, str]] = {
    "harvest": ("routesae.harvest.cli", "harvest", "Stream a corpus through an LLM and store multi-layer activations."),
    "info": ("routesae.harvest.cli", "info", "Describe an activation store: model, layers, tokens, size, norms."),
    "repair": ("routesae.harvest.cli", "repair", "Harvest again the shards of a store that `info --verify` found damaged."),
    "fit": ("routesae.train.cli", "fit", "Train SAEs from the activation cache (the LLM is never run)."),
    "eval": ("routesae.evaluate.cli", "eval_command", "Score SAEs: NormMSE, FVU, L0, dead latents; --splice in the LLM."),
    "contexts": ("routesae.interpret.cli", "contexts", "Per latent: firing count, histogram, top and sampled contexts."),
    "interpret": ("routesae.interpret.judge_cli", "interpret", "Ask an LLM judge about a seeded sample of latents."),
    "dashboard": ("routesae.interpret.dashboard_cli", "dashboard", "A static HTML index and page per latent, from contexts."),
    "diff": ("routesae.interpret.diff_cli", "diff", "Which latents tell two prompt sets apart, with exact tests."),
    "steer": ("routesae.interpret.steer_cli", "steer", "Continue prompts with and without edits of SAE latents."),
    "import": ("routesae.interop.cli", "import_command", "Write another toolkit's SAE as a routesae SAE folder."),
    "export": ("routesae.interop.cli", "export", "Write a routesae SAE in another toolkit's format."),
    "export-model": ("routesae.model.cli", "export_model", "Save a model (GGUF included) as a transformers folder."),
    "circuit-data": ("routesae.circuits.data_cli", "circuit_data", "Offline clean/patch task datasets for circuit finding."),
    "circuit": ("routesae.circuits.cli", "circuit", "Find circuits over the SAEs' latents with learned masks."),
    "synth": ("routesae.quality.synth_cli", "synth", "Write a synthetic store from a known sparse dictionary."),
    "synth-score": ("routesae.quality.synth_cli", "synth_score", "Score SAEs against a synthetic store's true features."),
    "probe-data": ("routesae.quality.probe_cli", "probe_data", "Run labelled prompt sets through the model into a store."),
    "probe": ("routesae.quality.probe_cli", "probe", "k-sparse probing of SAEs on a labelled store, with baselines."),
    "absorption": ("routesae.quality.absorption_cli", "absorption", "Feature absorption on the first-letter task."),
    "reproduce": ("routesae.reproduce.cli", "reproduce", "The paper's whole experiment, resumable, with intervals."),
    "selftest": ("routesae.selftest.cli", "selftest", "Check a device end to end against a CPU float32 reference; JSON out."),
}


def _with_threads(command: click.Command) -> click.Command:
    """Give a command `--threads N` and set PyTorch's CPU threads (routesae.cpu_threads) before it
    runs; parsing and --help stay free of torch."""
    if any(p.name == "threads" for p in command.params) or command.callback is None:
        return command
    run = command.callback

    def callback(*args, threads: int | None = None, **kwargs):
        from routesae.cpu_threads import apply_threads

        apply_threads(threads)
        return run(*args, **kwargs)

    command.params.append(click.Option(
        ["--threads"], type=click.IntRange(min=1), default=None, metavar="N",
        help="CPU threads for PyTorch (default: the cores this process may use, or OMP_NUM_THREADS)."))
    command.callback = callback
    return command


class _Commands(_OneLineErrors):
    """Subcommands loaded from COMMANDS on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module, attr, _ = COMMANDS[name]
        command = getattr(__import__(module, fromlist=[attr]), attr)
        return _with_threads(command)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        with formatter.section("Commands"):
            formatter.write_dl([(name, COMMANDS[name][2]) for name in self.list_commands(ctx)])


@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="routesae")
def main() -> None:
    """Train and study sparse autoencoders on the residual stream of LLMs (RouteSAE first).

    harvest writes activations to a Zarr cache once; fit and eval read it back."""


if __name__ == "__main__":
    main()
