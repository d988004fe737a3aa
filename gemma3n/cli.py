"""The `gemma3n` command: generate text, chat, and describe a model's architecture.

Usage:
    gemma3n generate "Why is the sky blue?"          # the demo model: random weights, gibberish
    gemma3n generate --checkpoint ~/gemma-3n-E4B-it "Why is the sky blue?"
    gemma3n chat --checkpoint ~/gemma-3n-E4B-it      # /help lists the chat commands
    gemma3n info --model e4b --context 32768         # layers, parameter counts, memory

User mistakes (a missing file, a bad option value, a prompt longer than the cache, a damaged
checkpoint, ...) end the command with one line `gemma3n: error: ...` on stderr and exit status 2;
so does a request too large for the memory (refused before allocation, with the estimate, or
reported by XLA as RESOURCE_EXHAUSTED); logits that become NaN/Inf while generating end it with
one line and status 1; anything else is a bug and raises with its traceback.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import difflib
import functools
import logging
import math
import os
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from gemma3n import cache as kv_cache
from gemma3n import multimodal
from gemma3n.compilation import compile_notice, use_compilation_cache
from gemma3n.checkpoints import open_per_layer_table
from gemma3n.checkpoints.hf_mapping import check_hf_config, hf_final_logit_softcap
from gemma3n.checkpoints.loader import (HF_FORMAT, ORBAX_FORMAT, VISION_PREFIXES,
                                        checkpoint_format, has_vision_encoder)
from gemma3n.checkpoints.safetensors_hf import (CONFIG_FILE, HFSoftcapWarning,
                                                hf_checkpoint_config, read_hf_config)
from gemma3n.layout import load_serving, serving_nbytes, to_serving
from gemma3n.config import AttentionType
from gemma3n.memory import InsufficientMemoryError
from gemma3n.models import (DEMO_SEED, Gemma3n_E2B, Gemma3n_E4B, demo_config, e2b_config,
                            e4b_config)
from gemma3n.text import special_tokens
from gemma3n.text.chat import ChatSampler, ConversationFull
from gemma3n.text.chat_format import format_user_turn
from gemma3n.text.prefill import DEFAULT_PREFILL_CHUNK
from gemma3n.text.sampler import DEFAULT_CACHE_LENGTH, DEFAULT_MAX_OUT_LENGTH, Sampler
from gemma3n.text.sampling import Greedy, RandomSampling, SamplingMethod, TopkSampling, TopPSampling
from gemma3n.text.tokenizer import Tokenizer, default_tokenizer_path
from gemma3n.transformer import Gemma3nTransformer
from gemma3n.validation import INT32_MAX, check_int, max_seed
from gemma3n.vision.preprocess import image_file_size, load_image

PROG = 'gemma3n'
HELP_OPTIONS = ('-h', '--help')
SUGGESTION_CUTOFF = 0.8          # how alike a mistyped option and a known one must be (difflib ratio)
USAGE_ERROR = 2
NUMERICAL_FAILURE = 1        # the model's numbers broke down (NaN/Inf logits)
INTERRUPTED = 130            # the shell's status for a command stopped by Ctrl-C (128 + SIGINT)

DEMO = 'demo'
MODEL_CLASSES = {'e4b': Gemma3n_E4B, 'e2b': Gemma3n_E2B}
CONFIG_JSON_MODEL = 'config.json'    # a checkpoint's own size, neither E4B nor E2B
MODEL_NAMES = {'e4b': 'Gemma 3n E4B', 'e2b': 'Gemma 3n E2B',
               DEMO: 'the built-in demo model (Gemma 3n architecture, small, random weights)',
               CONFIG_JSON_MODEL: 'the Gemma 3n model its config.json describes'}
PRESET_CONFIGS = {'e4b': e4b_config, 'e2b': e2b_config}
DTYPES = {'bfloat16': jnp.bfloat16, 'float32': jnp.float32}
DEMO_DTYPE = 'float32'
CHECKPOINT_DTYPE = 'bfloat16'     # halves the weights' memory; the checkpoints are stored in it
DEMO_MAX_NEW_TOKENS = 32          # the demo only shows that the pipeline runs: keep it quick
TOKENIZER_FILE = 'tokenizer.model'
CHAT_PROMPT = '> '
RESET_COMMAND = '/reset'
QUIT_COMMAND = '/quit'
HELP_COMMAND = '/help'
COMMAND_PREFIX = '/'
CHAT_COMMANDS = (HELP_COMMAND, RESET_COMMAND, QUIT_COMMAND)
CHAT_HELP = ''.join(f'{PROG}: {line}\n' for line in (
    f'{HELP_COMMAND:<8} lists these commands',
    f'{RESET_COMMAND:<8} starts the conversation over',
    f'{QUIT_COMMAND:<8} ends it (so does the end of input, Ctrl-D)',
    'Ctrl-C stops an answer; what it said so far ends its turn',
    f'a message starting with {COMMAND_PREFIX} takes another one in front: '
    f'{COMMAND_PREFIX}/etc/hosts sends /etc/hosts'))
PER_LAYER_TABLE = 'embedder/per_layer_input_embedding'
COMPILING_DEMO = 'compiling the demo model (first run only)...'
COMPILING_PROMPT = 'compiling the model for this prompt length (first run only)...'
DEMO_IS_TEXT_ONLY = ('the demo model is text-only: images need a real checkpoint with a vision '
                     'encoder (--checkpoint PATH)')
# The library's names of the sizes a memory error suggests lowering, as this command spells them.
MEMORY_OPTION_FLAGS = {'cache_length': '--cache-length', 'prefill_chunk': '--prefill-chunk'}
XLA_OUT_OF_MEMORY = 'RESOURCE_EXHAUSTED'

DEMO_NOTICE = (
    f'{PROG}: no --checkpoint given: running the built-in demo model (the Gemma 3n architecture '
    'at a small size) with RANDOM weights and a small packaged tokenizer.\n'
    f'{PROG}: its output is gibberish. For real answers, download a Gemma 3n checkpoint '
    '(e.g. Hugging Face google/gemma-3n-E4B-it) and run:\n'
    f'{PROG}:     {PROG} generate --checkpoint PATH/TO/gemma-3n-E4B-it "Why is the sky blue?"')

logger = logging.getLogger(PROG)


class _Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line, like every other user error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f'{PROG}: error: {message} (see `{self.prog} --help`)\n')
        sys.exit(USAGE_ERROR)


def _whole_number(low: int, high: int) -> Callable[[str], int]:
    """An argparse type: a whole number in [low, high], checked before anything narrows it."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f'expected a whole number, got {text!r}') from None
        if value < low:
            raise argparse.ArgumentTypeError(f'must be at least {low}, got {value}')
        try:
            return check_int('value', value, low=low, high=high)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error).rstrip('.')) from None
    return parse


