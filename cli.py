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


@click.group(cls=_OneLineErrors, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="routesae")
def main() -> None:
    """Train and study sparse autoencoders on the residual stream of LLMs (RouteSAE first).

    harvest writes activations to a Zarr cache once; fit and eval read it back."""


def _register() -> None:
    from routesae.harvest.cli import harvest, info, repair

    main.add_command(harvest)
    main.add_command(info)
    main.add_command(repair)
    for module, name in (("routesae.train.cli", "fit"), ("routesae.evaluate.cli", "eval_command"),
                         ("routesae.interpret.cli", "contexts"), ("routesae.interpret.judge_cli", "interpret"),
                         ("routesae.model.cli", "export_model"),
                         ("routesae.interpret.dashboard_cli", "dashboard"),
                         ("routesae.interpret.diff_cli", "diff"),
                         ("routesae.interop.cli", "import_command"), ("routesae.interop.cli", "export"),
                         ("routesae.interpret.steer_cli", "steer"), ("routesae.circuits.data_cli", "circuit_data"),
                         ("routesae.circuits.cli", "circuit")):
        try:
            mod = __import__(module, fromlist=[name])
        except ModuleNotFoundError as e:
            if e.name != module:
                raise
            continue
        main.add_command(getattr(mod, name))


_register()

if __name__ == "__main__":
    main()
