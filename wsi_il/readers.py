"""Reader pools: tiles read and decoded in worker processes, straight into shared memory.

Reading a tile holds Python's global interpreter lock for part of its time (openslide-python's conversion of
the region, numpy and PIL bookkeeping), so reader *threads* stop scaling at a few cores: on a 16-core H100
machine sixteen threads read about 800 tiles/s, 3.2 times one thread, while the GPU sat 97% idle
(docs/speed.md, "GPU"). Worker *processes* each have their own interpreter and their own OpenSlide handles.

Each worker gets ``make_load()`` (called once in the worker, so that slide handles are opened there) and
writes the tiles it loads into a batch slot of one anonymous shared memory map (no pickling of pixels, no
/dev/shm size limit); the parent only sends index ranges and receives which tiles were kept. A few batches are
in flight while the caller computes. Workers are forked (Linux): the parent reads no slide while they run, and
they never touch CUDA. Python 3.12+ warns (a DeprecationWarning, hidden by default) that forking a process
with threads may deadlock the child; the workers only open slides and run numpy and PIL, taking no lock that
the parent's threads (torch's pools, the progress display) hold, as PyTorch's data-loading workers do.
Elsewhere, or with ``WSI_IL_READERS=threads``, the same interface runs on threads.
"""

from __future__ import annotations

import math
import mmap
import os
import pickle
import queue
import signal
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

from wsi_il.errors import WsiIlError

Load = Callable[[int], "np.ndarray | None"]
"""Load item ``i``: an array of the pool's shape, or None when the item is not kept (a background tile)."""
MakeLoad = Callable[[], tuple[Load, Callable[[], None]]]
"""Open what loading needs (in the worker) and return (load, close)."""

READERS_ENV = "WSI_IL_READERS"
"""'processes' (the default on Linux) or 'threads'."""


class ReaderError(WsiIlError):
    """A reader process stopped without saying why (killed, out of memory, crashed)."""


def reader_kind() -> str:
    """'processes' where fork is available (Linux) unless $WSI_IL_READERS says 'threads' or this process may not
    have children (a daemonic one); else 'threads'."""
    import multiprocessing

    wanted = os.environ.get(READERS_ENV, "").strip().lower()
    if wanted == "threads" or not sys.platform.startswith("linux") or multiprocessing.current_process().daemon:
        return "threads"  # a daemonic process (a Dask worker by default) may not start processes of its own
    return "processes"