_positive_int = _whole_number(1, INT32_MAX)


def build_parser() -> argparse.ArgumentParser:
    """The parser of the `gemma3n` command (its subcommands set `args.run`)."""
    model_options = _Parser(add_help=False)
    group = model_options.add_argument_group('model')
    group.add_argument('--model', choices=(*MODEL_CLASSES, DEMO),
                       help='architecture (default: demo without --checkpoint, e4b with one)')
    group.add_argument('--tokenizer', metavar='PATH',
                       help=f'SentencePiece {TOKENIZER_FILE} (default: the one beside the '
                            'checkpoint; without a checkpoint the small packaged one)')
    group.add_argument('--dtype', choices=tuple(DTYPES),
                       help=f'weights and KV cache dtype (default: {CHECKPOINT_DTYPE} for '
                            f'e4b/e2b, {DEMO_DTYPE} for the demo)')
    group.add_argument('--text-only', action='store_true',
                       help='leave out the vision encoder')
    group.add_argument('--cache-length', '--context', type=_positive_int, metavar='N',
                       help=f'KV cache positions (default: {DEFAULT_CACHE_LENGTH}; generate '
                            'takes more for a longer prompt)')
    group.add_argument('-v', '--verbose', action='store_true',
                       help='timings (load, first token, tokens/s) and tracebacks of errors')

    run_options = _Parser(add_help=False)
    group = run_options.add_argument_group('weights and sampling')
    group.add_argument('--checkpoint', metavar='PATH',
                       help='Gemma 3n weights: a Hugging Face directory or .safetensors file, an '
                            'Orbax checkpoint directory, or a file saved by gemma3n')
    group.add_argument('--hf-softcap', action='store_true',
                       help='cap the final logits as the Hugging Face checkpoint\'s config.json '
                            'says (30 for Gemma 3n), as transformers does; by default they are '
                            'not capped, as in Google\'s reference. Changes sampled answers, '
                            'not greedy ones')
    group.add_argument('--int8', action='store_true',
                       help='quantize the large weights to int8 (one scale per output channel) '
                            'at load: about half the memory and faster decoding, slightly less '
                            'accurate')
    group.add_argument('--max-new-tokens', type=_positive_int, metavar='N',
                       help=f'most tokens to generate per answer (default: {DEMO_MAX_NEW_TOKENS} '
                            f'for the demo, {DEFAULT_MAX_OUT_LENGTH} otherwise)')
    group.add_argument('--temperature', type=float,
                       help='sampling temperature; 0 (or no sampling option) picks the most '
                            'likely token')
    group.add_argument('--top-k', type=_positive_int, metavar='K',
                       help='sample among the K most likely tokens')
    group.add_argument('--top-p', type=float, metavar='P',
                       help='sample among the most likely tokens holding probability P')
    group.add_argument('--seed', type=_whole_number(0, max_seed()), default=0,
                       help=f'random seed of sampling, 0 to {max_seed()} (default 0)')
    group.add_argument('--prefill-chunk', type=_positive_int, default=DEFAULT_PREFILL_CHUNK,
                       metavar='N',
                       help='feed the prompt N tokens at a time: memory grows with N, not with '
                            f'the prompt (default: {DEFAULT_PREFILL_CHUNK})')
    group.add_argument('--image', action='append', default=[], metavar='FILE',
                       help='an image for the prompt (repeatable); each `<start_of_image>` in the '
                            'prompt takes one, else they go before the text. In chat they '
                            'belong to the first message')

    parser = _Parser(prog=PROG, description='Run Google\'s Gemma 3n in JAX.')
    commands = parser.add_subparsers(dest='command', metavar='COMMAND', required=True)

    generate = commands.add_parser(
        'generate', parents=[run_options, model_options],
        help='answer one prompt, streaming the text to stdout',
        description='Answer PROMPT, streaming the text to stdout as the tokens arrive.')
    generate.add_argument('prompt', metavar='PROMPT')
    generate.add_argument('--raw', action='store_true',
                          help='feed PROMPT as it is, without the Gemma turn format '
                               '(<start_of_turn>user ... <start_of_turn>model)')
    generate.set_defaults(run=_generate)

    chat = commands.add_parser(
        'chat', parents=[run_options, model_options],
        help='talk with the model (reads messages from stdin)',
        description=f'A conversation: one message per line on stdin; {RESET_COMMAND} starts '
                    f'over, {QUIT_COMMAND} or end of input (Ctrl-D) ends it, {HELP_COMMAND} lists '
                    'the commands.')
    chat.set_defaults(run=_chat)

    info = commands.add_parser(
        'info', parents=[model_options],
        help='layers, parameter counts and memory of a model',
        description='Describe a model: its layers, parameter counts, the memory of its weights '
                    'in --dtype and of its KV cache for --context positions.')
    info.set_defaults(run=_info)
    parser.commands = commands.choices
    return parser


