"""`gemma3n chat`: a conversation, one message per line on stdin."""

from __future__ import annotations

import argparse
import sys

import jax
import numpy as np

from gemma3n.cli.console import COMPILING_PROMPT, PROG, Timer, compiling, write
from gemma3n.cli.model import load_with_media, max_new_tokens_of
from gemma3n.cli.sampling import sampling_method
from gemma3n.text.chat import ChatSampler, ConversationFull
from gemma3n.text.sampler import DEFAULT_CACHE_LENGTH

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


def run_chat(args: argparse.Namespace) -> int:
    sampling = sampling_method(args.temperature, args.top_k, args.top_p)
    loaded, pictures, clips = load_with_media(args)
    images, audio = pictures or None, clips or None
    chat = loaded.chat(sampling=sampling, cache_length=args.cache_length or DEFAULT_CACHE_LENGTH,
                       max_new_tokens=max_new_tokens_of(args, loaded),
                       prefill_chunk=args.prefill_chunk)
    interactive = sys.stdin.isatty()
    if interactive:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
    sys.stderr.write(f'{PROG}: chatting with {loaded.title}. {RESET_COMMAND} starts '
                     f'over; {QUIT_COMMAND} or end of input (Ctrl-D) ends; {HELP_COMMAND} lists '
                     'the commands.\n')
    key = jax.random.key(args.seed)
    turn = 0
    while True:
        try:
            line = input(CHAT_PROMPT if interactive else '')
        except EOFError:
            if interactive:
                write('\n')
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
        _chat_turn(chat, message, images, audio, jax.random.fold_in(key, turn))
        images = audio = None      # the images and audio belong to the first message only
        turn += 1


def _chat_turn(chat: ChatSampler, message: str, images: list[np.ndarray] | None,
               audio: list[np.ndarray] | None,
               rng: jax.Array) -> None:
    """Streams one answer to stdout; a turn the cache cannot hold is reported, not fatal."""
    try:
        pieces = chat.chat(message, images=images, audio=audio, rng=rng, stream=True)
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
    timer = Timer()
    try:
        with compiling(COMPILING_PROMPT):
            for piece in timer.watch(pieces):
                write(piece)
    except KeyboardInterrupt:
        pieces.close()      # what was streamed so far ends the turn
        sys.stderr.write(f'\n{PROG}: answer interrupted after {chat.last_answer_length} tokens; '
                         f'the conversation keeps it ({RESET_COMMAND} starts over)\n')
        return
    write('\n')
    timer.report(chat.last_answer_length)
