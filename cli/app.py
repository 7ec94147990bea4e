"""The ``magseg`` command: one sub-command per file in this package.

stdout carries results only (one JSON object per line); progress and logs go to stderr.
Exit codes: 0 all good, 1 some input failed, 2 usage error.
"""

from __future__ import annotations

import typer

from magseg import __version__

app = typer.Typer(
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

    for name in ("train", "predict", "benchmark", "suggest"):
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
    from magseg.allocator import keep_freed_memory

    keep_freed_memory()  # before the first large tensor: see magseg.allocator
    _register()
    app()


if __name__ == "__main__":
    # Under `python -m magseg.cli.app` (e.g. torchrun -m) this file runs as __main__, a second
    # copy of the module: commands register on the importable magseg.cli.app, so run that.
    from magseg.cli.app import main as _main

    _main()
