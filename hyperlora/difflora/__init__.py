"""DiffLoRA: a diffusion model that samples a person's LoRA (the pack's second generator).

The parts, each its own module (``docs/difflora.md`` explains the design and every choice the paper
leaves open):

* :mod:`.lora_space` and :mod:`.lae`: the LoRA weights autoencoder (LAE) over the low-rank factors of
  each LoRA module, with a factorisation-invariant reconstruction loss;
* :mod:`.dit` and :mod:`.diffusion`: the diffusion transformer over LAE latents, conditioned on mixed
  image features (:mod:`.condition`: ArcFace embeddings plus CLIP image features), and its sampler;
* :mod:`.format`: the model folder (``docs/difflora-format.md``), safetensors plus an architecture JSON;
* :mod:`.model`: :class:`~.model.DiffLoraModel`, the inference facade (folder -> LoRAs per seed,
  ``docs/difflora-training.md``).

Plain PyTorch, like the rest of :mod:`hyperlora`; never imports ``comfy``.
"""
