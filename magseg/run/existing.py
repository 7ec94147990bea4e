"""The files already at an input's output names, before and after predict writes: what a
killed run left (removed), what this run makes, keeps or remakes, what another model made
(refused, or removed with --overwrite). Whose a file is, its provenance tags say
(magseg.io.provenance); which files an input has, magseg.run.outputs."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from pathlib import Path

from magseg.errors import OutputExistsError, RasterError
from magseg.io.atomic import remove_stale_partials
from magseg.io.provenance import Provenance, output_tags
from magseg.io.sources import is_virtual
from magseg.io.vector_formats import VECTOR_OPTIONS_TAG, options_tag
from magseg.run.options import READ_OPTIONS_TAG, PredictOptions, describe_read, read_options_tag
from magseg.run.outputs import output_kind, possible_outputs, tiled_path


def remove_leftovers(outputs: Mapping[str, Path], scratch_dir: Path | None) -> None:
    """Remove what runs that were killed (SIGKILL, the OOM killer) left for this input's
    ``outputs`` (``possible_outputs``): temporaries, COG intermediates and the stage-map
    scratch folder, whatever this run then decides (a run that skips cleans up too). A
    live run's files are kept (magseg.io.atomic.remove_stale_partials)."""
    labels = outputs["labels"]
    for target in outputs.values():
        remove_stale_partials(target)
        remove_stale_partials(tiled_path(target))
    remove_stale_partials((Path(scratch_dir) if scratch_dir else labels.parent) / f"{labels.name}.scratch")


def prepare_outputs(path: str | Path, out_dir: str | Path, targets: Mapping[str, Path],
                    options: PredictOptions, mine: Provenance) -> tuple[dict[str, Path], set[str]]:
    """The outputs to make and those of them that replace a file (``outputs_to_make``),
    after refusing targets that would replace the input or are directories; ``out_dir`` is
    created when there is anything to make. ``mine``: this run's model."""
    if not is_virtual(path) and Path(path).exists() and targets["labels"].resolve() == Path(path).resolve():
        raise RasterError(f"{path}: the output would replace the input; choose another --out-dir")
    for target in targets.values():
        if target.is_dir():
            raise RasterError(f"{path}: its output {target} is a directory; remove or rename it, "
                              "or choose another --out-dir")
    todo, replace = outputs_to_make(targets, options, mine)
    if todo and not options.overwrite:
        # The class map is made now: no companion of another model may stay beside it.
        check_companions(companions(path, out_dir, targets, options), mine, options)
    if todo:
        try:
            Path(out_dir).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RasterError(f"cannot create output directory {out_dir}: {exc.strerror}") from None
    return todo, replace


def outputs_to_make(targets: Mapping[str, Path], options: PredictOptions,
                    mine: Provenance) -> tuple[dict[str, Path], set[str]]:
    """The outputs this run writes: all with ``--overwrite``; else those missing, and a
    vector layer this model made with other polygon options (or that cannot say which: a
    GeoJSON), made again from the class map (the second value: the kinds it replaces).
    Every other existing output must be this model's (``existing_state``), or the input fails."""
    if options.overwrite:
        return dict(targets), set()
    todo = {k: p for k, p in targets.items() if not p.exists()}
    if "labels" not in todo:  # the untagged kinds describe the class map: made with it only
        todo = {k: p for k, p in todo.items() if output_kind(k).tagged}
    replace = set()
    for kind, path in targets.items():
        if kind in todo or not output_kind(kind).tagged:
            continue
        state = existing_state(kind, path, mine, options)
        if state == "remake":
            todo[kind] = path
            replace.add(kind)
        elif state != "mine":
            raise OutputExistsError(state)
    return todo, replace


def existing_state(kind: str, path: Path, mine: Provenance, options: PredictOptions) -> str:
    """``"mine"`` when the output at ``path`` carries this run's checkpoint and config
    digests (and, for polygons, this run's options), ``"remake"`` for polygons of this model
    with other options or none recorded, else the reason it cannot be kept (a message)."""
    tags = output_tags(path)
    if tags is None:
        return (f"{path} is in the way: it is not a readable {path.suffix} file, so not an output "
                "of magseg; move it away, or pass --overwrite to replace it")
    theirs = Provenance.from_tags(tags)
    if theirs is None and not (kind == "vector" and path.suffix.lower() == ".geojson"):
        return (f"{path} is in the way: it has no magseg provenance tags, so not an output of "
                "this model; move it away, or pass --overwrite to replace it")
    if theirs is not None and not theirs.same_model(mine):
        return (f"{path} was made by another model ({theirs.describe()}); this run is "
                f"{mine.describe()}. Pass --overwrite to replace it, or choose another --out-dir")
    read, theirs_read = read_options_tag(options), _read_of(tags)
    if theirs is not None and theirs_read != read:
        if kind == "vector":  # polygons of another class map: made again from this one's
            return "remake"
        return (f"{path} was made from another reading of the input ({describe_read(theirs_read)}); "
                f"this run reads {describe_read(read)}. Pass --overwrite to replace it, or choose "
                "another --out-dir")
    if kind == "vector":
        assert options.vector is not None
        if theirs is None or tags.get(VECTOR_OPTIONS_TAG) != options_tag(options.vector):
            return "remake"
    return "mine"


def _read_of(tags: Mapping[str, str]) -> str:
    """The read options an output's tags record (an output from before they were recorded:
    the defaults)."""
    return tags.get(READ_OPTIONS_TAG) or read_options_tag(PredictOptions())


def _same_output(tags: Mapping[str, str] | None, mine: Provenance, options: PredictOptions) -> bool:
    """Whether an output with these tags is this run's: the same model, the same reading."""
    theirs = Provenance.from_tags(tags or {})
    return (theirs is not None and theirs.same_model(mine)
            and _read_of(tags or {}) == read_options_tag(options))


def companions(path: str | Path, out_dir: str | Path, targets: Mapping[str, Path],
               options: PredictOptions) -> dict[str, Path]:
    """The tagged files an earlier run may have made for this input that this run does not
    write (extras not asked for now, polygons in another format), by kind."""
    wanted = set(targets.values())
    return {key: candidate for key, candidate in possible_outputs(path, out_dir, options).items()
            if output_kind(key.split()[0]).tagged and candidate not in wanted and candidate.is_file()}


def check_companions(companions: Mapping[str, Path], mine: Provenance, options: PredictOptions) -> None:
    """Refuse to write a class map beside another model's outputs of the same input, or
    beside outputs of another reading of it (bands, --nodata, area)."""
    for companion in companions.values():
        tags = output_tags(companion) or {}
        theirs = Provenance.from_tags(tags)
        if theirs is None or _same_output(tags, mine, options):
            continue
        made = (f"by another model ({theirs.describe()})" if not theirs.same_model(mine) else
                f"from another reading of the input ({describe_read(_read_of(tags))})")
        raise OutputExistsError(
            f"{companion} was made {made} and would stay beside this run's outputs; pass "
            "--overwrite to replace this input's outputs and remove it, or choose another --out-dir")


def remove_stale(path: str | Path, out_dir: str | Path, targets: Mapping[str, Path],
                 options: PredictOptions, mine: Provenance) -> list[Path]:
    """After --overwrite made this input's outputs: remove the other files of this input
    (``companions``) that are not this run's (this model's digests and reading of the
    input). Returns the removed paths."""
    removed = []
    for companion in companions(path, out_dir, targets, options).values():
        if not _same_output(output_tags(companion), mine, options):
            with contextlib.suppress(FileNotFoundError):
                companion.unlink()
                removed.append(companion)
    return removed
