"""Integrations with other libraries, one module each, imported on demand (nothing is imported here).

* :mod:`sparsekit.integrations.transformers` -- Hugging Face transformers: the ``"sparsekit"``
  quantization method (``AutoModel*.from_pretrained`` rebuilds the compressed layers) and
  :func:`~sparsekit.integrations.transformers.save_pretrained`.  Install with ``pip install 'sparsekit[hf]'``.
"""
