"""The generation engine: compiled prefill and decode over a batch of KV-cache slots, the input
checks before them, and the sampling methods they apply (docs/architecture.md §7).

Modules: `engine.py` (`Engine`: the compiled functions and the checks), `batch.py` (`Batch`:
slots of one cache), `prefill.py` (how prompts are cut into chunks), `sampling.py` (the
sampling methods). Nothing is imported here: the model's modules import `gemma3n.text`, whose
package imports the sampling methods, before the model is defined.
"""
