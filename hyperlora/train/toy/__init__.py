"""Toy-scale stand-ins for training demos and tests (all built offline, in seconds).

* :mod:`.sdxl` - a tiny random SDXL (diffusers folder layout) and its UNet.
* :mod:`.encoders` - the stand-in face analysis (AntelopeV2-shaped ONNX files) and a tiny CLIP vision folder.
* :mod:`.faces` - synthetic identities drawn by code, in the kohya folder layout.

Nothing here is imported by the node pack.
"""
