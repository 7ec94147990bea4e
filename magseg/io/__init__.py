"""Files in and out: rasters through rasterio/GDAL, predict over rasters of any size,
previews, polygons, areas of interest, provenance tags and atomic writes.

May import ``magseg.engine`` and ``magseg.segmenter``; the engine never imports this package.
"""
