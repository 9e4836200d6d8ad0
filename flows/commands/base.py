"""What every command is (`Command`) and the few helpers the commands share."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path


def _no_arguments(parser: argparse.ArgumentParser) -> None:
    """A command that takes no arguments."""


@dataclass(frozen=True)
class Command:
    """One `tlflow` command: `tlflow <name> ...` runs `run(args)`, whose return is the exit
    status. `description` opens its --help; by default its help as a sentence."""

    name: str
    help: str
    run: Callable[[argparse.Namespace], int]
    arguments: Callable[[argparse.ArgumentParser], None] = field(default=_no_arguments)
    description: str | None = None

    def register(self, commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
        """Add this command's parser to `commands` (a parser's subparsers); the parsed
        arguments carry `run` as `func`."""
        parser = commands.add_parser(self.name, help=self.help,
                                     description=self.description or sentence(self.help))
        self.arguments(parser)
        parser.set_defaults(func=self.run)
        return parser


def sentence(text: str) -> str:
    """`text` with a capital and a full stop: a help line as the opening of --help."""
    return text[:1].upper() + text[1:] + "."


def open_page(page: Path) -> None:
    """Open a written page in the web browser (`report --open`, `plots --open`)."""
    import webbrowser

    webbrowser.open(page.resolve().as_uri())


def add_json(parser: argparse.ArgumentParser, what: str = "print JSON") -> None:
    """The `--json` switch of the commands that print a table or JSON."""
    parser.add_argument("--json", action="store_true", help=what)


def add_schedule(parser: argparse.ArgumentParser, required: bool) -> None:
    """`--cron` | `--interval` and `--name`: how `serve` and `deploy` schedule the flow."""
    when = parser.add_mutually_exclusive_group(required=required)
    when.add_argument("--cron", help="a cron expression, e.g. '0 3 * * *'")
    when.add_argument("--interval", type=float, help="seconds between runs")
    parser.add_argument("--name", help="the deployment's name (default: base.project)")


MODELS = ("promoted", "probe", "finetuned")
MODEL_HELP = ("the version in prod (default; the working tree's probe when none is), or the "
              "working tree's probe or fine-tuned network")
