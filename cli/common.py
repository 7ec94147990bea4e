"""What every command shares: the options that mean the same in each (declared once, here),
flags turned into config overrides, where scenes run, NDJSON on stdout, progress on stderr,
input lists, error reporting and exit codes."""

from __future__ import annotations

import functools
import glob
import json
import math
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import typer

from magseg.errors import CheckpointError, ConfigError, MagsegError
from magseg.io.sources import is_virtual, source_key

if TYPE_CHECKING:
    from magseg.checkpoint import Checkpoint
    from magseg.config import Config
    from magseg.run.pools import Pool
    from magseg.segmenter import Segmenter

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

F = TypeVar("F", bound=Callable[..., Any])


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item"):  # numpy / torch scalars
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _finite(value: Any) -> Any:
    # JSON has no NaN/Infinity; jq and most parsers reject them. null says "undefined".
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def emit(record: dict[str, Any]) -> None:
    """Write one JSON object as one line on stdout, flushed (for `| jq` and pipelines)."""
    sys.stdout.write(json.dumps(_finite(record), default=_json_default) + "\n")
    sys.stdout.flush()


def log(message: str, quiet: bool = False) -> None:
    """A human-readable line on stderr (silenced by --quiet), printed above any progress bars
    that are showing (tqdm clears and redraws them) rather than through them."""
    if not quiet:
        from tqdm import tqdm

        tqdm.write(message, file=sys.stderr)


def show_progress(quiet: bool) -> bool:
    """Progress bars only when stderr is a terminal and --quiet is not given."""
    return not quiet and sys.stderr.isatty()


