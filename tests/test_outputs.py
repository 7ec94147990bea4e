"""The output kinds registry (magseg.run.outputs): every kind predict writes is one entry, and
the paths, the files written, the re-run checks and README's outputs table follow it."""

from __future__ import annotations

from pathlib import Path

import pytest
from geotiff import smooth_image, write_raster

from magseg.errors import ConfigError
from magseg.io.provenance import Provenance, output_tags
from magseg.io.vector import VectorOptions
from magseg.io.vector_formats import VECTOR_FORMATS
from magseg.run.outputs import OUTPUT_KINDS, OutputKind, output_kind, output_paths, possible_outputs
from magseg.run.predict import PredictOptions, predict_raster

README = Path(__file__).resolve().parents[1] / "README.md"


def _asking(kind: OutputKind, fmt: str = "gpkg") -> PredictOptions:
    """Options that ask for ``kind`` (polygons in ``fmt``) and nothing else optional."""
    if kind.asked_by is None:
        return PredictOptions()
    value = VectorOptions(fmt) if kind.asked_by == "vector" else True
    return PredictOptions(**{kind.asked_by: value})


def _readme_rows() -> list[tuple[str, str]]:
    """``(file, when)`` of each row of README's outputs table, in order."""
    text = README.read_text(encoding="utf-8")
    table = text[text.index("| file | when | content |"):].split("\n\n")[0].splitlines()[2:]
    return [tuple(cell.strip() for cell in row.strip("|").split("|")[:2]) for row in table]


def test_an_unknown_output_kind_is_an_error_naming_the_kinds():
    with pytest.raises(ConfigError) as caught:
        output_kind("uncertainity")
    assert "unknown output kind 'uncertainity'" in str(caught.value)
    assert ", ".join(k.name for k in OUTPUT_KINDS) in str(caught.value)
    assert output_kind("probs") is OUTPUT_KINDS[1]


def test_a_kind_is_made_one_way_exactly():
    with pytest.raises(ValueError, match="one of them"):
        OutputKind("x", ".x", None)
    with pytest.raises(ValueError, match="one of them"):
        OutputKind("x", ".x", None, writer=lambda t, o: None, make=lambda t, o: None)


def test_kind_names_are_unique_and_the_vector_formats_are_listed_once():
    names = [kind.name for kind in OUTPUT_KINDS]
    assert len(set(names)) == len(names) and names[0] == "labels"
    assert output_kind("vector").suffix == {name: f.suffix for name, f in VECTOR_FORMATS.items()}


@pytest.mark.parametrize("kind", OUTPUT_KINDS, ids=lambda k: k.name)
def test_the_paths_of_a_kind_follow_its_entry(kind):
    always = [k.name for k in OUTPUT_KINDS if k.asked_by is None]
    for fmt in VECTOR_FORMATS if not isinstance(kind.suffix, str) else ["gpkg"]:
        paths = output_paths("/data/a.b.tif", "/out", _asking(kind, fmt))
        # registry order, the always-written kinds and this one
        assert list(paths) == [k.name for k in OUTPUT_KINDS if k.name in always or k is kind]
        suffix = kind.suffix if isinstance(kind.suffix, str) else VECTOR_FORMATS[fmt].suffix
        assert paths[kind.name] == Path("/out") / f"a.b{suffix}"
    possible = possible_outputs("/data/a.b.tif", "/out", PredictOptions())
    names = kind.all_suffixes()
    assert all(possible[key] == Path("/out") / f"a.b{suffix}" for key, suffix in names.items())


def test_a_stem_names_every_output():
    options = PredictOptions(probs=True, stem="result", vector=VectorOptions("fgb"))
    assert {k: p.name for k, p in output_paths("/data/x.tif", "/o", options).items()} == {
        "labels": "result.tif", "probs": "result_probs.tif", "vector": "result.fgb",
        "categories": "result.tif.aux.xml", "style": "result.qml"}


def test_the_readme_outputs_table_lists_the_registry_in_order():
    rows = _readme_rows()
    assert len(rows) == len(OUTPUT_KINDS), rows
    for (file, when), kind in zip(rows, OUTPUT_KINDS):
        suffixes = list(kind.all_suffixes().values())
        assert file == f"`<stem>{suffixes[0]}`", (kind.name, file)
        if kind.asked_by is None:
            assert when == "always", (kind.name, when)
        else:
            assert when.startswith(f"`{kind.flag}"), (kind.name, when)
        for suffix in suffixes[1:]:  # the other formats are named beside the first
            assert f"`<stem>{suffix}`" in when, (kind.name, when)


@pytest.mark.parametrize("kind", OUTPUT_KINDS, ids=lambda k: k.name)
def test_every_kind_asked_is_written_and_says_which_model_made_it(tmp_path, fitted_checkpoint, kind):
    from magseg.segmenter import Segmenter

    segmenter = Segmenter.from_checkpoint(fitted_checkpoint)
    path = write_raster(tmp_path / "s.tif", smooth_image(3, 40, 50))
    options = _asking(kind)
    result = predict_raster(segmenter, path, tmp_path / "out", options)
    assert result.status == "ok"
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert written == sorted(p.name for p in output_paths(path, tmp_path / "out", options).values())
    target = result.outputs[kind.name]
    assert target.stat().st_size > 0
    if kind.tagged:
        assert Provenance.from_tags(output_tags(target)).same_model(segmenter.provenance)
    # a re-run keeps it: every kind there is recognised as this model's
    again = predict_raster(segmenter, path, tmp_path / "out", options)
    assert again.status == "skipped"


def test_the_geotiffs_are_the_kinds_with_cog_resampling_and_class_ids_are_never_blended():
    assert {k.name for k in OUTPUT_KINDS if k.cog_resampling} == {
        k.name for k in OUTPUT_KINDS if isinstance(k.suffix, str) and k.suffix.endswith(".tif")}
    assert output_kind("labels").cog_resampling == "MODE"


def test_each_asked_kind_has_its_predict_option_and_cli_flag():
    import dataclasses

    import magseg.cli.predict  # noqa: F401  (registers the command)
    import typer.main
    from magseg.cli.app import app

    command = typer.main.get_command(app).commands["predict"]
    flags = {opt for param in command.params for opt in param.opts}
    fields = {f.name for f in dataclasses.fields(PredictOptions)}
    for kind in OUTPUT_KINDS:
        if kind.asked_by is not None:
            assert kind.asked_by in fields and kind.flag in flags, kind.name
    # --vector offers the formats of magseg.io.vector_formats, and nothing else
    from typer.testing import CliRunner

    refused = CliRunner().invoke(app, ["predict", "m.ckpt", "x.tif", "-o", "out", "--vector", "shp"])
    assert refused.exit_code == 2
    assert all(f"'{name}'" in refused.output for name in VECTOR_FORMATS), refused.output
