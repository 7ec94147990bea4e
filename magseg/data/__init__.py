"""Datasets on disk: DeepGlobe-layout split files, scene images and masks (``scenes``), the
training cache (``cache``), and the synthetic scenes of the demo and tests (``synthetic``).

May import ``magseg.io`` for raster reads; the engine never imports this package.
"""
