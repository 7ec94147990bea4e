"""Runs over files and runners: predict over a raster of any size (``predict``), the stage
loop with the raster as the engine's image and the outputs as its sink (``streaming``), the
seam score of the written outputs (``seam_record``), and the pools where scenes run, in this
process or on Ray actors (``pools``).

May import every package below it (``magseg.segmenter``, ``magseg.engine``, ``magseg.io``,
``magseg.evaluation``...); only ``magseg.cli`` imports this package. The layers are listed
once, in ``tests/test_layering.py``.
"""
