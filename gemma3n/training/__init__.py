"""Fine-tuning Gemma 3n: data, loss, train step, checkpoints of the train state, the run.

Above the model, the checkpoints and the text package; below the command (`gemma3n finetune`).
See docs/architecture.md §10.
"""

from gemma3n.training.data import LossOn, read_jsonl
from gemma3n.training.finetune import FinetuneOptions, FinetuneResult, FinetuneRun
from gemma3n.training.optimizer import OptimizerConfig
from gemma3n.training.packing import TooLong
from gemma3n.training.param_split import FullFineTuning, ParamSplit
from gemma3n.training.step import TrainState, TrainSteps

__all__ = ['FinetuneOptions', 'FinetuneResult', 'FinetuneRun', 'FullFineTuning', 'LossOn',
           'OptimizerConfig', 'ParamSplit', 'TooLong', 'TrainState', 'TrainSteps', 'read_jsonl']
