"""`gemma3n export`: write a model as a Hugging Face checkpoint that `transformers` loads."""

from __future__ import annotations

import argparse
import shutil
import sys

from gemma3n.checkpoints.hf_export import check_export_directory, save_hf
from gemma3n.cli.console import COMPILING_DEMO, compiling, logger
from gemma3n.cli.model import plan_model, read_adapter
from gemma3n.training.lora import apply_adapter
from gemma3n.loaded_model import MODEL_NAMES
from gemma3n.loading import TOKENIZER_FILE
from gemma3n.model_choice import DTYPES

GIGABYTE = 1e9


def run_export(args: argparse.Namespace) -> int:
    """Exports the text decoder of --checkpoint (the demo model without one) to --out, with the
    tokenizer beside it, and prints what was written."""
    out = check_export_directory(args.out)      # before any weights are read
    plan = plan_model(args)
    adapter = read_adapter(args, plan.model.config)
    # An export keeps the weights' own dtype unless --dtype asks: it is no place to lose bits.
    dtype = None if args.dtype is None else DTYPES[args.dtype]
    if plan.checkpoint is None:
        with compiling(COMPILING_DEMO):
            params = plan.tree()
    else:
        params = plan.tree(dtype=dtype)
    if adapter is not None:
        params = apply_adapter(adapter, plan.model.config, params, merge=True)
    files = save_hf(out, params, plan.model.config, dtype=dtype)
    shutil.copyfile(plan.tokenizer.path, out / TOKENIZER_FILE)
    size = sum(path.stat().st_size for path in files)
    logger.info('tokenizer %s copied', plan.tokenizer.path)
    sys.stdout.write(f'{MODEL_NAMES[plan.name]}: {len(files)} files, {size / GIGABYTE:.2f} GB in '
                     f'{out} (Hugging Face Gemma3nForCausalLM)\n')
    return 0
