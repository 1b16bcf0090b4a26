"""Integrations with other libraries, one module each, imported on demand (nothing is imported here).

* :mod:`sparsekit.integrations.transformers` -- Hugging Face transformers: the ``"sparsekit"``
  quantization method (``AutoModel*.from_pretrained`` rebuilds the compressed layers) and
  :func:`~sparsekit.integrations.transformers.save_pretrained`.  Install with ``pip install 'sparsekit[hf]'``.
* :mod:`sparsekit.integrations.diffusers` -- diffusers video transformers and pipelines:
  :func:`~sparsekit.integrations.diffusers.apply_draft_attention` makes their video self-attention
  DraftAttention (block-sparse), :func:`~sparsekit.integrations.diffusers.remove_draft_attention` undoes it.
  Install with ``pip install 'sparsekit[diffusers]'``.
"""
