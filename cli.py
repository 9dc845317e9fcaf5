"""The `routesae` command: a click group whose subcommands live beside the stage they run."""

from __future__ import annotations

import errno
import sys

import click

from routesae.errors import RouteSAEError


class _OneLineErrors(click.Group):
    """Turns expected failures into one line on stderr and a non-zero exit, never a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except RouteSAEError as e:
            click.echo(f"routesae: error: {e}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("routesae: interrupted; committed work is kept, rerun the same command to resume", err=True)
            sys.exit(130)
        except OSError as e:
            if e.errno == errno.ENOSPC:
                click.echo("routesae: error: disk full; committed work is kept, free space and rerun to resume", err=True)
            else:
                click.echo(f"routesae: error: {e.strerror or e}: {e.filename or ''}".rstrip(": "), err=True)
            sys.exit(1)


@click.group(cls=_OneLineErrors, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="routesae")
def main() -> None:
    """Train and study sparse autoencoders on the residual stream of LLMs (RouteSAE first).

    harvest writes activations to a Zarr cache once; fit and eval read it back."""


def _register() -> None:
    from routesae.harvest.cli import harvest, info

    main.add_command(harvest)
    main.add_command(info)
    for module, name in (("routesae.train.cli", "fit"), ("routesae.evaluate.cli", "eval_command")):
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