def read_batches(
    make_load: MakeLoad, batches: list[range], workers: int, shape: tuple[int, ...], dtype: Any = np.uint8
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield (items (len(batch), *shape), kept (len(batch),) bool) for each batch, in order.

    A row whose item was not kept holds stale data. The yielded array is only valid until the next batch is
    asked for (its slot is then refilled): copy what must outlive that.
    """
    if not batches:
        return
    size = max(len(b) for b in batches)
    with ReaderPool(make_load, workers, size, size * _item_bytes(shape, dtype)) as pool:
        yield from pool.read(batches, shape, dtype)


class ReaderPool:
    """Readers started once for several reads (``read``), each of its own items: the processes are forked when
    the pool is made, so that it can be made early, before the parent starts threads or a GPU (whose context
    makes each fork slower), and then serve every stage that reads the same kind of item.

    ``make_load()`` runs in each reader; its ``load`` takes the item specs that each read's ``spec`` maps the
    batches' indices to (picklable: they travel to the readers). A batch of a read may hold at most
    ``slot_bytes`` of items; ``batch_size`` (the main reads' batches) sets how many batches are in flight. With
    ``$WSI_IL_READERS=threads``, or fewer than 2 workers, threads read instead.
    """

    def __init__(self, make_load: MakeLoad, workers: int, batch_size: int, slot_bytes: int) -> None:
        self.make_load, self.workers = make_load, workers
        self.threads = reader_kind() == "threads" or workers < 2
        self.pool = None if self.threads else _ProcessPool(make_load, workers, batch_size, slot_bytes)

    def read(
        self, batches: list[range], shape: tuple[int, ...], dtype: Any, spec: Callable[[int], Any] | None = None
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """As ``read_batches``, item ``i`` being ``load(spec(i))`` (``load(i)`` without ``spec``)."""
        if not batches:
            return
        if self.threads:

            def make_load() -> tuple[Load, Callable[[], None]]:
                load, close = self.make_load()
                return (load if spec is None else lambda i: load(spec(i))), close

            yield from _thread_batches(make_load, batches, self.workers, shape, dtype)
            return
        if self.pool is None:
            raise RuntimeError("the readers were stopped (a read before was cut short)")
        finished = False
        try:
            yield from self.pool.run(batches, shape, np.dtype(dtype), spec)
            finished = True
        finally:
            if not finished:  # cut short (an error, Ctrl-C): tasks of this read may still be queued
                self.close(abort=True)

    def close(self, abort: bool = False) -> None:
        """End the readers (at once with ``abort``)."""
        if self.pool is not None:
            self.pool.stop(abort)
            self.pool = None

    def __enter__(self) -> ReaderPool:
        return self

    def __exit__(self, kind: object, *rest: object) -> None:
        self.close(abort=kind is not None)


def _item_bytes(shape: tuple[int, ...], dtype: np.dtype) -> int:
    return int(np.prod(shape)) * np.dtype(dtype).itemsize


def _thread_batches(
    make_load: MakeLoad, batches: list[range], workers: int, shape: tuple[int, ...], dtype: Any
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    load, close = make_load()

    def combine(items: list[np.ndarray | None]) -> tuple[np.ndarray, np.ndarray]:
        out = np.zeros((len(items), *shape), dtype)
        kept = np.array([item is not None for item in items], bool)
        for row, item in enumerate(items):
            if item is not None:
                out[row] = item
        return out, kept

    try:
        yield from prefetch(load, batches, max(1, workers), combine=combine)
    finally:
        close()


def prefetch(
    load: Callable[[int], Any], batches: list[range], workers: int, combine: Callable[[list[Any]], Any] = np.stack
) -> Iterator[Any]:
    """Yield batches of loaded tiles (stacked by default), reading the next batches while the caller computes."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending: list[list[Future]] = []
        for batch in batches[:2]:
            pending.append([pool.submit(load, i) for i in batch])
        for index in range(len(batches)):
            futures = pending.pop(0)
            if index + 2 < len(batches):
                pending.append([pool.submit(load, i) for i in batches[index + 2]])
            yield combine([f.result() for f in futures])


class _ProcessPool:
    """Forked workers filling batch slots of a shared memory map; see the module docstring."""

    def __init__(self, make_load: MakeLoad, workers: int, batch_size: int, slot_bytes: int) -> None:
        import multiprocessing

        import torch  # noqa: F401 - imported once, here, before forking, rather than by every worker that needs it
        # (seconds each)

        # enough batches in flight for every worker to have a few items queued while the caller computes
        self.workers_count = workers
        self.depth = max(2, math.ceil(4 * workers / batch_size))
        self.slots = self.depth + 1
        self.slot_bytes = max(1, slot_bytes)
        self.memory = mmap.mmap(-1, self.slots * self.slot_bytes)  # anonymous and shared: the forked workers see
        # the same pages
        self.raw = np.frombuffer(self.memory, np.uint8).reshape(self.slots, self.slot_bytes)
        context = multiprocessing.get_context("fork")
        self.tasks: Any = context.Queue()
        self.results: Any = context.Queue()
        self.workers = [
            context.Process(
                target=_work,
                args=(make_load, self.raw, self.tasks, self.results),
                daemon=True,
                name=f"wsi-il-reader-{n}",
            )
            for n in range(workers)
        ]
        for process in self.workers:
            process.start()
        self.next_task = 0

    def _submit(
        self,
        batch: range,
        slot: int,
        shape: tuple[int, ...],
        dtype: np.dtype,
        chunk: int,
        spec: Callable[[int], Any] | None,
    ) -> list[int]:
        ids = []
        for start in range(0, len(batch), chunk):
            items = [i if spec is None else spec(i) for i in batch[start : start + chunk]]
            self.tasks.put((self.next_task, slot, start, shape, dtype.str, items))
            ids.append(self.next_task)
            self.next_task += 1
        return ids

    def _wait(self, ids: list[int], done: dict[int, np.ndarray]) -> np.ndarray:
        while any(i not in done for i in ids):
            try:
                task, kept, error = self.results.get(timeout=1.0)
            except queue.Empty:
                stopped = [p for p in self.workers if not p.is_alive()]
                if stopped:
                    raise ReaderError(
                        f"a reader process stopped (exit code {stopped[0].exitcode})",
                        "out of memory? run again: finished batches are kept",
                    ) from None
                continue
            if error is not None:
                raise error
            done[task] = kept
        return np.concatenate([done.pop(i) for i in ids])

    def run(
        self, batches: list[range], shape: tuple[int, ...], dtype: np.dtype, spec: Callable[[int], Any] | None = None
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        size = max(len(b) for b in batches)
        item = _item_bytes(shape, dtype)
        if size * item > self.slot_bytes:
            raise ValueError(
                f"a batch of {size} items of {item} bytes exceeds the readers' {self.slot_bytes}-byte slots"
            )
        depth, slots = self.depth, self.slots
        chunk = max(1, min(32, math.ceil(size / self.workers_count)))

        def submit(k: int) -> list[int]:
            return self._submit(batches[k], k % slots, shape, dtype, chunk, spec)

        pending: list[list[int]] = [submit(k) for k in range(min(depth, len(batches)))]
        done: dict[int, np.ndarray] = {}
        for k, batch in enumerate(batches):
            if k + depth < len(batches):  # into the slot of batch k - 1, which the caller is done with
                pending.append(submit(k + depth))
            kept = self._wait(pending.pop(0), done)
            view = self.raw[k % slots, : len(batch) * item].view(dtype).reshape(len(batch), *shape)
            yield view, kept

    def stop(self, abort: bool) -> None:
        """End the workers: after their last task, or at once when the run was cut short (an error, Ctrl-C)."""
        if not abort:
            for _ in self.workers:
                self.tasks.put(None)
        for process in self.workers:
            if abort:
                process.terminate()  # the tasks still queued are not wanted; a worker holds nothing to save
            process.join(timeout=5.0)
            if process.is_alive():
                process.kill()
                process.join()
        for channel in (self.tasks, self.results):
            channel.cancel_join_thread()  # never block the caller's exit on a queue's last writes
            channel.close()


def _work(make_load: MakeLoad, raw: np.ndarray, tasks: Any, results: Any) -> None:
    """A worker: load the items of each task into its slot rows; report what was kept, or the error."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it stops the workers
    if "torch" in sys.modules:  # one thread a worker (the workers are the parallelism), and no OpenMP pool
        sys.modules["torch"].set_num_threads(1)  # forked from the parent's, which can hang a forked child
    results.cancel_join_thread()  # a worker ended early must not wait for the parent to read its last reports
    try:
        load, close = make_load()
    except Exception as exc:
        task = tasks.get()
        results.put((task[0] if task else -1, None, _portable(exc)))
        return
    parent = os.getppid()
    try:
        while (task := _next_task(tasks, parent)) is not None:
            number, slot, start, shape, dtype, items = task
            try:
                size = _item_bytes(shape, np.dtype(dtype))
                rows = raw[slot, start * size : (start + len(items)) * size].view(dtype).reshape(len(items), *shape)
                kept = np.zeros(len(items), bool)
                for row, spec in enumerate(items):
                    item = load(spec)
                    if item is not None:
                        rows[row] = item
                        kept[row] = True
                results.put((number, kept, None))
            except Exception as exc:
                results.put((number, None, _portable(exc)))
    finally:
        close()


def _next_task(tasks: Any, parent: int) -> Any:
    """The next task, or None to stop: when told, or when the parent process is gone (killed with SIGKILL, or by
    the out-of-memory killer, it could not stop its workers, which would otherwise wait for tasks forever)."""
    while True:
        try:
            return tasks.get(timeout=1.0)
        except queue.Empty:
            if os.getppid() != parent:
                return None


def _portable(exc: Exception) -> Exception:
    """The exception itself where it crosses to the parent whole (ours, and built-in ones), else a RuntimeError
    with its text: a report that cannot be pickled would never arrive, and the parent would wait for it."""
    if isinstance(exc, WsiIlError) or type(exc).__module__ == "builtins":
        try:
            pickle.dumps(exc)
            return exc
        except Exception:
            pass
    return RuntimeError(f"{type(exc).__name__}: {exc}")
