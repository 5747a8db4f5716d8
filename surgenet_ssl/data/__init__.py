"""Surgical video data: source registry, prepare (videos/frames -> WebDataset shards), streaming mixtures, demo.

Modules: ``sources`` (the 14 sources and 7 mixtures), ``video`` (video decoding), ``decode`` (image and frame
decoding: reduced-size JPEG, any mode -> RGB), ``shards`` (tar shards + manifest), ``preparation`` (parallel,
resumable prepare), ``mixture`` (dataset config -> sources and weights), ``loader`` (the training stream), ``demo``
(the embedded synthetic dataset), ``augment`` (DINO multi-crop). Import the module you need; this package imports
nothing heavy on its own.
"""
