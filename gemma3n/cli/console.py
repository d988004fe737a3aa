"""What the `gemma3n` command writes: its name on each line, exit statuses, streamed text,
timings and compile notices."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any

from gemma3n.compilation import compile_notice

PROG = 'gemma3n'
USAGE_ERROR = 2
NUMERICAL_FAILURE = 1        # the model's numbers broke down (NaN/Inf logits)
INTERRUPTED = 130            # the shell's status for a command stopped by Ctrl-C (128 + SIGINT)
COMPILING_DEMO = 'compiling the demo model (first run only)...'
COMPILING_PROMPT = 'compiling the model for this prompt length (first run only)...'

logger = logging.getLogger(PROG)


class Timer:
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


def write(piece: str) -> None:
    sys.stdout.write(piece)
    sys.stdout.flush()


def compiling(message: str) -> Any:
    """Within the block, a first-run compile is announced on stderr (once) as it starts."""
    return compile_notice(lambda text: sys.stderr.write(f'{PROG}: {text}\n'), message)
