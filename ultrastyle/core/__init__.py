"""The pure core: the maths of stylization and of exact tiling, and nothing that runs a model.

Transforms and their statistics (`transforms`), styles, mixes and mask
regions (`styles`), colour (`color`), receptive fields (`receptive`), grid
padding (`padding`), tile plans (`tiling`) and the memory model they are sized
by (`tile_memory`), and the canvases an image lives in (`canvas`).

These modules import the standard library, numpy, torch and the architecture
description (`models.spec`), and nothing else of ultrastyle: no runner, no
pipeline, no backend, no command line (tests/test_imports.py holds them to it).
"""