def progress_bar(total: int | None, desc: str, quiet: bool, unit: str = "it"):
    """A tqdm bar on stderr, disabled when it should not show (see ``show_progress``)."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, disable=not show_progress(quiet),
                leave=False, dynamic_ncols=True)


def fail(message: str, code: int = EXIT_FAILED) -> None:
    """Print ``magseg: error: ...`` on stderr and exit with ``code``."""
    typer.echo(f"magseg: error: {message}", err=True)
    raise typer.Exit(code)


def handle_errors(func: F) -> F:
    """Turn magseg's exceptions into one ``magseg: error:`` line and an exit code, the same
    in every command:

    - exit 2 (usage): the run cannot start as asked. The command line, a config file or an
      override is invalid (ConfigError: unknown key, bad value, a device this machine does
      not have), or the model to run is unusable (CheckpointError: missing, empty, corrupt,
      not a magseg checkpoint, weights that do not fit its config, or a checkpoint in
      --out-dir that does not match the config asked for).
    - exit 1 (bad input): the data the run reads or writes is at fault (DataError,
      RasterError: a raster, image, mask or split file) or an output is in the way
      (OutputExistsError); in predict the other inputs are still processed.
    """

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except (ConfigError, CheckpointError) as exc:
            fail(str(exc), EXIT_USAGE)
        except typer.BadParameter as exc:  # raised by the command's own argument checks
            fail(exc.format_message(), EXIT_USAGE)
        except MagsegError as exc:
            fail(str(exc), EXIT_FAILED)
        except KeyboardInterrupt:
            typer.echo("magseg: interrupted", err=True)
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:
        return False


def check_device(device: str | None) -> None:
    """Refuse a ``--device`` that is no device or that this machine lacks (exit 2 through
    ``handle_errors``), before any checkpoint or data is read. None: the config's, checked
    where it is used."""
    if device is not None:
        from magseg.device import resolve_device

        resolve_device(device, source="--device")


def expand_inputs(items: Sequence[str], suffixes: Iterable[str], stdin=None) -> list[Path | str]:
    """Paths from files, globs, directories (their files with ``suffixes``, sorted) or ``-``
    (one path per line on stdin). Order is kept, duplicates dropped. Names GDAL opens that
    are not local files (``/vsicurl/...``, ``s3://...``: magseg.io.sources) are kept as strings,
    never globbed or checked here: a missing object fails that input with GDAL's message.

    Raises:
        typer.BadParameter: a name that is neither a file, a directory nor a matching glob.
    """
    suffixes = {s.lower() for s in suffixes}
    out: list[Path | str] = []
    seen: set[str] = set()

    def add(path: Path | str) -> None:
        key = source_key(path)
        if key not in seen:
            seen.add(key)
            out.append(path)

    for item in items:
        if item == "-":
            stream = stdin if stdin is not None else sys.stdin
            for number, line in enumerate(stream, start=1):
                line = line.strip()
                if "\0" in line:
                    raise typer.BadParameter(
                        f"line {number} of stdin holds a NUL byte; give one path per line "
                        "(e.g. `find ... -print`, not -print0)")
                if line and not line.startswith("#"):
                    add(line if is_virtual(line) else Path(line))
            continue
        if "\0" in item:
            raise typer.BadParameter(f"{item!r} holds a NUL byte; it cannot name a file")
        if is_virtual(item):
            add(item)
            continue
        path = Path(item)
        try:
            is_dir = path.is_dir()
        except OSError:  # e.g. a parent directory we may not search: reported per input later
            is_dir = False
        if is_dir:
            for child in sorted(path.iterdir()):
                if child.is_file() and child.suffix.lower() in suffixes:
                    add(child)
        elif glob.has_magic(item) and not _is_file(path):
            # A file whose name has glob characters (`br[1].tif`) is taken as named.
            matches = sorted(glob.glob(item, recursive=True))
            if not matches:
                raise typer.BadParameter(f"no file matches {item!r}")
            for match in matches:
                add(Path(match))
        else:
            # A named file is kept even if missing: it is reported as a failed input, and
            # the rest of the batch still runs.
            add(path)
    return out


# --- Options every command declares the same way -------------------------------------------
#
# One definition each (typer copies an option's definition per command, so a command
# parameter takes these objects as its default): a flag spelled the same means the same in
# train, predict and benchmark.


class Runner(str, Enum):
    """``--runner``: where the scenes run."""

    local = "local"
    ray = "ray"


SETTINGS = typer.Option(
    None, "--set", metavar="SECTION.KEY=VALUE",
    help="Config override, e.g. --set refine.points=0.25 --set engine.adaptive.max_crops=8 "
    "(repeatable; the value is YAML). A flag that sets the same key wins.")
DEVICE = typer.Option(
    None, "--device", metavar="DEVICE",
    help="cpu or cuda[:N]; sets engine.device (default: the config's).")
BATCH_SIZE = typer.Option(
    None, "--batch-size", min=1, metavar="N",
    help="Crops per backbone batch; sets engine.batch_size (default: the config's).")
QUIET = typer.Option(False, "--quiet", "-q", help="No progress or log lines on stderr.")
TTA = typer.Option(
    None, "--tta", metavar="flip|d4",
    help="Test-time augmentation: every crop's probabilities averaged over left-right flips "
    "(flip: 2 backbone runs per crop) or the 8 flips and rotations (d4); sets engine.tta. "
    "benchmark: rows with it beside the rows without.")
RUNNER = typer.Option(
    Runner.local, "--runner", metavar="local|ray",
    help="Where the scenes run. local: this process; ray: Ray actors that each load the model "
    "once (pip install 'magseg[ray]').")
RAY_ADDRESS = typer.Option(
    None, "--ray-address", metavar="ADDRESS", help="With --runner ray: a cluster to join (e.g. auto, "
    "ray://head:10001); default: a local Ray instance.")
WORKERS = typer.Option(
    None, "--workers", min=1, metavar="N",
    help="With --runner ray: number of actors (default: one per CPU).")


OVERWRITE = typer.Option(
    False, "--overwrite",
    help="Replace outputs that already exist, whoever made them. Without it: predict and "
    "vectorize keep the outputs already made for the same input and model (a re-run resumes) "
    "and fail an input whose outputs are another's; train, benchmark, export, quantize and suggest stop "
    "before any work (exit 1).")
# Adaptive mode is an engine setting: these flags set its keys, as --set would, wherever they
# are given. benchmark scores the run's engine.adaptive (when set) as a row of its own.
ADAPTIVE_THRESHOLD = typer.Option(
    None, "--adaptive-threshold", metavar="X",
    help="Adaptive mode: skip crops whose mean coarse uncertainty is below X (0 to 1); sets "
    "engine.adaptive.threshold (default: the checkpoint's). benchmark: an 'adaptive' row beside "
    "the full method.")
ADAPTIVE_MAX_CROPS = typer.Option(
    None, "--adaptive-max-crops", metavar="N",
    help="Adaptive mode: run only the N most uncertain crops of each stage; sets "
    "engine.adaptive.max_crops (default: the checkpoint's). benchmark: an 'adaptive' row beside "
    "the full method.")
DATA_ROOT = typer.Option(
    None, "--data-root", metavar="DIR",
    help="Dataset root holding the split files (DeepGlobe layout, or GeoTIFF pairs: images/, "
    "masks/); default: data.root of the run's config, else the current directory.")


def out_dir_option(holds: str, required: bool = True) -> Any:
    """``-o/--out-dir``: the directory a command writes into, created if missing. ``holds``
    says what goes there (and the default when not ``required``)."""
    return typer.Option(... if required else None, "--out-dir", "-o", metavar="DIR",
                        help=f"Directory (created if missing) for {holds}.")


def examples(commands: Sequence[str], after: Sequence[str] = ()) -> str:
    """A command's epilog: ``commands`` one per line, kept as written (click's ``\\b``
    marker stops it re-wrapping them in the middle of a flag; a terminal narrower than a
    line wraps it, a copy keeps it whole), then the paragraphs ``after``, wrapped."""
    kept = "\n".join(f"  {c}" for c in commands)
    return "Examples:\n\n\b\n" + kept + "".join(f"\n\n{p}" for p in after)


def _refuse(message: str) -> Callable[[Any], Any]:
    def callback(value: Any) -> Any:
        if value:
            fail(message, EXIT_USAGE)
        return value

    return callback


def removed_option(spelling: str, message: str, flag: bool = False) -> Any:
    """A hidden option for a spelling that went away: given, the command stops with
    ``message`` (which names what replaces it) and exit 2, before anything else runs.
    ``flag``: the old spelling took no value (the command's parameter is then a ``bool``)."""
    return typer.Option(False if flag else None, spelling, hidden=True, is_eager=True,
                        callback=_refuse(message))


def refuse_positional_arguments(ctx: typer.Context) -> None:
    """A word given on its own where the command takes no more arguments (it is declared with
    ``context_settings={"allow_extra_args": True}``, so click hands it over in ``ctx.args``)
    is what an older command line put there: a ``section.key=value`` override (given with
    --set) or a dataset root (given with --data-root). It stops the command with a message
    naming that flag, exit 2."""
    if ctx.args:
        first = ctx.args[0]
        if "=" in first:
            fail(f"{first!r} is a positional argument; config overrides are given with --set "
                 f"(--set {first})", EXIT_USAGE)
        fail(f"{first!r} is a positional argument; the dataset root is given with --data-root "
             f"(--data-root {first})", EXIT_USAGE)


REMOVED_ENGINE = removed_option(
    "--engine", "--engine is now --runner (local or ray): where the scenes run; "
    "--set engine.* configures the progressive engine")


def config_overrides(settings: Sequence[str] | None, flags: Mapping[str, Any]) -> list[str]:
    """The ``--set`` values, then ``key=value`` for each flag given (``flags``: config key
    -> the flag's value, None when not given). A flag comes last, so it wins over a
    ``--set`` of the same key."""
    return [*(settings or ()), *(f"{key}={value}" for key, value in flags.items() if value is not None)]


@dataclass(frozen=True)
class Model:
    """A checkpoint ready for ``runner``: the file as read (``loaded``), the config with its
    overrides, and the Segmenter when the scenes run in this process (None under
    ``--runner ray``, where each actor builds its own from the checkpoint)."""

    checkpoint: Path
    loaded: Checkpoint
    overrides: tuple[str, ...]
    config: Config
    segmenter: Segmenter | None
    runner: Runner
    # Under --runner ray: the bytes ``loaded`` was read from, which the actors are sent, so
    # that every process of the run holds the same weights (the file may be replaced
    # meanwhile: training renames a new best.ckpt into place).
    data: bytes | None = None

    def pool(self, workers: int | None, address: str | None, quiet: bool) -> Pool:
        """Where the scenes run: a ``LocalPool`` on this process's Segmenter, or a
        ``ScenePool`` of Ray actors (``workers``, ``address``: ``--workers``, ``--ray-address``)."""
        from magseg.run.pools import LocalPool, ScenePool

        if self.runner is Runner.local:
            assert self.segmenter is not None  # load_model builds it for a local runner
            return LocalPool(self.segmenter)
        assert self.data is not None  # load_model reads them for a Ray runner
        return ScenePool(self.data, str(self.checkpoint), list(self.overrides), workers, address, quiet=quiet)


def load_model(runner: Runner, checkpoint: Path, overrides: Sequence[str], quiet: bool = False,
               checked: bool = False) -> Model:
    """Read ``checkpoint`` and apply ``overrides`` here, whatever the runner, so a bad file
    or override stops the run (exit 2) before any scene or actor starts; build the models
    only when the scenes run in this process. What the loader noticed (a backbone-phase
    checkpoint run without its refiner) is said on stderr, one warning line each.
    ``checked``: ``check_checkpoint`` has passed the file already (its CRCs are not read again)."""
    from magseg.checkpoint import checkpoint_from_bytes, load_checkpoint, read_checkpoint_bytes, run_config
    from magseg.segmenter import Segmenter

    if runner is Runner.ray:
        data = read_checkpoint_bytes(checkpoint)
        ckpt = checkpoint_from_bytes(data, checkpoint)
        model = Model(checkpoint, ckpt, tuple(overrides), run_config(ckpt, overrides), None, runner, data)
    else:
        ckpt = load_checkpoint(checkpoint, checked=checked)
        segmenter = Segmenter.from_checkpoint(ckpt, overrides)
        model = Model(checkpoint, ckpt, tuple(overrides), segmenter.config, segmenter, runner)
    for warning in ckpt.warnings:
        log(f"magseg: warning: {warning}", quiet)
    return model


def check_checkpoint(checkpoint: Path, settings: Sequence[str] | None) -> None:
    """What can be checked of a run's model before torch is imported: the checkpoint file
    (present, a checkpoint, undamaged: ``magseg.checkpoint.check_checkpoint_file``) and the
    ``--set`` values (``key=value``, YAML). A usage error found here costs no torch import."""
    from magseg.checkpoint import check_checkpoint_file
    from magseg.config import parse_overrides

    parse_overrides(list(settings or ()))
    check_checkpoint_file(checkpoint)
