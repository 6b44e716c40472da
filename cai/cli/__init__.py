"""The `cai` command line: one module per command group, each a thin shell over the library
(``cai.pipeline`` is the Python API behind them).

Exit codes (defined once, in ``cai.errors``): 0 every row written; 2 bad input or usage (one
line on stderr, no traceback: every ``CaiError``, every command-line usage error, every I/O
error on a named file); 3 some rows failed and are listed in the failures file named on
stderr; 130 interrupted by Ctrl-C, 143 by SIGTERM (one line on stderr, nothing else: a rerun
resumes); 1 only for a bug (with its traceback).
"""

# ruff: noqa: E402 - the quiet Ctrl-C handler goes in before the heavy imports
from __future__ import annotations

import os
import signal
import sys
import threading


def _quiet(signum: int, frame: object) -> None:
    """Ctrl-C or SIGTERM before the command has started (Python still importing): nothing to
    unwind, so one line and the usual exit code (128 + the signal), never a traceback."""
    os.write(2, b"interrupted\n")
    os._exit(128 + signum)


def _quiet_until_main() -> dict[int, signal._HANDLER]:
    """Install ``_quiet`` for SIGINT and SIGTERM where they have Python's default handlers;
    return those defaults (``main`` puts them back)."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    defaults: dict[int, signal._HANDLER] = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL}
    return {sig: signal.signal(sig, _quiet) for sig, default in defaults.items() if signal.getsignal(sig) is default}


_DEFAULTS = _quiet_until_main()  # first: the imports below take about a second

import contextlib
import errno
import gc
import importlib
import re
from collections.abc import Iterator, Sequence

import click
import typer
from rich.markup import escape

from ..errors import EXIT_BROKEN_PIPE, EXIT_BUG, EXIT_INTERRUPTED, EXIT_OK, EXIT_TERMINATED, EXIT_USAGE, CaiError
from .app import ARGV, app, err

# The commands each module registers (tests/test_startup.py checks this against `app`): the program
# imports only the module of the command it runs (`cai run` needs neither the report's nor
# the review's modules: 0.1 s of start-up), and every module for anything else (`cai --help`).
COMMAND_MODULES = {"revise": "revise", "label": "label", "eval-judge": "label", "best-of-n": "best_of_n",
                   "run": "run", "diff": "run", "report": "report", "export": "export", "review": "review",
                   "eval-refusal": "evaluate", "validate": "constitution", "render": "constitution",
                   "prepare-model": "model"}
# Each module registers its commands on `app`; this order is the order `cai --help` lists them.
COMMANDS = tuple(dict.fromkeys(COMMAND_MODULES.values()))


@contextlib.contextmanager
def _one_blas_thread() -> Iterator[None]:
    """While the program imports its command: numpy's OpenBLAS with one thread (unless the
    environment names a count). Loaded with its default, OpenBLAS starts a thread per core that
    spins a while waiting for work: 0.045 s of CPU per process, for cai's numpy work (MinHash
    arithmetic, small statistics) that needs no thread. The environment is as it was after,
    for the processes a command starts."""
    if "numpy" in sys.modules or "OPENBLAS_NUM_THREADS" in os.environ:
        yield
        return
    os.environ["OPENBLAS_NUM_THREADS"] = "1"
    try:
        yield
    finally:
        os.environ.pop("OPENBLAS_NUM_THREADS", None)


def register(args: Sequence[str] | None = None) -> None:
    """Import the command modules (each registers its commands on ``app``): with ``args``, only
    the module of the command they name, where they name one; every module otherwise."""
    named = COMMAND_MODULES.get(args[0]) if args else None
    for module in (named,) if named else COMMANDS:
        importlib.import_module(f"{__name__}.{module}")


def _restore_defaults() -> None:
    """Python's own handlers again, where ``_quiet`` still stands in for them."""
    for sig, default in _DEFAULTS.items():
        if signal.getsignal(sig) is _quiet:
            signal.signal(sig, default)


# As the program (`python -m cai.cli`, the `cai` script), `main` registers what it needs and `_quiet`
# stays until `main` runs the command; imported as a library, the whole app is registered and the
# caller's Ctrl-C is its own again once the import is done.
_PROGRAM = sys.argv[:1] == ["-m"] or os.path.basename(sys.argv[0] if sys.argv else "") in ("cai", "cai.exe")
if not _PROGRAM:
    register()
    _restore_defaults()

# typer >= 0.23 raises its own copies of click's exceptions; older typer raises click's.
_USAGE = (click.ClickException, typer.TyperException)
_ABORT = (click.exceptions.Abort, typer.Abort, KeyboardInterrupt)
_terminated: list[int] = []


def _on_sigterm(signum: int, frame: object) -> None:
    """SIGTERM is Ctrl-C (the run unwinds the same way), remembered for the exit code."""
    _terminated.append(signum)
    signal.raise_signal(signal.SIGINT)


def _line(text: str) -> str:
    """One line: runs of whitespace with a line break in them become one space."""
    return re.sub(r"\s*\n\s*", " ", text).strip()


