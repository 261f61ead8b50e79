"""Training HyperLoRA models (``python -m hyperlora.train``); needs the ``[train]`` extra.

The node pack never imports this package."""
