"""The command line of `gemma3n`: its commands and options, and one-line usage errors."""

from __future__ import annotations

import argparse
import difflib
import sys
from collections.abc import Callable, Sequence

from gemma3n.cli.chat import HELP_COMMAND, QUIT_COMMAND, RESET_COMMAND, run_chat
from gemma3n.cli.console import PROG, USAGE_ERROR
from gemma3n.cli.convert import run_convert
from gemma3n.cli.export import run_export
from gemma3n.cli.finetune import add_finetune_options, run_finetune
from gemma3n.cli.generate import run_generate
from gemma3n.cli.info import run_info
from gemma3n.cli.serve import (DEFAULT_HOST, DEFAULT_MAX_BATCH, DEFAULT_MAX_WAITING, DEFAULT_PORT,
                               DEFAULT_SHUTDOWN_S, run_serve)
from gemma3n.cli.model import DEMO_MAX_NEW_TOKENS
from gemma3n.loaded_model import DEMO
from gemma3n.loading import TOKENIZER_FILE
from gemma3n.model_choice import CHECKPOINT_DTYPE, DEMO_DTYPE, DTYPES, MODEL_CLASSES
from gemma3n.engine.prefill import DEFAULT_PREFILL_CHUNK
from gemma3n.sharding.distributed import COORDINATOR_ENV, NUM_PROCESSES_ENV, PROCESS_ID_ENV
from gemma3n.sharding.mesh import SPEC_EXAMPLE, parse_mesh_spec
from gemma3n.text.sampler import DEFAULT_CACHE_LENGTH, DEFAULT_MAX_OUT_LENGTH
from gemma3n.validation import INT32_MAX, check_int, max_seed

HELP_OPTIONS = ('-h', '--help')
MAX_PORT = 65535
SUGGESTION_CUTOFF = 0.8          # how alike a mistyped option and a known one must be (difflib ratio)


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


def _mesh_spec(text: str) -> str:
    """An argparse type: a mesh spec, checked before anything starts (devices are counted
    once they are known)."""
    try:
        parse_mesh_spec(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error).rstrip('.')) from None
    return text


def _model_options(*, running: bool, dtype_help: str = 'dtype of the exported weights '
                                                       '(default: as stored)'
                   ) -> argparse.ArgumentParser:
    """The options choosing the model; `running`: also those of a model that runs (the vision
    encoder, the cache); `dtype_help`: --dtype's help where it does not run."""
    options = _Parser(add_help=False)
    group = options.add_argument_group('model')
    group.add_argument('--model', choices=(*MODEL_CLASSES, DEMO),
                       help='architecture (default: demo without --checkpoint, e4b with one)')
    group.add_argument('--tokenizer', metavar='PATH',
                       help=f'SentencePiece {TOKENIZER_FILE} (default: the one beside the '
                            'checkpoint; without a checkpoint the small packaged one)')
    group.add_argument('--dtype', choices=tuple(DTYPES),
                       help=f'weights and KV cache dtype (default: {CHECKPOINT_DTYPE} for '
                            f'e4b/e2b, {DEMO_DTYPE} for the demo)' if running else dtype_help)
    if running:
        group.add_argument('--text-only', action='store_true',
                           help='leave out the vision and audio towers')
        group.add_argument('--cache-length', '--context', type=_positive_int, metavar='N',
                           help=f'KV cache positions (default: {DEFAULT_CACHE_LENGTH}; generate '
                                'takes more for a longer prompt)')
    group.add_argument('-v', '--verbose', action='store_true',
                       help='timings (load, first token, tokens/s) and tracebacks of errors')
    return options


def _add_checkpoint_options(group: argparse._ArgumentGroup) -> None:
    """--checkpoint and --hf-softcap, which every command reading weights takes."""
    group.add_argument('--checkpoint', metavar='PATH',
                       help='Gemma 3n weights: a Hugging Face directory or .safetensors file, an '
                            'Orbax checkpoint directory, or a file or folder gemma3n wrote '
                            '(finetune, convert)')
    group.add_argument('--hf-softcap', action='store_true',
                       help='cap the final logits as the Hugging Face checkpoint\'s config.json '
                            'says (30 for Gemma 3n), as transformers does; by default they are '
                            'not capped, as in Google\'s reference. Changes sampled answers, '
                            'not greedy ones')


