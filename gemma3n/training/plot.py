"""The PNG of a run's loss curves, from its metrics JSONL (matplotlib, an optional dependency)."""

from __future__ import annotations

import json
from pathlib import Path

MATPLOTLIB_MISSING = 'the loss curve PNG needs matplotlib: pip install "gemma3n[train]"'


def pyplot():
    """matplotlib.pyplot drawing into files; ValueError with the install hint when missing
    (a run calls it before its first step, not after its last)."""
    try:
        import matplotlib
        matplotlib.use('Agg')      # files only: no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        raise ValueError(MATPLOTLIB_MISSING) from None
    return plt


def plot_losses(metrics: Path, png: Path) -> Path:
    """Draws the training (and eval) loss per step of `metrics` into `png`; returns `png`."""
    plt = pyplot()
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    train = [(r['step'], r['loss']) for r in records if 'loss' in r]
    evals = [(r['step'], r['eval_loss']) for r in records if 'eval_loss' in r]
    figure, axes = plt.subplots(figsize=(7, 4))
    if train:
        axes.plot(*zip(*train), label='train loss', linewidth=1)
    if evals:
        axes.plot(*zip(*evals), 'o-', label='eval loss')
    axes.set_xlabel('step')
    axes.set_ylabel('cross-entropy (nats per target token)')
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(png, dpi=100)
    plt.close(figure)
    return png
