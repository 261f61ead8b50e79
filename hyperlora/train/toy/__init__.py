"""Toy-scale stand-ins for training demos and tests (all built offline, in seconds).

* :mod:`.sdxl` - a tiny random SDXL (diffusers folder layout) and its UNet (its tokenizers from :mod:`hyperlora.standins`).
* :mod:`hyperlora.standins` (outside training, shared with the tests) - the stand-in face analysis
  (AntelopeV2-shaped ONNX files), a tiny CLIP vision folder and tokenizer.
* :mod:`.faces` - synthetic identities drawn by code, in the kohya folder layout.

Nothing here is imported by the node pack.
"""
