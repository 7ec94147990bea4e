"""File primitives: rasters through rasterio/GDAL, polygons, previews, areas of interest,
input names, provenance tags and atomic writes.

Imports only ``magseg.errors`` and ``magseg.config``: the engine, checkpoints and the
segmenter write through it, and predict over a raster lives above them, in ``magseg.run``.
"""
