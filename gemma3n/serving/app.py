"""The HTTP server: OpenAI's chat-completions and completions endpoints over the scheduler.

`POST /v1/chat/completions`, `POST /v1/completions` (with `stream` as server-sent events),
`GET /v1/models`, `GET /health`. Every request is checked (`protocol`) and fitted to the cache
before it is queued; the scheduler (`scheduler`) decodes the queued ones together.

Example:
    >>> service = Service(engine, tokenizer, model_name='demo', slots=8, cache_length=4096)
    >>> make_server(service, host='127.0.0.1', port=8000).run()     # until SIGTERM or Ctrl-C
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import os
import tempfile
from collections.abc import AsyncIterator, Callable
from typing import Any

import fastapi
import numpy as np
import uvicorn
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from gemma3n.engine.engine import Engine
from gemma3n.serving import protocol
from gemma3n.serving.answer import CHAT_KIND, COMPLETION_KIND, Answer, Reply
from gemma3n.serving.protocol import APIError, bad_request
from gemma3n.serving.scheduler import (DEFAULT_MAX_WAITING, Event, Job, QueueFull, Scheduler,
                                       ShuttingDown)
from gemma3n.text.chat_format import format_conversation
from gemma3n.text.sampler import DEFAULT_TEXT_STOP_TOKENS
from gemma3n.text.tokenizer import Tokenizer
from gemma3n.vision.preprocess import load_images

logger = logging.getLogger(__name__)

# How often a non-streaming request checks that its client is still there.
DISCONNECT_POLL_S = 0.5
DATA_URL_PREFIX = 'data:'
SSE_DONE = 'data: [DONE]\n\n'


class Service:
    """What the endpoints serve: the engine, its tokenizer and the scheduler that shares it.

    max_tokens: the answer length of a request that gives none (cut to what the cache holds).
    """

    def __init__(self, engine: Engine, tokenizer: Tokenizer, *, model_name: str, slots: int,
                 cache_length: int, max_tokens: int, max_waiting: int = DEFAULT_MAX_WAITING):
        # The caches of every slot, and a prefill chunk, must fit before anything is served.
        engine.check_room(np.zeros(slots, np.int32), [np.zeros(1, np.int32)] * slots, None, 1,
                          cache_length, new_cache=True)
        self.engine = engine
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.cache_length = cache_length
        self.max_tokens = max_tokens
        self.stop_tokens = DEFAULT_TEXT_STOP_TOKENS
        self.scheduler = Scheduler(engine, slots=slots, cache_length=cache_length,
                                   max_waiting=max_waiting)

    # ---- a request, from JSON to a queued job ----------------------------------------------

    def prompt(self, request: protocol.Request) -> tuple[np.ndarray, Any]:
        """The prompt's token ids [L] and its images [1, N, H, W, C] (or None)."""
        text = (request.prompt if request.turns is None
                else format_conversation(request.turns))
        images = self._images(request.images) if request.images else None
        try:
            row = self.engine.prompt_rows([self.tokenizer.encode(text, add_bos=True)])[0]
            if images is not None:
                images = self.engine.check_images(images, [row])
        except ValueError as error:
            raise bad_request(str(error), 'messages') from None
        return row, images

    def _images(self, urls: list[str]) -> Any:
        try:
            encoder = self.engine.vision_encoder()
        except ValueError as error:
            raise bad_request(str(error), 'messages') from None
        files = []
        try:
            for url in urls:
                files.append(_data_url_file(url))
            return load_images(files, encoder.image_height, encoder.image_width)[None]
        except ValueError as error:
            raise bad_request(str(error), 'messages') from None
        finally:
            for path in files:
                os.unlink(path)

    def max_tokens_of(self, request: protocol.Request, prompt_positions: int) -> int:
        """The request's answer length: what it asked for, if the cache holds it."""
        # The last token is never fed back: a cache of C positions holds prompt + answer - 1.
        room = self.cache_length - prompt_positions + 1
        asked = request.max_tokens
        if room < 1 or asked is not None and asked > room:
            raise bad_request(
                f'This model\'s maximum context length is {self.cache_length} tokens. However, '
                f'you requested {prompt_positions + (asked or 1) - 1} tokens ({prompt_positions} '
                f'in the prompt, {asked or 1} for the answer less the last one, which is never '
                'fed back). Shorten the prompt or max_tokens.', 'max_tokens',
                protocol.CONTEXT_LENGTH_EXCEEDED)
        return min(self.max_tokens, room) if asked is None else asked

    async def answer(self, http: fastapi.Request, parse: Callable, kind: str):
        try:
            body = json.loads(await http.body())
        except (ValueError, UnicodeDecodeError) as error:
            raise bad_request(f'the request body is not valid JSON: {error}') from None
        request = parse(body)
        row, images = self.prompt(request)
        prompt_positions = int(self.engine.prompt_positions(
            [len(row)], 0 if images is None else images.shape[1])[0])
        max_tokens = self.max_tokens_of(request, prompt_positions)
        seed = request.seed if request.seed is not None else int.from_bytes(os.urandom(4), 'little')
        events: asyncio.Queue[Event] = asyncio.Queue()
        loop = asyncio.get_running_loop()
        job = Job(row=row, images=images, max_tokens=max_tokens,
                  setting=(request.temperature, request.top_k, request.top_p, seed),
                  stop_tokens=self.stop_tokens,
                  deliver=lambda event: loop.call_soon_threadsafe(events.put_nowait, event))
        try:
            self.scheduler.submit(job)
        except QueueFull as error:
            raise APIError(429, f'the server is busy ({error}): retry later.',
                           kind='rate_limit_exceeded') from None
        except ShuttingDown as error:
            raise APIError(503, f'{error}.', kind='server_error') from None
        reply = Reply(kind, self.model_name, prompt_positions)
        answer = Answer(self.tokenizer, request.stop, self.stop_tokens)
        if request.stream:
            return StreamingResponse(self._stream(job, events, answer, reply,
                                                  request.include_usage),
                                     media_type='text/event-stream')
        text, finish = [], None
        async for piece, finish in self._pieces(job, events, answer, http):
            text.append(piece)
        return JSONResponse(reply.whole(''.join(text), finish, answer.tokens))

    async def _pieces(self, job: Job, events: asyncio.Queue, answer: Answer,
                      http: fastapi.Request | None) -> AsyncIterator[tuple[str, str | None]]:
        """(text, None) as the answer grows, then ('', finish_reason). With `http`, a client
        gone cancels the job; without, the stream's closing does (a disconnect closes it)."""
        try:
            while True:
                try:
                    event = await asyncio.wait_for(events.get(), DISCONNECT_POLL_S)
                except asyncio.TimeoutError:
                    if http is not None and await http.is_disconnected():
                        return
                    continue
                if event.token is not None:
                    text = answer.push(event.token)
                    if text:
                        yield text, None
                    if answer.finish_reason is not None:
                        yield '', answer.finish_reason
                        return
                    continue
                if event.finish in ('error', 'cancelled'):
                    raise APIError(500 if event.finish == 'error' else 503,
                                   event.error or 'the server shut down before the answer ended.',
                                   kind='server_error')
                tail = answer.flush()
                if tail:
                    yield tail, None
                yield '', answer.finish_reason or event.finish
                return
        finally:
            job.cancel()        # no-op when the job ended; else its slot is freed

    async def _stream(self, job: Job, events: asyncio.Queue, answer: Answer, reply: Reply,
                      include_usage: bool) -> AsyncIterator[str]:
        if reply.kind == CHAT_KIND:
            yield _sse(reply.chunk(None))
        try:
            async for piece, finish in self._pieces(job, events, answer, None):
                if piece or finish:
                    yield _sse(reply.chunk(piece, finish))
        except APIError as error:
            yield _sse(error.body())
            return
        if include_usage:
            yield _sse(reply.usage_chunk(answer.tokens))
        yield SSE_DONE


