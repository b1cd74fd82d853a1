"""The process's worker counts and its pool of threads for work that leaves the interpreter lock free."""

from __future__ import annotations

import functools
import os
from concurrent.futures import ThreadPoolExecutor


def default_workers() -> int:
    """Return how many readers (processes, or threads) to use: every core, at least two."""
    return max(2, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 2)


@functools.cache
def core_threads() -> ThreadPoolExecutor:
    """A thread a core, started once a process, for work that leaves the interpreter lock free (copies to a GPU's
    staging memory, PNG encoding)."""
    return ThreadPoolExecutor(max_workers=default_workers(), thread_name_prefix="wsi-il-core")
