"""The ``magseg`` command: one sub-command per file in this package.

stdout carries results only (one JSON object per line); progress and logs go to stderr.
Exit codes: 0 all good, 1 some input failed, 2 usage error.
"""

from __future__ import annotations

import sys
from typing import Any, NoReturn

import typer
from typer.core import TyperCommand, TyperGroup

from magseg import __version__

# click's ClickException, the base of the usage errors typer raises (typer re-exports only
# some of click's exceptions, and the CLI never imports click itself).
_ClickException = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")
# click's UsageError: a ClickException that knows the command it is about (``ctx``).
_UsageError = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")


class _Group(TyperGroup):
    """The magseg command group: usage errors found while parsing the command line (an
    unknown option, a missing argument, a value of the wrong type) print one
    ``magseg: error: ...`` line, as every other error does (``cli.common.fail``), not
    click's usage block and ``Error:``; exit 2."""

    def main(self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        try:
            result = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except _ClickException as exc:
            if not standalone_mode:
                raise
            if type(exc).__name__ == "NoArgsIsHelpError":  # bare `magseg`: the help, as asked
                exc.show()
                sys.exit(exc.exit_code)
            ctx = exc.ctx if isinstance(exc, _UsageError) else None
            words = list(sys.argv[1:] if args is None else args)
            command = next((w for w in words if w in self.commands), None)
            path = ctx.command_path if ctx is not None else " ".join(filter(None, ["magseg", command]))
            hint = f" (see '{path} --help')"
            typer.echo(f"magseg: error: {exc.format_message().rstrip('.')}{hint}", err=True)
            sys.exit(exc.exit_code)
        except typer.Abort:
            if not standalone_mode:
                raise
            typer.echo("magseg: interrupted", err=True)
            sys.exit(130)
        if standalone_mode:
            # Not standalone, click returns a command's exit code instead of exiting.
            sys.exit(result if isinstance(result, int) else 0)
        return result


def _argument_name(param: Any) -> str:
    return param.display_name_raw.upper() + ("..." if param.nargs != 1 else "")


class Command(TyperCommand):
    """A magseg command's help in click's plain style: arguments as ``CHECKPOINT
    INPUTS...`` in the usage line and the Arguments section (typer would write
    ``{checkpoint}`` and ``checkpoint <path>``); options show their metavars
    (``--workers N``), which every value option sets."""

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if param.param_type_name == "argument":
                name = _argument_name(param)
                pieces.append(name if param.required else f"[{name}]")
        return pieces

    def format_options(self, ctx: Any, formatter: Any) -> None:
        params = self.get_params(ctx)
        arguments = [(_argument_name(p), p.help or "") for p in params
                     if p.param_type_name == "argument" and not p.hidden]
        options = [record for p in params if p.param_type_name == "option"
                   for record in [p.get_help_record(ctx)] if record is not None]
        for title, rows in (("Arguments", arguments), ("Options", options)):
            if rows:
                with formatter.section(title):
                    formatter.write_dl(rows)


app = typer.Typer(
    cls=_Group,
    name="magseg",
    help="Progressive (MagNet-style) segmentation of ultra-high-resolution images and GeoTIFFs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def _register() -> None:
    # Each command module registers itself on `app`; heavy imports (torch, rasterio) happen
    # inside the commands so `magseg --help` stays fast.
    import importlib

    for name in ("train", "predict", "benchmark", "export", "quantize", "vectorize", "suggest", "cache"):
        try:
            importlib.import_module(f"magseg.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"magseg.cli.{name}":
                raise


def _version(value: bool) -> None:
    if value:
        typer.echo(f"magseg {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Progressive (MagNet-style) segmentation of ultra-high-resolution images and GeoTIFFs."""


def main() -> None:
    """The command line, ending in ``SystemExit`` with its status (what tests and a caller
    that goes on after it want); the ``magseg`` script is ``run``."""
    from magseg.allocator import keep_freed_memory

    keep_freed_memory()  # before the first large tensor: see magseg.allocator
    _register()
    app()


def run() -> NoReturn:
    """The ``magseg`` command: ``main``, then ``end_process`` with its exit status."""
    try:
        main()
    except SystemExit as exc:
        end_process(exc.code)
    end_process(0)  # app() always exits; this is for a main() that returns


def end_process(code: int | str | None) -> NoReturn:
    """Exit with ``code`` once the command is done, skipping the interpreter's teardown.

    Tearing down torch's modules and libraries takes about half a second (0.45 s after a
    bare ``import torch`` on a 2-core AVX2 EPYC), a sixth of a small raster's whole run.
    Nothing the command wrote depends on it: every output is complete and renamed into
    place before its record is printed. So this does what matters of a normal exit (the
    ``atexit`` handlers, e.g. logging's flush and Ray's shutdown, and the flush of
    stdout/stderr) and then ends the process with ``os._exit``. It exits the normal way
    instead while a non-daemon thread is still running (Python waits for those), for a
    message code (``sys.exit("text")``), and when stdout cannot be flushed (a closed pipe:
    Python's own exit reports that).
    """
    import atexit
    import os
    import threading

    others = [t for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon]
    if others or not (code is None or isinstance(code, int)):
        raise SystemExit(code)
    try:
        sys.stdout.flush()
        sys.stderr.flush()
        atexit._run_exitfuncs()  # runs the handlers and clears them, as the normal exit does
        sys.stdout.flush()
        sys.stderr.flush()
    except OSError:
        raise SystemExit(code) from None
    os._exit(code or 0)


if __name__ == "__main__":
    # Under `python -m magseg.cli.app` (e.g. torchrun -m) this file runs as __main__, a second
    # copy of the module: commands register on the importable magseg.cli.app, so run that.
    from magseg.cli.app import run as _run

    _run()