def _add_quantization_options(group: argparse._ArgumentGroup, when: str) -> None:
    """--int8 and --int4 (one at most); `when`: when the weights are quantized."""
    quantization = group.add_mutually_exclusive_group()
    quantization.add_argument('--int8', action='store_true',
                              help='quantize the large weights to int8 (one scale per output '
                                   f'channel) {when}: about half the memory and faster '
                                   'decoding, slightly less accurate')
    quantization.add_argument('--int4', action='store_true',
                              help='quantize the large weights to int4 (groups of 32 with a '
                                   f'scale each) {when}: about a quarter of the memory and the '
                                   'fastest decoding, noticeably less accurate than --int8')


def _add_adapter_option(group: argparse._ArgumentGroup, action: str) -> None:
    group.add_argument('--adapter', metavar='DIR',
                       help=f'a LoRA adapter in the PEFT format (adapter_config.json and '
                            f'adapter_model.safetensors, as `finetune --lora-rank` writes) '
                            f'for --checkpoint: {action}')


def _add_unsampled_command(commands: argparse._SubParsersAction, name: str,
                           run: Callable[[argparse.Namespace], int], *,
                           dtype_help: str | None = None, **texts: str) -> argparse.ArgumentParser:
    """A command that loads a model but samples nothing (export, finetune, convert); `texts`:
    its help and description; `dtype_help`: its --dtype's, if not an export's."""
    options = _model_options(running=False, **({'dtype_help': dtype_help} if dtype_help else {}))
    command = commands.add_parser(name, parents=[options], **texts)
    # Nothing is sampled: a checkpoint's softcap note is then informational (shown with -v).
    command.set_defaults(run=run, temperature=None, top_k=None, top_p=None)
    return command


def _add_mesh_option(group: argparse._ArgumentGroup, devices: str) -> None:
    group.add_argument('--mesh', type=_mesh_spec, metavar='SPEC',
                       help=f'split the model over the devices as a mesh with axes data, fsdp '
                            f'and tensor, e.g. {SPEC_EXAMPLE} (sizes multiply to the device '
                            f'count{devices})')


