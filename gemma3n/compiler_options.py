"""XLA options of the model's programs: the engine's prefill and decode steps
(`gemma3n.exported_programs`) and the training steps (`gemma3n.training.step`).

XLA's CPU backend hands some fusions to YNNPACK by default: reductions fused with their operands
(a norm's sum of squares, an activation row's absolute maximum before an int8/int4 product, the
backward of a broadcast product such as AltUp's correction) as well as matrix products. Small
ones pay YNNPACK's call overhead (~50 us each in a profiler trace, where XLA's own loops take
2-3 us); large ones ran 10-100x slower in a train step ([4, 1, 128, 2048] summed over its first
axis: 33 ms against 0.2 ms). Sending only the products there:
- a LoRA step at E4B widths (5 layers, 1 x 512, 2 CPUs) ran 6% faster and held 30% less
  temporary memory (1.47 -> 1.04 GB);
- an E4B int4 decode step, whose ~150 small reductions now run in XLA's loops, took 1.5 ms less
  (median of 60 alternated pairs; bench/README.md, "What else a decode step spends").
"""

from __future__ import annotations

import jax

CPU_COMPILER_OPTIONS = {'xla_cpu_experimental_ynn_fusion_type': 'LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT'}

# A training step runs its micro-batches and its loss chunks in loops. XLA first rewrites each
# product x @ wᵀ with a transposed copy of w (its canonical form), which a later pass folds
# back into the product; inside a loop, loop-invariant code motion moves that copy out of the
# loop first, so it is never folded: every frozen weight is transposed once per step and then
# read by the slower form of the product. Measured on a LoRA step at E4B widths (10 layers,
# 1 x 512, AMX Xeon, 2 CPUs): 7.5 -> 6.9 s; the unembedding's product ran at 1.04 TFLOP/s
# instead of 0.56 after a 0.52 s copy of the table.
CPU_TRAINING_OPTIONS = {'xla_disable_hlo_passes': 'while-loop-invariant-code-motion'}


def compiler_options(*, training: bool = False) -> dict[str, str]:
    """XLA options for a program compiled for the default backend (none off a CPU); `training`:
    a training step's (its loops hold the frozen weights)."""
    if jax.default_backend() != 'cpu':
        return {}
    return {**CPU_COMPILER_OPTIONS, **(CPU_TRAINING_OPTIONS if training else {})}