def error_line(message: str, code: int = EXIT_USAGE) -> int:
    """Print ``error: MESSAGE`` as one line on stderr; return ``code``."""
    err.print(f"[red]error:[/red] {escape(_line(message))}", highlight=False, soft_wrap=True)
    return code


def _usage(e: click.ClickException | typer.TyperException) -> int:
    """A command-line usage error (unknown flag, missing argument, value out of range): one line
    naming the command's help; bare `cai` prints the help."""
    ctx = getattr(e, "ctx", None)
    if type(e).__name__ == "NoArgsIsHelpError" and ctx is not None:
        text = ctx.get_help()  # typer's rich help prints itself (to stdout) and returns ""
        if text:
            click.echo(text)
        return EXIT_USAGE
    code = getattr(e, "exit_code", EXIT_USAGE)
    code = EXIT_USAGE if code in (EXIT_OK, EXIT_BUG) else code
    path = str(getattr(ctx, "command_path", "") or "")
    hint = f" (see `{path} --help`)" if path else ""
    return error_line(f"{e.format_message()}{hint}", code)


def _os_error(e: OSError) -> int:
    """An I/O error no check caught first (a full disk, a file removed while running): one line
    with the file and what to do."""
    if e.errno == errno.EPIPE:  # `cai ... | head`: the reader went away; nothing to say
        with contextlib.suppress(OSError, ValueError):  # nor for Python when it flushes stdout at exit
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    where = f"{e.filename}: " if e.filename else ""
    also = f" -> {e.filename2}" if getattr(e, "filename2", None) else ""
    return error_line(f"{where}{e.strerror or e}{also} (check the path, its permissions and free space)")


# The cyclic garbage collector during a command: a run allocates millions of short-lived
# containers (requests, answers, futures, rows) that reference counting frees; with Python's
# default threshold (a collection every 700 net allocations) the collector took 15% of a run's
# CPU (1.0-1.2 s of 7 s, 10,000 calls), walking the start-up's objects and the run's long-lived
# ones again and again. The start-up's are set aside (``gc.freeze``) and the youngest generation
# is collected every 50,000 allocations: 0.1 s. Cyclic garbage is still collected, only later.
GC_THRESHOLD = (50_000, 20, 100)


@contextlib.contextmanager
def _collector_for_a_command() -> Iterator[None]:
    """``GC_THRESHOLD`` and the start-up's objects frozen while a command runs; as before after
    (``main`` may be called in a process of the caller's). As the program, whose process ends
    when ``main`` returns, everything is frozen instead: Python's collections at exit would walk
    every object of every module (0.06-0.08 s of CPU after a `cai run`) only to free memory the
    exit frees anyway (the command's own cyclic garbage is collected first)."""
    before = gc.get_threshold()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLD)
    try:
        yield
    finally:
        gc.set_threshold(*before)
        if _PROGRAM and threading.current_thread() is threading.main_thread():
            gc.collect()  # the command's own cyclic garbage goes now (a cycle may hold a file); the
            # start-up's objects are frozen, so this walks only what the command made
            gc.freeze()
        else:
            gc.unfreeze()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: run the app; return its exit code (see ``cai.errors``)."""
    with _collector_for_a_command():
        if threading.current_thread() is not threading.main_thread():
            return _main(argv)
        _restore_defaults()
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
        try:
            return _main(argv)
        finally:
            signal.signal(signal.SIGTERM, previous)


def _main(argv: Sequence[str] | None) -> int:
    rv: object = EXIT_OK
    _terminated.clear()
    try:
        # click's own main would print a blank line on Ctrl-C: the context is made and run here
        args = list(argv) if argv is not None else sys.argv[1:]
        with _one_blas_thread():
            register(args)
        cmd = typer.main.get_group(app)  # a group even with one command's module imported
        ARGV[:] = args
        with cmd.make_context(click.utils._detect_program_name(), args) as ctx:
            rv = cmd.invoke(ctx)
    except CaiError as e:
        if (label := getattr(e, "label", None)) is not None:  # not an error: a step of the run (--batch-files)
            err.print(f"[yellow]{label}:[/yellow] {escape(_line(str(e)))}", highlight=False, soft_wrap=True)
            return e.exit_code
        return error_line(str(e), e.exit_code)
    except (click.exceptions.Exit, typer.Exit) as e:
        rv = e.exit_code
    except _ABORT:
        rv = EXIT_INTERRUPTED
    except _USAGE as e:
        return _usage(e)
    except UnicodeDecodeError as e:
        return error_line(f"a file is not UTF-8 text ({e.reason} at byte {e.start}); re-save it as UTF-8")
    except OSError as e:
        return _os_error(e)
    if rv == EXIT_INTERRUPTED:
        err.print("interrupted: rerun the same command to resume", highlight=False)
        return EXIT_TERMINATED if _terminated else EXIT_INTERRUPTED
    return rv if isinstance(rv, int) else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