def parse_arguments(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The options of the command line `argv`; a mistake ends the program with one line naming it.

    (argparse alone answers `gemma3n --bogus` with "the following arguments are required".)
    """
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0].startswith('-') and argv[0] not in HELP_OPTIONS:
        option = argv[0].split('=')[0]
        owners = [name for name, command in parser.commands.items()
                  if option in command._option_string_actions]
        parser.error(f'unknown option {argv[0]}' + (
            f': options go after the command, as in `{PROG} {owners[0]} {argv[0]} ...`'
            if owners else ''))
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        command = parser.commands[args.command]
        options = [item for item in unknown if item.startswith('-')]
        if options:
            known = list(command._option_string_actions)
            close = difflib.get_close_matches(options[0].split('=')[0], known, n=1,
                                              cutoff=SUGGESTION_CUTOFF)
            command.error(f'unknown option {options[0]}'
                          + (f' (did you mean {close[0]}?)' if close else ''))
        command.error(f'unexpected argument{"s" if len(unknown) > 1 else ""} '
                      f'{" ".join(unknown)!r}' + (
                          ': quote a prompt of several words' if args.command == 'generate'
                          else ''))
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line `argv` (default: sys.argv); returns the exit status."""
    args = parse_arguments(argv)
    # Generated text may hold characters the terminal's encoding lacks: show them, don't crash.
    if hasattr(sys.stdout, 'reconfigure'):
        sys.stdout.reconfigure(errors='replace')
    _setup_logging(args.verbose)
    # _checkpoint_model reports a softcap mismatch itself, naming the option that settles it.
    warnings.filterwarnings('ignore', category=HFSoftcapWarning)
    _use_compilation_cache()
    _cpu_without_checkpoint(args)
    try:
        return args.run(args)
    except KeyboardInterrupt:
        sys.stdout.write('\n')
        return INTERRUPTED
    except BrokenPipeError:
        return 0     # the reader (e.g. `| head`) has all it wanted
    except InsufficientMemoryError as error:
        sys.stderr.write(f'{PROG}: error: {error.describe(MEMORY_OPTION_FLAGS)}\n')
        return USAGE_ERROR
    except (MemoryError, jax.errors.JaxRuntimeError) as error:
        # The last line of defence: what the estimates in gemma3n.memory did not foresee.
        if isinstance(error, jax.errors.JaxRuntimeError) and XLA_OUT_OF_MEMORY not in str(error):
            raise
        if args.verbose:
            traceback.print_exc()
        sys.stderr.write(f'{PROG}: error: out of memory ({_first_line(error)}): lower '
                         '--cache-length or --prefill-chunk, or use --int8\n')
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


def _compiling(message: str) -> Any:
    """Within the block, a first-run compile is announced on stderr (once) as it starts."""
    return compile_notice(lambda text: sys.stderr.write(f'{PROG}: {text}\n'), message)


def _cpu_without_checkpoint(args: argparse.Namespace) -> None:
    """Runs the demo model and `info` on the CPU unless JAX_PLATFORMS says otherwise.

    They gain nothing from an accelerator but its start-up and compile time (measured on an H200
    machine: the demo's first `generate` took 50 s there, 14 s on its CPU), and an accelerator
    would have JAX reserve most of its memory. Must run before JAX starts its backends.
    """
    if getattr(args, 'checkpoint', None) is None and not jax.config.jax_platforms:
        jax.config.update('jax_platforms', 'cpu')


# ---- choosing and loading the model ----------------------------------------------------------

@dataclasses.dataclass
class LoadedModel:
    """A model ready to sample from.

    Example:
        >>> loaded = load_model(build_parser().parse_args(['generate', 'Hi']))   # the demo
        >>> Sampler(model=loaded.model, params=loaded.params, tokenizer=loaded.tokenizer)
    """
    name: str
    model: Gemma3nTransformer
    params: Any
    tokenizer: Tokenizer
    per_layer_table: Any = None      # read lazily from the checkpoint; None: inside params

    @property
    def is_demo(self) -> bool:
        return self.name == DEMO


def _model_choice(args: argparse.Namespace) -> str:
    if args.model:
        return args.model
    return DEMO if getattr(args, 'checkpoint', None) is None else 'e4b'


def _dtype_choice(args: argparse.Namespace, name: str) -> str:
    return args.dtype or (DEMO_DTYPE if name == DEMO else CHECKPOINT_DTYPE)


def _checkpoint_path(args: argparse.Namespace) -> Path | None:
    if args.checkpoint is None:
        return None
    path = Path(args.checkpoint).expanduser()
    if not path.exists():
        raise FileNotFoundError(f'checkpoint not found: {path}')
    return path


def _tokenizer_path(args: argparse.Namespace, checkpoint: Path | None) -> Path:
    if args.tokenizer is not None:
        return Path(args.tokenizer).expanduser()
    if checkpoint is None:
        return default_tokenizer_path()
    directory = checkpoint if checkpoint.is_dir() else checkpoint.parent
    path = directory / TOKENIZER_FILE
    if not path.is_file():
        raise FileNotFoundError(f'no {TOKENIZER_FILE} in {directory}: pass --tokenizer PATH '
                                f'(the Gemma 3n {TOKENIZER_FILE})')
    return path


def build_model(name: str, *, dtype: Any, with_vision: bool,
                vocab_size: int | None = None) -> Gemma3nTransformer:
    """The module of model `name` ('e4b', 'e2b' or 'demo'; the demo needs the `vocab_size`)."""
    if name == DEMO:
        if with_vision:
            raise ValueError(DEMO_IS_TEXT_ONLY)
        return Gemma3nTransformer(config=demo_config(vocab_size), text_only=True, dtype=dtype)
    # The presets' configs hold the vision encoder; text_only leaves it out of the module.
    return MODEL_CLASSES[name](text_only=not with_vision, dtype=dtype)


def load_model(args: argparse.Namespace, *, with_vision: bool = False) -> LoadedModel:
    """The model, weights and tokenizer the options ask for (random weights for the demo)."""
    name = _model_choice(args)
    if with_vision:
        check_vision(args)
    checkpoint = _checkpoint_path(args)
    if checkpoint is None and name != DEMO:
        raise ValueError(f'--model {name} needs --checkpoint PATH: only the demo model runs '
                         'with random weights')
    dtype = DTYPES[_dtype_choice(args, name)]
    tokenizer = Tokenizer(_tokenizer_path(args, checkpoint))
    logger.info('tokenizer: %s (%d pieces)', tokenizer.path, tokenizer.vocab_size)
    if checkpoint is None:
        if args.hf_softcap:
            raise ValueError('--hf-softcap applies the softcap of a Hugging Face checkpoint: give '
                             'one with --checkpoint PATH')
        model = build_model(name, dtype=dtype, with_vision=with_vision,
                            vocab_size=tokenizer.vocab_size)
    else:
        name, model = _checkpoint_model(args, checkpoint, dtype=dtype, with_vision=with_vision,
                                        vocab_size=tokenizer.vocab_size)
    start = time.perf_counter()
    if checkpoint is None:
        sys.stderr.write(DEMO_NOTICE + '\n')
        tokens = jnp.full((1, 1), special_tokens.BOS, jnp.int32)
        with _compiling(COMPILING_DEMO):
            params = jax.jit(model.init)(jax.random.key(DEMO_SEED), tokens)['params']
        if args.int8:
            model, params = to_serving(model, params, quantize_int8=True, consume=True)
        logger.info('random demo weights made in %.2f s (compilation included)',
                    time.perf_counter() - start)
    else:
        # The per-layer table stays in the file (rows are read per token) where the format
        # allows; the weights are re-laid out for fast decoding (gemma3n.layout) one by one
        # as they are read, straight onto the device.
        table = None
        if checkpoint_format(checkpoint) != ORBAX_FORMAT:
            table = open_per_layer_table(checkpoint, model=model, dtype=dtype)
        model, params = load_serving(checkpoint, model, dtype=dtype, quantize_int8=args.int8,
                                     skip_per_layer_table=table is not None)
        logger.info('checkpoint %s loaded in %.2f s', checkpoint, time.perf_counter() - start)
        return LoadedModel(name=name, model=model, params=params, tokenizer=tokenizer,
                           per_layer_table=table)
    return LoadedModel(name=name, model=model, params=params, tokenizer=tokenizer)


def _checkpoint_model(args: argparse.Namespace, checkpoint: Path, *, dtype: Any,
                      with_vision: bool, vocab_size: int) -> tuple[str, Gemma3nTransformer]:
    """The model to load `checkpoint` into, and its name (`vocab_size`: the demo's).

    --model when given; else, for a Hugging Face checkpoint with a config.json, the model that
    config describes; else E4B. --hf-softcap takes the final logit softcap of config.json.
    """
    hf_config = read_hf_config(checkpoint) if checkpoint_format(checkpoint) == HF_FORMAT else None
    config_path = (checkpoint if checkpoint.is_dir() else checkpoint.parent) / CONFIG_FILE
    if hf_config is None:
        if args.hf_softcap:
            raise ValueError(f'--hf-softcap takes the softcap from the {CONFIG_FILE} of a Hugging '
                             f'Face checkpoint, and {checkpoint} has none')
        name = _model_choice(args)
        return name, build_model(name, dtype=dtype, with_vision=with_vision, vocab_size=vocab_size)
    if args.model is None:       # (check_vision has refused --image: HF checkpoints hold no SigLIP)
        config = hf_checkpoint_config(checkpoint, None)
        name = next((preset for preset, make_config in PRESET_CONFIGS.items()
                     if make_config(with_vision=False) == config), CONFIG_JSON_MODEL)
        model = Gemma3nTransformer(config=config, text_only=True, dtype=dtype)
    else:
        name = args.model
        model = build_model(name, dtype=dtype, with_vision=with_vision, vocab_size=vocab_size)
        problems = check_hf_config(hf_config, model.config)
        if problems:
            raise ValueError(f'--model {name} does not fit {config_path}: {"; ".join(problems)}. '
                             f'Leave --model out to load the model {CONFIG_FILE} describes')
    cap = hf_final_logit_softcap(hf_config)
    if args.hf_softcap:
        model = model.clone(config=dataclasses.replace(model.config, final_logit_softcap=cap))
    elif cap != model.config.final_logit_softcap:
        # Capping is monotone: only sampling sees it.
        greedy = isinstance(sampling_method(args.temperature, args.top_k, args.top_p), Greedy)
        logger.log(logging.INFO if greedy else logging.WARNING,
                   '%s caps the final logits at %s; like Google\'s reference implementation '
                   'this program does not, so sampled answers differ from transformers\' unless '
                   'you pass --hf-softcap', config_path, cap)
    return name, model


# ---- prompts, images, sampling ---------------------------------------------------------------

def sampling_method(temperature: float | None, top_k: int | None,
                    top_p: float | None) -> SamplingMethod:
    """The sampling method of the command-line options (greedy when none is given)."""
    if top_k is not None and top_p is not None:
        raise ValueError('give --top-k or --top-p, not both')
    if temperature == 0:
        if top_k is not None or top_p is not None:
            raise ValueError('--temperature 0 means greedy decoding: drop --top-k/--top-p')
        return Greedy()
    if temperature is None:
        if top_k is None and top_p is None:
            return Greedy()
        temperature = 1.0
    if top_k is not None:
        return TopkSampling(k=top_k, temperature=temperature)
    if top_p is not None:
        return TopPSampling(p=top_p, temperature=temperature)
    return RandomSampling(temperature=temperature)


def check_vision(args: argparse.Namespace) -> None:
    """ValueError unless the options choose a model with a vision encoder (checkpoint headers
    only: nothing is loaded or decoded)."""
    if args.text_only:
        raise ValueError('--image needs the vision encoder, which --text-only leaves out')
    if _model_choice(args) == DEMO:
        raise ValueError(DEMO_IS_TEXT_ONLY)
    checkpoint = _checkpoint_path(args)
    if checkpoint is not None and not has_vision_encoder(checkpoint):
        raise ValueError(f'--image needs a checkpoint with the SigLIP vision encoder; {checkpoint} '
                         f'({checkpoint_format(checkpoint)} format) holds none')


def read_images(paths: Sequence[str]) -> list[np.ndarray]:
    """The `--image` files as uint8 [H, W, 3] arrays (read before any weights, to fail early).

    Every file's header is checked (size, format) before any file is decoded.
    """
    files = [Path(path).expanduser() for path in paths]
    for path in files:
        image_file_size(path)
    return [load_image(path) for path in files]


def _image_options(args: argparse.Namespace) -> list[np.ndarray]:
    """The `--image` files, once the model is known to take images."""
    if args.image:
        check_vision(args)
    return read_images(args.image)


def default_cache_length(positions: int) -> int:
    """A cache for `positions`: DEFAULT_CACHE_LENGTH, or the power of two that fits them.

    Few distinct lengths keep the compiled programs reusable (the cache's shape is part of them).
    """
    return max(DEFAULT_CACHE_LENGTH, 1 << (positions - 1).bit_length())


def _max_new_tokens(args: argparse.Namespace, loaded: LoadedModel) -> int:
    if args.max_new_tokens is not None:
        return args.max_new_tokens
    return DEMO_MAX_NEW_TOKENS if loaded.is_demo else DEFAULT_MAX_OUT_LENGTH


class _Timer:
    """Times a stream of text pieces: the wait for the first one and the rate of the rest."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.first: float | None = None
        self.end = self.start

    def watch(self, pieces: Iterable[str]) -> Iterator[str]:
        for piece in pieces:
            if self.first is None:
                self.first = time.perf_counter()
            yield piece
        self.end = time.perf_counter()

    def report(self, num_tokens: int) -> None:
        first = self.first or self.end
        message = (f'{num_tokens} tokens in {self.end - self.start:.2f} s; first text after '
                   f'{first - self.start:.2f} s (prefill, compilation included)')
        if num_tokens > 1 and self.end > first:
            message += (f'; then {(num_tokens - 1) / (self.end - first):.1f} tokens/s '
                        '(the first decode step compiles)')
        logger.info('%s', message)


def _write(piece: str) -> None:
    sys.stdout.write(piece)
    sys.stdout.flush()


# ---- the commands ----------------------------------------------------------------------------

def _generate(args: argparse.Namespace) -> int:
    sampling = sampling_method(args.temperature, args.top_k, args.top_p)
    pictures = _image_options(args)
    loaded = load_model(args, with_vision=bool(pictures))
    max_new_tokens = _max_new_tokens(args, loaded)
    sampler = Sampler(model=loaded.model, params=loaded.params, tokenizer=loaded.tokenizer,
                      per_layer_table=loaded.per_layer_table,
                      sampling=sampling, prefill_chunk=args.prefill_chunk)
    [prompt], images = sampler.prompt_images([args.prompt], pictures or None, single=True)
    text = prompt if args.raw else format_user_turn(prompt)
    ids = loaded.tokenizer.encode(text, add_bos=True)
    positions = len(ids) + max_new_tokens
    if images is not None:
        positions += images.shape[1] * (multimodal.block_length(
            loaded.model.config.vision_encoder.num_mm_tokens_per_image) - 1)
    sampler.cache_length = args.cache_length or default_cache_length(positions)
    run = sampler.generation([ids], max_new_tokens, rng=args.seed, images=images,
                             stop_tokens=sampler.text_stop_tokens())
    timer = _Timer()
    with _compiling(COMPILING_PROMPT):
        for piece in timer.watch(sampler.stream_text(run)):
            _write(piece)
    _write('\n')
    timer.report(int(run.lengths[0]))
    return 0


def _chat(args: argparse.Namespace) -> int:
    sampling = sampling_method(args.temperature, args.top_k, args.top_p)
    pictures = _image_options(args)
    loaded = load_model(args, with_vision=bool(pictures))
    images = pictures or None
    chat = ChatSampler(model=loaded.model, params=loaded.params, tokenizer=loaded.tokenizer,
                       per_layer_table=loaded.per_layer_table,
                       sampling=sampling, cache_length=args.cache_length or DEFAULT_CACHE_LENGTH,
                       max_new_tokens=_max_new_tokens(args, loaded),
                       prefill_chunk=args.prefill_chunk)
    interactive = sys.stdin.isatty()
    if interactive:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
    sys.stderr.write(f'{PROG}: chatting with {MODEL_NAMES[loaded.name]}. {RESET_COMMAND} starts '
                     f'over; {QUIT_COMMAND} or end of input (Ctrl-D) ends; {HELP_COMMAND} lists '
                     'the commands.\n')
    key = jax.random.key(args.seed)
    turn = 0
    while True:
        try:
            line = input(CHAT_PROMPT if interactive else '')
        except EOFError:
            if interactive:
                _write('\n')
            return 0
        message = line.strip()
        if not message:
            continue
        if message == QUIT_COMMAND:
            return 0
        if message == RESET_COMMAND:
            chat.reset()
            sys.stderr.write(f'{PROG}: conversation reset\n')
            continue
        if message == HELP_COMMAND:
            sys.stderr.write(CHAT_HELP)
            continue
        if message.startswith(COMMAND_PREFIX):
            if not message.startswith(2 * COMMAND_PREFIX):
                word = message.split()[0]
                problem = ('takes nothing after it' if word in CHAT_COMMANDS
                           else f'is no command: {HELP_COMMAND} lists them')
                sys.stderr.write(f'{PROG}: {word} {problem}\n')
                continue
            message = message[len(COMMAND_PREFIX):]
        _chat_turn(chat, message, images, jax.random.fold_in(key, turn))
        images = None      # the images belong to the first message only
        turn += 1


def _chat_turn(chat: ChatSampler, message: str, images: list[np.ndarray] | None,
               rng: jax.Array) -> None:
    """Streams one answer to stdout; a turn the cache cannot hold is reported, not fatal."""
    try:
        pieces = chat.chat(message, images=images, rng=rng, stream=True)
    except ConversationFull as error:
        sys.stderr.write(f'{PROG}: error: the conversation no longer fits the cache '
                         f'({error.positions_used} of {error.cache_length} positions used): '
                         f'type {RESET_COMMAND} to start over, or run again with a larger '
                         '--cache-length\n')
        return
    except ValueError as error:
        sys.stderr.write(f'{PROG}: error: {error}\n{PROG}: type {RESET_COMMAND} to start over, or '
                         'run again with a larger --cache-length\n')
        return
    timer = _Timer()
    try:
        with _compiling(COMPILING_PROMPT):
            for piece in timer.watch(pieces):
                _write(piece)
    except KeyboardInterrupt:
        pieces.close()      # what was streamed so far ends the turn
        sys.stderr.write(f'\n{PROG}: answer interrupted after {chat.last_answer_length} tokens; '
                         f'the conversation keeps it ({RESET_COMMAND} starts over)\n')
        return
    _write('\n')
    timer.report(chat.last_answer_length)


def _info(args: argparse.Namespace) -> int:
    name = _model_choice(args)
    dtype_name = _dtype_choice(args, name)
    vocab_size = None
    if name == DEMO:
        vocab_size = Tokenizer(_tokenizer_path(args, None)).vocab_size
    with_vision = name != DEMO and not args.text_only
    model = build_model(name, dtype=DTYPES[dtype_name], with_vision=with_vision,
                        vocab_size=vocab_size)
    sys.stdout.write(describe_model(model, MODEL_NAMES[name], dtype_name,
                                    args.cache_length or DEFAULT_CACHE_LENGTH))
    return 0


# ---- the architecture summary ----------------------------------------------------------------

def _count(shapes: Any, keep: Callable[[str], bool] = lambda path: True) -> int:
    flat = flax.traverse_util.flatten_dict(shapes, sep='/')
    return sum(math.prod(leaf.shape) for path, leaf in flat.items() if keep(path))


def parameter_counts(model: Gemma3nTransformer) -> dict[str, int]:
    """Parameter counts of `model` from its shapes alone (jax.eval_shape: no memory used).

    Keys: 'text' (the decoder), 'per_layer_table' (its per-layer embedding table) and, for a
    model with a vision encoder, 'vision' (encoder and projection into the text width).
    """
    tokens = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    shapes = jax.eval_shape(model.init, jax.random.key(0), tokens)['params']
    vision = _count(shapes, lambda path: path.startswith(VISION_PREFIXES))
    counts = {'text': _count(shapes) - vision,
              'per_layer_table': _count(shapes, lambda path: path == PER_LAYER_TABLE)}
    if vision:
        counts['vision'] = vision
    return counts


def _bytes(n: int) -> str:
    for unit, size in (('GiB', 2 ** 30), ('MiB', 2 ** 20), ('KiB', 2 ** 10)):
        if n >= size:
            return f'{n:,} bytes ({n / size:.2f} {unit})'
    return f'{n:,} bytes'


def describe_model(model: Gemma3nTransformer, title: str, dtype_name: str,
                   cache_length: int) -> str:
    """A text summary: layers (kind, K/V source, cache buffer), parameter counts, memory.

    Example:
        >>> print(describe_model(Gemma3n_E4B(text_only=True), 'Gemma 3n E4B', 'bfloat16', 4096))
    """
    cfg = model.config
    sources = cfg.kv_source_layers()
    slots = kv_cache.cache_slots(cfg, cache_length)
    lines = [
        f'{title}',
        f'  {cfg.num_layers} layers, width {cfg.embed_dim}, FFN width {cfg.hidden_dim}, '
        f'{cfg.num_heads} query heads and {cfg.num_kv_heads} K/V heads of size {cfg.head_dim}, '
        f'vocabulary {cfg.num_embed:,}',
        f'  per-layer inputs of size {cfg.per_layer_input_dim}, {cfg.num_altup_inputs} AltUp '
        f'streams, LAuReL rank {cfg.laurel_rank}, sliding window {cfg.sliding_window_size}',
        f'  {cfg.num_unshared_layers} layers compute K/V; the last {cfg.num_shared_layers} reuse '
        'those of earlier layers',
        '',
        f'  layer  attention      K/V from   FFN sparsity  cache slots at {cache_length:,}',
    ]
    for i, kind in enumerate(cfg.attention_types):
        attention = 'global' if kind == AttentionType.GLOBAL else 'local sliding'
        source = 'own' if sources[i] == i else f'layer {sources[i]}'
        sparsity = f'{cfg.sparsity(i):.2f}' if cfg.sparsity(i) else '-'
        buffer = f'{slots[i]:,}' if i in slots else '-'
        lines.append(f'  {i:5d}  {attention:<13}  {source:<9}  {sparsity:<12}  {buffer}')

    counts = parameter_counts(model)
    total = counts['text'] + counts.get('vision', 0)
    itemsize = jnp.dtype(DTYPES[dtype_name]).itemsize
    cache = jax.eval_shape(functools.partial(
        model.init_cache, batch_size=1, dtype=DTYPES[dtype_name], cache_length=cache_length))
    buffers = collections.Counter(slots.values())
    lines += [
        '',
        'parameters',
        f'  text decoder               {counts["text"]:>15,}',
        f'    per-layer embedding table {counts["per_layer_table"]:>14,}',
        (f'  vision encoder + projection {counts["vision"]:>14,}' if 'vision' in counts
         else '  vision encoder             none (text-only)'),
        f'  total                      {total:>15,}',
        '',
        f'memory in {dtype_name} (the loader casts every weight to it)',
        f'  weights                    {_bytes(total * itemsize)}',
        f'    text decoder             {_bytes(counts["text"] * itemsize)}',
        f'    per-layer embedding table {_bytes(counts["per_layer_table"] * itemsize)}',
        '  held by generate/chat from a checkpoint (per-layer table left in the file):',
        f'    {dtype_name:<24} {_bytes(serving_nbytes(model, DTYPES[dtype_name]))}',
        f'    with --int8              {_bytes(serving_nbytes(model, DTYPES[dtype_name], quantize_int8=True))}',
        f'  KV cache, 1 sequence of {cache_length:,} positions: '
        f'{_bytes(kv_cache.cache_nbytes(cache))}',
        f'    {len(slots)} layers hold K/V: '
        + ', '.join(f'{count} buffers of {size:,} slots'
                    for size, count in sorted(buffers.items(), reverse=True)),
    ]
    return '\n'.join(lines) + '\n'
