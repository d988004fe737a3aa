"""Several processes, one mesh: `jax.distributed` started from arguments or the environment.

Every process runs the same program (the same command, the same prompts); after `initialize`,
`jax.devices()` lists the devices of all processes and a mesh over them spans the processes.
Each process reads only the parts of the weights its own devices hold, and JAX's collectives
carry the rest (on CPU through gloo, so several processes on one machine stand in for hosts).

Launching 2 processes on one machine (each with 2 simulated CPU devices):
    export XLA_FLAGS=--xla_force_host_platform_device_count=2
    gemma3n generate --mesh tensor=4 --coordinator 127.0.0.1:12355 --num-processes 2 \\
        --process-id 0 "Hello" &
    gemma3n generate --mesh tensor=4 --coordinator 127.0.0.1:12355 --num-processes 2 \\
        --process-id 1 "Hello"
On several hosts, the coordinator is process 0's host and a free port; the same three values
can come from the environment (COORDINATOR_ENV, NUM_PROCESSES_ENV, PROCESS_ID_ENV).
"""

from __future__ import annotations

import dataclasses
import os

import jax

COORDINATOR_ENV = 'GEMMA3N_COORDINATOR'
NUM_PROCESSES_ENV = 'GEMMA3N_NUM_PROCESSES'
PROCESS_ID_ENV = 'GEMMA3N_PROCESS_ID'
# How long a process waits for all the others to join before giving up.
DEFAULT_TIMEOUT_S = 300
# JAX's CPU collectives between processes; without them a CPU mesh cannot span processes.
CPU_COLLECTIVES = 'gloo'


@dataclasses.dataclass(frozen=True)
class ProcessGroup:
    """Where the coordinator listens ('host:port'), how many processes join, and which this is."""
    coordinator: str
    num_processes: int
    process_id: int


def process_group(coordinator: str | None = None, num_processes: int | None = None,
                  process_id: int | None = None) -> ProcessGroup | None:
    """The group from the arguments, each missing one from the environment; None when neither
    names a coordinator (a single process). ValueError naming what is missing or wrong."""
    coordinator = coordinator or os.environ.get(COORDINATOR_ENV)
    if num_processes is None and os.environ.get(NUM_PROCESSES_ENV):
        num_processes = _whole(NUM_PROCESSES_ENV, os.environ[NUM_PROCESSES_ENV])
    if process_id is None and os.environ.get(PROCESS_ID_ENV):
        process_id = _whole(PROCESS_ID_ENV, os.environ[PROCESS_ID_ENV])
    if coordinator is None and num_processes is None and process_id is None:
        return None
    if coordinator is None or num_processes is None or process_id is None:
        raise ValueError(f'several processes need all three of the coordinator address '
                         f'(--coordinator or {COORDINATOR_ENV}), the number of processes '
                         f'(--num-processes or {NUM_PROCESSES_ENV}) and this process\'s id '
                         f'(--process-id or {PROCESS_ID_ENV}).')
    host, sep, port = coordinator.rpartition(':')
    if not sep or not host or not port.isdigit():
        raise ValueError(f'the coordinator address must be host:port, got {coordinator!r}.')
    if num_processes < 1:
        raise ValueError(f'the number of processes must be at least 1, got {num_processes}.')
    if not 0 <= process_id < num_processes:
        raise ValueError(f'the process id must lie in [0, {num_processes}), got {process_id}.')
    return ProcessGroup(coordinator, num_processes, process_id)


def _whole(name: str, text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f'{name} must be a whole number, got {text!r}.') from None


def initialize(group: ProcessGroup | None, timeout_s: int = DEFAULT_TIMEOUT_S) -> None:
    """Joins `group` (nothing to do for None). Call it before anything else uses JAX."""
    if group is None:
        return
    jax.config.update('jax_cpu_collectives_implementation', CPU_COLLECTIVES)
    jax.distributed.initialize(group.coordinator, num_processes=group.num_processes,
                               process_id=group.process_id, initialization_timeout=timeout_s)
