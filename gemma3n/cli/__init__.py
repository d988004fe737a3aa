"""The `gemma3n` command: generate text, chat, and describe a model's architecture.

Usage:
    gemma3n generate "Why is the sky blue?"          # the demo model: random weights, gibberish
    gemma3n generate --checkpoint ~/gemma-3n-E4B-it "Why is the sky blue?"
    gemma3n chat --checkpoint ~/gemma-3n-E4B-it      # /help lists the chat commands
    gemma3n info --model e4b --context 32768         # layers, parameter counts, memory
    gemma3n serve --checkpoint ~/gemma-3n-E4B-it     # OpenAI-compatible server on 127.0.0.1:8000
    gemma3n convert --checkpoint ~/gemma-3n-E4B-it --int8 --out ~/e4b-int8   # loads without conversion

User mistakes (a missing file, a bad option value, a prompt longer than the cache, a damaged
checkpoint, ...) end the command with one line `gemma3n: error: ...` on stderr and exit status 2;
so does a request too large for the memory (refused before allocation, with the estimate, or
reported by XLA as RESOURCE_EXHAUSTED); logits that become NaN/Inf while generating end it with
one line and status 1; anything else is a bug and raises with its traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
import warnings
from collections.abc import Sequence
from pathlib import Path

import jax

from gemma3n.checkpoints.safetensors_hf import HFSoftcapWarning
from gemma3n.cli.chat import CHAT_COMMANDS, CHAT_HELP
from gemma3n.cli.console import (COMPILING_DEMO, COMPILING_PROMPT, INTERRUPTED, NUMERICAL_FAILURE,
                                 PROG, USAGE_ERROR, logger)
from gemma3n.cli.generate import default_cache_length
from gemma3n.cli.model import DEMO_MAX_NEW_TOKENS, DEMO_NOTICE, LOAD_OPTION_FLAGS, read_images
from gemma3n.cli.parser import build_parser, parse_arguments
from gemma3n.cli.sampling import sampling_method
from gemma3n.compilation import use_compilation_cache
from gemma3n.load_error import LoadError
from gemma3n.loading import USE_INT8
from gemma3n.memory import InsufficientMemoryError
from gemma3n.sharding import initialize, process_group

__all__ = ['CHAT_COMMANDS', 'CHAT_HELP', 'COMPILING_DEMO', 'COMPILING_PROMPT', 'DEMO_MAX_NEW_TOKENS',
           'DEMO_NOTICE', 'INTERRUPTED', 'NUMERICAL_FAILURE', 'USAGE_ERROR', 'build_parser',
           'default_cache_length', 'main', 'parse_arguments', 'read_images', 'sampling_method']

# The library's names of the sizes a memory error suggests lowering, as this command spells them.
MEMORY_OPTION_FLAGS = {'cache_length': '--cache-length', 'prefill_chunk': '--prefill-chunk',
                       USE_INT8: '--int8'}
XLA_OUT_OF_MEMORY = 'RESOURCE_EXHAUSTED'


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line `argv` (default: sys.argv); returns the exit status."""
    args = parse_arguments(argv)
    # Generated text may hold characters the terminal's encoding lacks: show them, don't crash.
    if hasattr(sys.stdout, 'reconfigure'):
        sys.stdout.reconfigure(errors='replace')
    _setup_logging(args.verbose)
    # load_model reports a softcap mismatch itself, naming the option that settles it.
    warnings.filterwarnings('ignore', category=HFSoftcapWarning)
    _use_compilation_cache()
    _cpu_without_checkpoint(args)
    try:
        _join_processes(args)
        return args.run(args)
    except KeyboardInterrupt:
        sys.stdout.write('\n')
        return INTERRUPTED
    except BrokenPipeError:
        return 0     # the reader (e.g. `| head`) has all it wanted
    except InsufficientMemoryError as error:
        sys.stderr.write(f'{PROG}: error: {error.describe(MEMORY_OPTION_FLAGS)}\n')
        return USAGE_ERROR
    except LoadError as error:
        sys.stderr.write(f'{PROG}: error: {error.describe(LOAD_OPTION_FLAGS)}\n')
        return USAGE_ERROR
    except (MemoryError, jax.errors.JaxRuntimeError) as error:
        # The last line of defence: what the estimates in gemma3n.memory did not foresee.
        if isinstance(error, jax.errors.JaxRuntimeError) and XLA_OUT_OF_MEMORY not in str(error):
            raise
        if args.verbose:
            traceback.print_exc()
        sys.stderr.write(f'{PROG}: error: out of memory ({_first_line(error)}): lower '
                         '--cache-length or --prefill-chunk, or use --int8 or --int4\n')
        return USAGE_ERROR
    except (ValueError, OSError, FloatingPointError) as error:
        if args.verbose:
            traceback.print_exc()
        message = ' '.join(str(error).split('\n'))
        sys.stderr.write(f'{PROG}: error: {message}\n')
        return NUMERICAL_FAILURE if isinstance(error, FloatingPointError) else USAGE_ERROR


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def _setup_logging(verbose: bool) -> None:
    # The package's logger only (the loader's included): JAX's own INFO messages are noise here.
    if not logger.handlers:     # main() may run more than once in a process
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(f'{PROG}: %(message)s'))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO if verbose else logging.WARNING)
    logger.propagate = False


def _use_compilation_cache() -> None:
    """Keeps compiled programs on disk, so that later runs skip compiling.

    Compiling is most of a run of the small demo model (measured on a 16-core CPU: 14 s for the
    first `generate`, 7 s for the next ones). JAX_COMPILATION_CACHE_DIR, when set, chooses the
    folder instead.
    """
    base = os.environ.get('XDG_CACHE_HOME') or Path.home() / '.cache'
    use_compilation_cache(Path(base) / PROG / 'jax')


def _join_processes(args: argparse.Namespace) -> None:
    """Starts `jax.distributed` when the options or the environment name several processes
    (before anything uses JAX's devices)."""
    if hasattr(args, 'coordinator'):
        initialize(process_group(args.coordinator, args.num_processes, args.process_id))


def _cpu_without_checkpoint(args: argparse.Namespace) -> None:
    """Runs the demo model and `info` on the CPU unless JAX_PLATFORMS says otherwise.

    They gain nothing from an accelerator but its start-up and compile time (measured on an H200
    machine: the demo's first `generate` took 50 s there, 14 s on its CPU), and an accelerator
    would have JAX reserve most of its memory. Must run before JAX starts its backends.
    """
    if getattr(args, 'checkpoint', None) is None and not jax.config.jax_platforms:
        jax.config.update('jax_platforms', 'cpu')
