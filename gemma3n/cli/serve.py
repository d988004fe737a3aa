"""`gemma3n serve`: an OpenAI-compatible HTTP server (see gemma3n.serving)."""

from __future__ import annotations

import argparse
import signal
import sys

from gemma3n.cli.console import PROG
from gemma3n.cli.model import load_model, max_new_tokens_of
from gemma3n.engine.engine import Engine
from gemma3n.serving.scheduler import DEFAULT_MAX_WAITING
from gemma3n.text.sampler import DEFAULT_CACHE_LENGTH
from gemma3n.tower_checks import check_vision

DEFAULT_HOST = '127.0.0.1'
DEFAULT_PORT = 8000
DEFAULT_MAX_BATCH = 8
DEFAULT_SHUTDOWN_S = 10.0     # seconds running answers get to end after SIGTERM
# Options of the other commands that a request sets for itself here.
PER_REQUEST = (('image', '--image', 'image_url parts'), ('temperature', '--temperature', None),
               ('top_k', '--top-k', None), ('top_p', '--top-p', None))


def run_serve(args: argparse.Namespace) -> int:
    for name, flag, field in PER_REQUEST:
        if getattr(args, name):
            raise ValueError(f'{flag} is set by each request to the server (its '
                             f'{field or repr(name)} field), not for the whole server')
    # FastAPI and uvicorn load for this command only.
    from gemma3n.serving.app import Service, make_server
    loaded = load_model(args, with_vision=_has_vision(args))
    engine = Engine(loaded.model, loaded.params, per_layer_table=loaded.per_layer_table,
                    prefill_chunk=args.prefill_chunk)
    service = Service(engine, loaded.tokenizer, model_name=loaded.name,
                      slots=args.max_batch, cache_length=args.cache_length or DEFAULT_CACHE_LENGTH,
                      max_tokens=max_new_tokens_of(args, loaded), max_waiting=args.max_queue)
    server = make_server(service, host=args.host, port=args.port,
                         shutdown_s=args.shutdown_timeout)
    sys.stderr.write(f'{PROG}: serving {loaded.name} on http://{args.host}:{args.port}/v1 '
                     f'({args.max_batch} sequences at a time); Ctrl-C or SIGTERM stops\n')
    # uvicorn stops gracefully on SIGTERM, then raises it again under the handler it found:
    # under the default one the process would die of it. A stop asked for is a success here.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    server.run()
    if not server.started:
        raise OSError(f'cannot serve on {args.host}:{args.port} (see the message above)')
    return 0


def _has_vision(args: argparse.Namespace) -> bool:
    """Whether the model asked for can take images (then the server accepts them)."""
    if args.text_only:
        return False
    try:
        check_vision(args.checkpoint, args.model)
    except ValueError:
        return False
    return True
