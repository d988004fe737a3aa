"""Fine-tuning Gemma 3n: data, loss, train step, checkpoints of the train state, the run.

Above the model, the checkpoints and the text package; below the command (`gemma3n finetune`).
See docs/architecture.md §9.
"""
