"""Checkpoints: load Hugging Face / Orbax / our own files into our parameter tree, save our own.

Example:
    >>> from gemma3n.checkpoints import load_params, save_params
    >>> params = load_params('/ckpts/gemma-3n-E4B-it', model=Gemma3n_E4B(text_only=True), dtype=jnp.bfloat16)
    >>> save_params(params, '/ckpts/e4b.safetensors')
"""

from gemma3n.checkpoints.loader import load_params
from gemma3n.checkpoints.native import save_params
from gemma3n.checkpoints.safetensors_hf import apply_hf_softcap

__all__ = ['load_params', 'save_params', 'apply_hf_softcap']
