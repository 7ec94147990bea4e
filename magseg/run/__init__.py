"""Runs over files and runners: predict over a raster of any size (``predict``, with its
options and result, ``options`` and ``result``), the files it writes (``outputs``, the output
kinds registry) and those already there (``existing``), the warnings before its first stage
(``input_checks``) and the bands it reads (``bands``), the stage loop over the raster
(``raster_stages``) with the raster as the engine's image and the outputs as its sink
(``streaming``), the seam score of the written outputs (``seam_record``), and the pools where
scenes run, in this process or on Ray actors (``pools``).

May import every package below it (``magseg.segmenter``, ``magseg.engine``, ``magseg.io``,
``magseg.evaluation``...); only ``magseg.cli`` imports this package. The layers are listed
once, in ``tests/test_layering.py``.
"""
