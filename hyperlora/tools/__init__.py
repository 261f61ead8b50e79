"""Stand-alone programs beside the nodes: ``python -m hyperlora.tools.queue`` (queue a workflow on a
running ComfyUI), ``python -m hyperlora.tools.download`` (fetch the released models),
``python -m hyperlora.tools.convert_workflow`` (open the authors' plugin's workflows) and
``python -m hyperlora.tools.refine`` (refine an identity on a diffusers SDXL, outside ComfyUI)."""
