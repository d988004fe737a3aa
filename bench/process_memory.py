"""A process's resident memory, from Linux's /proc: now, at its peak, and of what it consists.

Resident memory counts two kinds of pages, both of which matter to a side that memory-maps its
weights: private (anonymous) pages, which only this process uses (its heap, compiled programs,
caches), and the pages of mapped files, which the kernel may drop and read again (the weights).
"""

from __future__ import annotations

import resource
from pathlib import Path

CLEAR_REFS_FILE = Path('/proc/self/clear_refs')
RESET_PEAK = '5'            # clear_refs: reset the peak resident set size (VmHWM)
KIB = 1024
# /proc/<pid>/status: the resident memory, its peak, its private and its mapped-file pages.
STATUS_FIELDS = ('VmRSS', 'VmHWM', 'RssAnon', 'RssFile')


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * KIB


def reset_peak_rss() -> None:
    """Starts a new peak resident memory measurement (`peak_rss_since_reset_bytes`), so that
    a phase (a training step) is measured without the peaks of the setup before it."""
    CLEAR_REFS_FILE.write_text(RESET_PEAK)


def status_bytes(pid: int | str = 'self') -> dict[str, int]:
    """`STATUS_FIELDS` of a live process, in bytes."""
    with open(f'/proc/{pid}/status') as f:
        fields = dict(line.split(':', 1) for line in f)
    missing = [key for key in STATUS_FIELDS if key not in fields]
    if missing:
        raise RuntimeError(f'no {", ".join(missing)} in /proc/{pid}/status')
    return {key: int(fields[key].split()[0]) * KIB for key in STATUS_FIELDS}


def peak_rss_since_reset_bytes() -> int:
    """Peak resident memory since the last `reset_peak_rss` (Linux's VmHWM)."""
    return status_bytes()['VmHWM']


def current_rss_bytes() -> int:
    return status_bytes()['VmRSS']


def memory_available_bytes() -> int:
    with open('/proc/meminfo') as f:
        fields = dict(line.split(':', 1) for line in f)
    return int(fields['MemAvailable'].split()[0]) * KIB
