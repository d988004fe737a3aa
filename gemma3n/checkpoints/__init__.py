"""Checkpoints: load Hugging Face / Orbax / our own files into our parameter tree, save our own
or a Hugging Face one.

Example:
    >>> from gemma3n.checkpoints import load_params, save_params
    >>> params = load_params('/ckpts/gemma-3n-E4B-it', model=Gemma3n_E4B(text_only=True), dtype=jnp.bfloat16)
    >>> save_params(params, '/ckpts/e4b.safetensors')
    >>> # A folder with config.json and tokenizer.model too, which `--checkpoint FOLDER` runs:
    >>> save_checkpoint_folder(params, model.config, '/ckpts/tuned', tokenizer_file=tokenizer.path)
    >>> # Serving with the per-layer table left on disk (E4B: 4.7 GB less in memory):
    >>> params = load_params('/ckpts/e4b.safetensors', model=model, skip_per_layer_table=True)
    >>> table = open_per_layer_table('/ckpts/e4b.safetensors', model=model)    # table[ids] -> rows
    >>> save_hf('/ckpts/e4b-hf', params, model.config, dtype='bfloat16')  # for transformers
"""

from gemma3n.checkpoints.hf_export import save_hf
from gemma3n.checkpoints.loader import Checkpoint, load_params, open_checkpoint
from gemma3n.checkpoints.native import save_checkpoint_folder, save_params
from gemma3n.checkpoints.per_layer_table import LazyPerLayerTable, open_per_layer_table
from gemma3n.checkpoints.safetensors_hf import apply_hf_softcap

__all__ = ['Checkpoint', 'LazyPerLayerTable', 'apply_hf_softcap', 'load_params', 'open_checkpoint',
           'open_per_layer_table', 'save_checkpoint_folder', 'save_hf', 'save_params']
