"""Continuous batching: one thread owns the model and decodes every running request together.

Requests wait in a bounded queue. Between two decode steps the loop frees the slots of requests
that finished or were cancelled (a client gone, a stop string seen), then prefills waiting
requests into free slots of the batched KV cache (`gemma3n.engine.batch`), so a new request never
waits for the others to finish; then one step decodes all running requests at once. Each request
has its own sampling settings and seed (`SlotSampling`), so what it gets does not depend on which
others share the batch.

The running requests are kept in the lowest slots, so that a step computes only as many rows as
there are requests (rounded up to a power of two: `Batch(occupied_only=True)`): a request takes
the lowest free slot, and a slot left empty below running ones, when no waiting request takes it,
receives the last running request (`Batch.move`: one call once, against the extra rows every
later step would compute; bench/step_rows.py times both).

Tokens reach the request's owner through `Job.deliver`, called on this thread: it must only hand
them over (the server puts them on an asyncio queue).

Example:
    >>> loop = Scheduler(engine, slots=8, cache_length=4096, max_waiting=64)
    >>> loop.start()
    >>> loop.submit(Job(row=ids, max_tokens=32, setting=(0.0, 0, 1.0, 0),
    ...                 stop_tokens=(1, 106), deliver=print))
    >>> loop.stop()
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from gemma3n.engine.batch import Batch
from gemma3n.engine.engine import NON_FINITE_LOGITS, Engine
from gemma3n.engine.sampling import GREEDY_TEMPERATURE, NO_TOP_K, SlotSampling

logger = logging.getLogger(__name__)

DEFAULT_MAX_WAITING = 64
# What a free slot's row of SlotSampling holds: greedy, so an all-greedy batch skips sorting.
IDLE_SETTING = (GREEDY_TEMPERATURE, NO_TOP_K, 1.0, 0)
# The seed of the step call's key; SlotSampling draws with each request's own key instead.
UNUSED_SEED = 0


class QueueFull(Exception):
    """The waiting queue holds `max_waiting` requests already."""


class ShuttingDown(Exception):
    """The scheduler takes no more requests."""


@dataclasses.dataclass(frozen=True)
class Event:
    """What a job hears: a `token`, or its end (`finish`: 'stop', 'length', 'cancelled' or
    'error', with `error` the message)."""
    token: int | None = None
    finish: str | None = None
    error: str | None = None


@dataclasses.dataclass(eq=False)
class Job:
    """One request to decode.

    row: the prompt's token ids [L] (checked); images: [1, N, H, W, C] or None.
    setting: (temperature, top_k, top_p, seed), see `SlotSampling`.
    stop_tokens: ids that end the answer (delivered, then 'stop').
    deliver: called with each `Event`, on the scheduler's thread.
    """
    row: np.ndarray
    max_tokens: int
    setting: tuple[float, int, float, int]
    stop_tokens: tuple[int, ...]
    deliver: Callable[[Event], Any]
    images: Any = None
    generated: int = 0
    cancelled: threading.Event = dataclasses.field(default_factory=threading.Event)

    def cancel(self) -> None:
        """Ends the job at the next step (from any thread); its slot is freed."""
        self.cancelled.set()


class Scheduler:
    """The engine loop (see the module docstring): `slots` sequences decode together."""

    def __init__(self, engine: Engine, *, slots: int, cache_length: int, max_waiting: int):
        self.engine = engine
        self.cache_length = cache_length
        self.batch = self._new_batch(slots)
        self.jobs: list[Job | None] = [None] * slots
        self.sampling_rows = SlotSampling.of([IDLE_SETTING] * slots, counts=[0] * slots)
        # Made here, not at import: importing the command must not start JAX's backend (which
        # `jax.distributed` has to join first) nor its compilation cache.
        self.unused_key = jax.random.key(UNUSED_SEED)
        self.waiting: collections.deque[Job] = collections.deque()
        self.max_waiting = max_waiting
        self.wake = threading.Condition()
        self.stopping = False
        self.steps = 0                      # decode steps run, for the tests and benches
        # decode steps run by the number of cache rows they computed
        self.steps_by_rows: collections.Counter[int] = collections.Counter()
        self.thread = threading.Thread(target=self._run, name='gemma3n-engine', daemon=True)

    def start(self) -> None:
        self.thread.start()

    def submit(self, job: Job) -> None:
        """Queues `job`; QueueFull or ShuttingDown refuse it."""
        with self.wake:
            if self.stopping:
                raise ShuttingDown('the server is shutting down')
            if len(self.waiting) >= self.max_waiting:
                raise QueueFull(f'{len(self.waiting)} requests are waiting already')
            self.waiting.append(job)
            self.wake.notify()

    def stop(self, timeout: float | None = None) -> None:
        """Cancels every job and ends the loop after its current step."""
        with self.wake:
            self.stopping = True
            self.wake.notify()
        if self.thread.is_alive():
            self.thread.join(timeout)

    @property
    def running(self) -> int:
        return sum(job is not None for job in self.jobs)

    def _run(self) -> None:
        while True:
            with self.wake:
                while not self.stopping and not self.waiting and not self.running:
                    self.wake.wait()
                if self.stopping:
                    break
            self.turn()
        for slot in range(len(self.jobs)):
            self._end(slot, 'cancelled')
        while self.waiting:
            self.waiting.popleft().deliver(Event(finish='cancelled'))

    def turn(self) -> None:
        """One turn of the loop (the loop's thread, or a test without one): frees the slots of
        cancelled jobs, admits waiting ones, packs the running ones into the lowest slots and
        runs one decode step when any runs."""
        self._drop_cancelled()
        self._admit_waiting()
        self._pack()
        if self.running:
            self._step()

    def _drop_cancelled(self) -> None:
        for slot, job in enumerate(self.jobs):
            if job is not None and job.cancelled.is_set():
                self._end(slot, 'cancelled')

    def _admit_waiting(self) -> None:
        for slot in range(len(self.jobs)):
            if self.jobs[slot] is not None:
                continue
            with self.wake:
                job = self.waiting.popleft() if self.waiting else None
            if job is None:
                return
            if job.cancelled.is_set():
                job.deliver(Event(finish='cancelled'))
                continue
            self._set_sampling(slot, job.setting, 0)
            self.jobs[slot] = job
            try:
                token, _ = self.batch.admit(slot, job.row, self.unused_key, self._row_sampling(slot),
                                            job.images)
            except Exception as error:      # one request's failure must not stop the server
                logger.exception('prefill failed')
                self._recover(error)
                return
            self._deliver(slot, token)

    def _pack(self) -> None:
        """Moves the last running jobs down into the free slots below them."""
        while True:
            running = [slot for slot, job in enumerate(self.jobs) if job is not None]
            free = [slot for slot, job in enumerate(self.jobs) if job is None]
            if not running or not free or free[0] > running[-1]:
                return
            source, target = running[-1], free[0]
            try:
                self.batch.move(source, target)
            except Exception as error:
                logger.exception('moving a slot failed')
                self._recover(error)
                return
            self.jobs[target], self.jobs[source] = self.jobs[source], None
            for column in jax.tree.leaves(self.sampling_rows):
                column[target] = column[source]
            self._set_sampling(source, IDLE_SETTING, 0)

    def _step(self) -> None:
        rows = self.batch.step_rows()
        try:
            # A copy: the rows change on this thread while the step may still read them.
            tokens, _ = self.batch.step(self.unused_key, jax.tree.map(np.copy, self.sampling_rows))
        except Exception as error:
            logger.exception('decode step failed')
            self._recover(error)
            return
        self.steps += 1
        self.steps_by_rows[rows] += 1
        for slot, job in enumerate(self.jobs):
            if job is not None:
                self._deliver(slot, int(tokens[slot]))

    def _deliver(self, slot: int, token: int) -> None:
        job = self.jobs[slot]
        if token == NON_FINITE_LOGITS:
            self._end(slot, 'error', 'the logits became NaN/Inf: generation stopped')
            return
        job.generated += 1
        self.sampling_rows.counts[slot] = job.generated
        job.deliver(Event(token=token))
        if token in job.stop_tokens:
            self._end(slot, 'stop')
        elif job.generated >= job.max_tokens:
            self._end(slot, 'length')

    def _end(self, slot: int, finish: str, error: str | None = None) -> None:
        job = self.jobs[slot]
        if job is None:
            return
        self.jobs[slot] = None
        self.batch.free(slot)
        self._set_sampling(slot, IDLE_SETTING, 0)
        job.deliver(Event(finish=finish, error=error))

    def _recover(self, error: Exception) -> None:
        """After a failed compiled call (which may have taken the cache over): every running job
        ends with the error and the batch starts over with an empty cache."""
        for slot in range(len(self.jobs)):
            self._end(slot, 'error', f'{type(error).__name__}: {error}')
        self.batch = self._new_batch(len(self.jobs))

    def _new_batch(self, slots: int) -> Batch:
        return Batch(self.engine, self.engine.new_cache(slots, self.cache_length),
                     occupied_only=True)

    def _set_sampling(self, slot: int, setting: tuple, count: int) -> None:
        row = SlotSampling.of([setting], counts=[count])
        for column, value in zip(jax.tree.leaves(self.sampling_rows), jax.tree.leaves(row)):
            column[slot] = value[0]

    def _row_sampling(self, slot: int) -> SlotSampling:
        return jax.tree.map(lambda x: x[slot:slot + 1].copy(), self.sampling_rows)
