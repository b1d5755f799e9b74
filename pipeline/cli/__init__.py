"""The `gpt3` command line: one click group, one module per subcommand.

Library code raises; only this layer turns a `UserError` into one line on stderr and exit
code 2. Other exceptions are bugs and keep their traceback.
"""

from __future__ import annotations

import importlib
import sys

import click

from pipeline.errors import USER_ERROR_EXIT_CODE, UserError
from pipeline.redact import redact

SUBCOMMANDS = {
    "prepare": "pipeline.cli.prepare:prepare",
    "train": "pipeline.cli.train:train",
    "rerun": "pipeline.cli.rerun:rerun",
    "dvc-exp": "pipeline.cli.dvc_exp:dvc_exp",
    "plots": "pipeline.cli.plots:plots",
    "evaluate": "pipeline.cli.evaluate:evaluate",
    "generate": "pipeline.cli.generate:generate",
    "export": "pipeline.cli.export:export",
    "promote": "pipeline.cli.promote:promote",
    "remote": "pipeline.cli.remote:remote",
    "plan": "pipeline.cli.plan:plan",
    "slurm": "pipeline.cli.slurm:slurm",
}
"""Subcommand name -> "module:attribute" of its click command, imported on first use."""


class LazyGroup(click.Group):
    """A group that imports a subcommand's module only when it runs (keeps `--help` fast)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(SUBCOMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = SUBCOMMANDS.get(cmd_name)
        if target is None:
            return None
        module_name, attribute = target.split(":")
        return getattr(importlib.import_module(module_name), attribute)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """Train GPT-3-family models reproducibly: prepare -> train -> evaluate -> promote."""


def run_command(command: click.Command, args: list[str] | None = None) -> None:
    """Run a click command as a program: user errors become one line and exit code 2."""
    try:
        code = command.main(args=args, standalone_mode=False)
    except UserError as exc:
        click.echo(f"error: {redact(str(exc))}", err=True)  # no password of a URL
        sys.exit(USER_ERROR_EXIT_CODE)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(1)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    sys.exit(code if isinstance(code, int) else 0)


def main() -> None:
    """Console-script entry point of `gpt3`."""
    run_command(cli)
