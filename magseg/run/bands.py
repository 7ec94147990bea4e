"""Which bands of a raster predict reads: ``--bands``, else the checkpoint's ``data.bands``,
else all of them, checked against the raster and the model."""

from __future__ import annotations

from dataclasses import replace

from magseg.errors import RasterError
from magseg.io.raster import RasterReader
from magseg.run.options import PredictOptions


def band_order(reader: RasterReader, want: int, asked: tuple[int, ...] | None,
               stored: tuple[int, ...] | None) -> list[int]:
    """The 1-based bands to read, in the model's order.

    Args:
        want: the bands the model takes (``model.in_channels``).
        asked: ``--bands`` (None: not given); stored: the checkpoint's ``data.bands``.
    Raises:
        RasterError: the raster has too few bands, or the list is not ``want`` long; the
            message suggests a ``--bands`` that fits.
    """
    bands = asked or stored
    source = "--bands" if asked else "the checkpoint's data.bands"
    count = reader.file_count
    example = ",".join(str(b) for b in (range(1, want + 1) if count >= want else [1] * want))
    if bands is None:
        if count != want:
            raise RasterError(
                f"{reader.path}: has {count} band(s) but the model takes {want}; "
                f"choose {want} of them with --bands (e.g. --bands {example})"
            )
        return list(range(1, count + 1))
    if len(bands) != want:
        raise RasterError(
            f"{reader.path}: {source} lists {len(bands)} band(s) but the model takes {want}"
        )
    if max(bands) > count or min(bands) < 1:
        raise RasterError(
            f"{reader.path}: has {count} band(s) but {source} asks for bands "
            f"{','.join(map(str, bands))}; pass --bands with {want} band numbers among "
            f"1..{count} (e.g. --bands {example})"
        )
    return list(bands)


def default_bands_as_default(options: PredictOptions, reader: RasterReader, want: int,
                             stored: tuple[int, ...] | None) -> PredictOptions:
    """``options`` with ``--bands`` dropped where it names the default reading, the bands
    ``band_order`` reads without it (the checkpoint's ``data.bands`` in their order, else
    every band of the raster in order): the same pixels, so its outputs record the same
    reading (``read_options_tag``) and a re-run with or without it keeps them."""
    if options.bands is None:
        return options
    try:
        default = band_order(reader, want, None, stored)
    except RasterError:  # no default reading here: --bands is needed, and band_order checks it
        return options
    return replace(options, bands=None) if list(options.bands) == default else options
