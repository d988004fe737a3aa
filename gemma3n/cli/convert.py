"""`gemma3n convert`: write a checkpoint in the serving layout (`gemma3n.converted`), which the
other commands' --checkpoint then load by mapping its file."""

from __future__ import annotations

import argparse
import sys

import jax.numpy as jnp

from gemma3n.checkpoints.hf_export import check_export_directory
from gemma3n.cli.console import COMPILING_DEMO, compiling
from gemma3n.cli.model import plan_model
from gemma3n.converted import save_converted
from gemma3n.loaded_model import MODEL_NAMES

GIGABYTE = 1e9


def run_convert(args: argparse.Namespace) -> int:
    """Loads --checkpoint (the demo model without one) as the options ask, writes it to --out
    and prints what was written."""
    out = check_export_directory(args.out)      # before any weights are read
    plan = plan_model(args)
    if plan.checkpoint is None:
        with compiling(COMPILING_DEMO):
            loaded = plan.load()
    else:
        loaded = plan.load()
    with loaded:
        path = save_converted(out, loaded)
    held = f'{jnp.dtype(loaded.model.dtype).name}{f", {loaded.quantize}" if loaded.quantize else ""}'
    sys.stdout.write(f'{MODEL_NAMES[plan.name]}: {path.stat().st_size / GIGABYTE:.2f} GB in {out} '
                     f'(serving layout, {held}); run it with --checkpoint {out}\n')
    return 0
