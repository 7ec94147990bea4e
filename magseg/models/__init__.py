"""Networks built from ``model.*``: smp backbones by name (``smp``), offline pretrained weights
(``pretrained``), the FCtL multi-context segmenter (``fctl``).

Imports only ``magseg.config`` and ``magseg.errors``; the engine runs what this package builds.
"""
