"""The `cai` command line: one module per command group, each a thin shell over the library
(``cai.pipeline`` is the Python API behind them).

Every ``CaiError`` becomes one line on stderr and exit code 2; no traceback for a user's mistake.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

import click
from rich.markup import escape

from ..errors import CaiError
from .app import app, err

# Each module registers its commands on `app`; this order is the order `cai --help` lists them.
COMMANDS = ("revise", "label", "run", "report", "export", "evaluate", "constitution", "model")
for _module in COMMANDS:
    importlib.import_module(f"{__name__}.{_module}")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: run the app, turning every CaiError into one line and exit code 2."""
    try:
        app(args=list(argv) if argv is not None else None, standalone_mode=False)
    except CaiError as e:
        err.print(f"[red]error:[/red] {escape(str(e))}", highlight=False, soft_wrap=True)
        return e.exit_code
    except click.exceptions.Exit as e:
        return e.exit_code
    except click.exceptions.Abort:
        err.print("aborted")
        return 130
    except click.ClickException as e:
        e.show()
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
