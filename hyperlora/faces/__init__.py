"""Faces: insightface AntelopeV2 set-up and analysis, the released crops, and the face options.

* :mod:`.options`    the face choices and their defaults (no dependencies)
* :mod:`.setup`      where the AntelopeV2 files are, which onnxruntime provider, lazy import
* :mod:`.analysis`   detection with retry and padding, landmarks, ArcFace, face choice
* :mod:`.preprocess` face box, outline mask, gray background, CLIP / ArcFace / Base crops

Nothing here imports insightface or onnxruntime at import time.
"""