def _sse(body: dict) -> str:
    return f'data: {json.dumps(body)}\n\n'


def _data_url_file(url: str) -> str:
    """A `data:image/...;base64,...` URL written to a temporary file (the image loader's input)."""
    if not url.startswith(DATA_URL_PREFIX):
        raise ValueError('image_url must be a data: URL (data:image/png;base64,...): this server '
                         'fetches nothing')
    header, _, payload = url.partition(',')
    if not header.endswith(';base64'):
        raise ValueError('image_url data: URLs must be base64 encoded')
    try:
        data = base64.b64decode(payload, validate=True)
    except binascii.Error as error:
        raise ValueError(f'image_url holds invalid base64: {error}') from None
    with tempfile.NamedTemporaryFile(delete=False, suffix='.img') as file:
        file.write(data)
    return file.name


def create_app(service: Service) -> fastapi.FastAPI:
    """The ASGI app; the scheduler runs from its startup to its shutdown."""

    @contextlib.asynccontextmanager
    async def lifespan(app):
        service.scheduler.start()
        yield
        service.scheduler.stop()

    app = fastapi.FastAPI(title='gemma3n', lifespan=lifespan, openapi_url=None, docs_url=None,
                          redoc_url=None)

    @app.exception_handler(APIError)
    async def api_error(request, error: APIError):
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(HTTPException)
    async def http_error(request, error: HTTPException):
        return JSONResponse(APIError(error.status_code, str(error.detail)).body(),
                            status_code=error.status_code)

    @app.get('/health')
    async def health():
        scheduler = service.scheduler
        return {'status': 'ok', 'running': scheduler.running, 'waiting': len(scheduler.waiting)}

    @app.get('/v1/models')
    async def models():
        return {'object': 'list', 'data': [{'id': service.model_name, 'object': 'model',
                                            'created': 0, 'owned_by': 'gemma3n'}]}

    @app.post('/v1/chat/completions')
    async def chat_completions(request: fastapi.Request):
        return await service.answer(request, protocol.parse_chat, CHAT_KIND)

    @app.post('/v1/completions')
    async def completions(request: fastapi.Request):
        return await service.answer(request, protocol.parse_completion, COMPLETION_KIND)

    return app


def make_server(service: Service, *, host: str, port: int, shutdown_s: float) -> uvicorn.Server:
    """The server; `.run()` serves until SIGTERM/SIGINT: then new connections are refused,
    running answers get `shutdown_s` seconds to end, the rest are cancelled, and it returns."""
    config = uvicorn.Config(create_app(service), host=host, port=port, log_level='warning',
                            timeout_graceful_shutdown=shutdown_s, lifespan='on')
    return uvicorn.Server(config)
