"""The progressive engine: everything that turns one in-memory image into class maps.

    stages     the stage loop, written once: ``segment`` (whole image in memory) and the
               streamed stages over a raster share it (``run_stages``)
    refine     the refine step: crop selection, picked pixels, R's values into Y
    pyramid    stage sizes, crop boxes, cutting and stitching
    resample   antialiased resizing of any window of a stage, bit-identical to the whole map
    certainty  top-1 minus top-2, the error map and its top K per crop
    pointrend_reference  PointRend's top-K, ``point_sample`` and scatter as stated: the
               reference the tests check the engine against, not on its path
    refiner    the refinement module; backbone: the Backbone contract and how to call one
    precision  fp32/bf16/fp16, autocast, the hardware description of a run

Imports only torch, numpy, OpenCV and ``magseg.config``, ``magseg.errors``, ``magseg.cache``
(where the graph cache is), and from ``magseg.io`` the atomic writes and provenance of
exported graphs (``runtime``): never raster
I/O, so it runs wherever torch does, and never ``magseg.models``: it runs what was built.
"""