def build_parser() -> argparse.ArgumentParser:
    """The parser of the `gemma3n` command (its subcommands set `args.run`)."""
    model_options = _model_options(running=True)
    run_options = _Parser(add_help=False)
    group = run_options.add_argument_group('weights and sampling')
    _add_checkpoint_options(group)
    _add_adapter_option(group, 'run with it')
    _add_quantization_options(group, 'at load')
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
    group.add_argument('--audio', action='append', default=[], metavar='FILE',
                       help='an audio clip for the prompt (repeatable; WAV, FLAC, OGG, MP3, at '
                            'most 30 s are heard), for checkpoints with the released audio '
                            'tower; each `<start_of_audio>` in the prompt takes one, else they '
                            'go before the text. In chat they belong to the first message')
    group = run_options.add_argument_group('devices and processes')
    _add_mesh_option(group, '; with several processes, all of theirs')
    group.add_argument('--coordinator', metavar='HOST:PORT',
                       help=f'several processes: process 0\'s address (or {COORDINATOR_ENV})')
    group.add_argument('--num-processes', type=_positive_int, metavar='N',
                       help=f'several processes: how many (or {NUM_PROCESSES_ENV})')
    group.add_argument('--process-id', type=_whole_number(0, INT32_MAX), metavar='I',
                       help=f'several processes: this one\'s rank, 0 to N-1 (or {PROCESS_ID_ENV})')

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
    generate.set_defaults(run=run_generate)

    chat = commands.add_parser(
        'chat', parents=[run_options, model_options],
        help='talk with the model (reads messages from stdin)',
        description=f'A conversation: one message per line on stdin; {RESET_COMMAND} starts '
                    f'over, {QUIT_COMMAND} or end of input (Ctrl-D) ends it, {HELP_COMMAND} lists '
                    'the commands.')
    chat.set_defaults(run=run_chat)

    serve = commands.add_parser(
        'serve', parents=[run_options, model_options],
        help='an OpenAI-compatible HTTP server (chat completions, completions)',
        description='Serve the model over HTTP with OpenAI\'s chat-completions protocol: '
                    'requests decode together (continuous batching). Sampling settings come '
                    'with each request; --max-new-tokens is the answer length of requests that '
                    'give no max_tokens. SIGTERM or Ctrl-C stops it gracefully.')
    serve.add_argument('--host', default=DEFAULT_HOST,
                       help=f'address to listen on (default: {DEFAULT_HOST}, this machine only)')
    serve.add_argument('--port', type=_whole_number(0, MAX_PORT), default=DEFAULT_PORT,
                       help=f'port to listen on (default: {DEFAULT_PORT})')
    serve.add_argument('--max-batch', type=_positive_int, default=DEFAULT_MAX_BATCH, metavar='N',
                       help=f'sequences decoded together (default: {DEFAULT_MAX_BATCH}); each '
                            'holds a KV cache of --cache-length positions')
    serve.add_argument('--max-queue', type=_positive_int, default=DEFAULT_MAX_WAITING,
                       metavar='N',
                       help='requests that may wait for a free sequence; more are answered 429 '
                            f'(default: {DEFAULT_MAX_WAITING})')
    serve.add_argument('--shutdown-timeout', type=float, default=DEFAULT_SHUTDOWN_S, metavar='S',
                       help='on SIGTERM, seconds running answers get to end before they are '
                            f'cancelled (default: {DEFAULT_SHUTDOWN_S:g})')
    serve.set_defaults(run=run_serve)

    info = commands.add_parser(
        'info', parents=[model_options],
        help='layers, parameter counts and memory of a model',
        description='Describe a model: its layers, parameter counts, the memory of its weights '
                    'in --dtype and of its KV cache for --context positions.')
    info.add_argument('--checkpoint', metavar='PATH',
                      help='describe the model a Hugging Face checkpoint\'s config.json describes '
                           '(its released vision and audio towers included); no weights are read')
    info.set_defaults(run=run_info)

    export = _add_unsampled_command(
        commands, 'export', run_export,
        help='write a model as a Hugging Face checkpoint',
        description='Write the text decoder of --checkpoint (without one: the demo model) as a '
                    'Hugging Face checkpoint that transformers.Gemma3nForCausalLM loads and '
                    'computes the same logits with, and the tokenizer beside it.')
    group = export.add_argument_group('weights')
    _add_checkpoint_options(group)
    _add_adapter_option(group, 'exported merged into the weights')
    group.add_argument('--out', required=True, metavar='DIR',
                       help='a new or empty directory for config.json and the safetensors files')

    convert = _add_unsampled_command(
        commands, 'convert', run_convert,
        dtype_help=f'dtype of the weights (default: {CHECKPOINT_DTYPE}, {DEMO_DTYPE} for the demo)',
        help='write a checkpoint in the serving layout, which loads without conversion',
        description='Write --checkpoint (without one: the demo model) as it runs: re-laid out, '
                    'with --int8 or --int4 quantized, the per-layer table included, with '
                    'config.json and the tokenizer. `--checkpoint DIR` of the other commands '
                    'then loads it by mapping its file, converting nothing (in the stored '
                    'representation: --int8/--int4/--dtype must match it or be left out). The '
                    'text decoder only: images and audio need the original checkpoint.')
    group = convert.add_argument_group('weights')
    _add_checkpoint_options(group)
    _add_quantization_options(group, 'once, as they are written')
    group.add_argument('--out', required=True, metavar='DIR',
                       help='a new or empty directory for config.json, tokenizer.model and '
                            'serving.safetensors')

    finetune = _add_unsampled_command(
        commands, 'finetune', run_finetune,
        help='fine-tune all weights (or a LoRA adapter) on JSONL chat data',
        description='Fine-tune a checkpoint (without --checkpoint: the demo model) on chat data; '
                    'the result is a checkpoint folder that `generate` and `chat` run (with '
                    '--lora-rank: an adapter folder they run with --adapter).')
    _add_checkpoint_options(finetune.add_argument_group('weights'))
    # One process: the weights, optimizer state and batch split over this process's devices.
    _add_mesh_option(finetune.add_argument_group('devices'), ' of this process; the batch rows '
                     'of each micro-batch are split over data x fsdp')
    add_finetune_options(finetune, {'positive': _positive_int,
                                    'whole': _whole_number(0, INT32_MAX)})
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
