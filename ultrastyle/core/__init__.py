"""The pure core: the maths of stylization and of exact tiling, and nothing that runs a model.

The architectures as data (`arch`: width tables, layers, stages), transforms
and their statistics (`transforms`), styles, mixes and mask regions
(`styles`), colour (`color`), receptive fields (`receptive`), grid padding
(`padding`), tile plans (`tiling`; a whole image's, `plan`) and the memory
model they are sized by (`tile_memory`), what the planner knows of a runner
(`traits`), band-wise resampling (`resample`), and the canvases an image
lives in (`canvas`).

These modules import the standard library, numpy and torch, and nothing else
of ultrastyle: no model weights, runner, pipeline, backend or command line
(tests/test_imports.py holds them to it). `models` builds networks from `arch`.
"""
