"""Reader pools (wsi_il.readers): processes give what threads give, in order; errors and stops reach the parent."""

from __future__ import annotations

import multiprocessing
import os
import signal
import time

import numpy as np
import pytest

from wsi_il.errors import SlideError
from wsi_il.features import batch_ranges
from wsi_il.readers import READERS_ENV, ReaderError, read_batches, reader_kind

pytestmark = pytest.mark.skipif(reader_kind() != "processes", reason="reader processes need fork (Linux)")


def _numbered(i: int) -> np.ndarray | None:
    """Item i: a 4 x 4 block filled with i, except every third item, which is not kept."""
    return None if i % 3 == 2 else np.full((4, 4), i, np.int32)


def _collect(monkeypatch, kind: str, batches: list[range]) -> list[tuple[np.ndarray, np.ndarray]]:
    monkeypatch.setenv(READERS_ENV, kind)
    # copies: a yielded batch is only valid until the next is asked for
    return [
        (items.copy(), kept.copy())
        for items, kept in read_batches(lambda: (_numbered, lambda: None), batches, 3, (4, 4), np.int32)
    ]


def test_processes_give_the_items_of_threads_in_order(monkeypatch):
    batches = batch_ranges(0, 103, 10)  # uneven last batch, more batches than slots
    by_process = _collect(monkeypatch, "processes", batches)
    by_thread = _collect(monkeypatch, "threads", batches)
    assert len(by_process) == len(batches)
    for batch, (items, kept), (thread_items, thread_kept) in zip(batches, by_process, by_thread, strict=True):
        expected = np.array([i % 3 != 2 for i in batch])
        assert (kept == expected).all() and (thread_kept == expected).all()
        assert (items[kept] == np.array(batch)[kept][:, None, None]).all()
        assert (items[kept] == thread_items[kept]).all()
    assert not multiprocessing.active_children()


def test_real_tiles_read_by_processes_match_one_thread(block_slide, monkeypatch):
    from wsi_il.slide import TileReader

    corners = [(x, y) for y in range(0, 1280, 256) for x in range(0, 1792, 256)]

    def make_load():
        reader = TileReader(block_slide.path)
        return (lambda i: reader.read(*corners[i], 256, 256)), reader.close

    batches = batch_ranges(0, len(corners), 8)
    monkeypatch.setenv(READERS_ENV, "processes")
    tiles = np.concatenate([items.copy() for items, _ in read_batches(make_load, batches, 2, (256, 256, 3))])
    reader = TileReader(block_slide.path)
    try:
        expected = np.stack([reader.read(x, y, 256, 256) for x, y in corners])
    finally:
        reader.close()
    assert (tiles == expected).all()


def test_a_reader_used_before_the_fork_opens_its_own_handles_in_each_worker(block_slide, monkeypatch):
    """A forked worker must not share the parent's OpenSlide handle (and its file position)."""
    from wsi_il.slide import TileReader

    reader = TileReader(block_slide.path)
    try:
        first = reader.read(0, 0, 256, 256)  # the parent now holds a handle
        parent_handle = reader._handle()

        def make_load():
            def load(i: int) -> np.ndarray:
                tile = reader.read(256 * i, 0, 256, 256)
                own = reader._handle() is not parent_handle and reader._pid == os.getpid()
                return np.concatenate([tile.ravel(), [own]]).astype(np.uint8)

            return load, lambda: None

        monkeypatch.setenv(READERS_ENV, "processes")
        rows = np.concatenate(
            [items.copy() for items, _ in read_batches(make_load, batch_ranges(0, 6, 2), 2, (256 * 256 * 3 + 1,))]
        )
        assert rows[:, -1].all()  # every worker read through a handle of its own
        assert (rows[0, :-1].reshape(256, 256, 3) == first).all()
        assert reader._handle() is parent_handle  # the parent's is untouched
    finally:
        reader.close()


def _failing(i: int) -> np.ndarray:
    if i == 17:
        raise SlideError("slide.svs: cannot read the region at (17, 0)", "the slide file may be damaged")
    return np.zeros(2)


def test_a_readers_error_reaches_the_parent_whole_and_the_workers_stop():
    with pytest.raises(SlideError) as caught:
        for _ in read_batches(lambda: (_failing, lambda: None), batch_ranges(0, 64, 8), 2, (2,), np.float64):
            pass
    assert caught.value.hint == "the slide file may be damaged" and "(17, 0)" in caught.value.message
    assert not multiprocessing.active_children()


class _Odd(Exception):
    def __init__(self, message: str, code: int) -> None:  # not rebuilt from its args by pickle
        super().__init__(message)
        self.code = code


def _odd(i: int) -> np.ndarray:
    raise _Odd("a library's own error", 7)


def test_an_error_that_cannot_cross_to_the_parent_arrives_as_its_text():
    with pytest.raises(RuntimeError, match="_Odd: a library's own error"):
        for _ in read_batches(lambda: (_odd, lambda: None), batch_ranges(0, 8, 4), 2, (2,), np.float64):
            pass
    assert not multiprocessing.active_children()


def _dying(i: int) -> np.ndarray:
    if i == 9:
        os.kill(os.getpid(), signal.SIGKILL)  # as the out-of-memory killer would
    return np.zeros(2)


def test_a_reader_killed_is_an_error_not_a_hang():
    started = time.perf_counter()
    with pytest.raises(ReaderError, match="reader process stopped"):
        for _ in read_batches(lambda: (_dying, lambda: None), batch_ranges(0, 64, 8), 2, (2,), np.float64):
            pass
    assert time.perf_counter() - started < 30
    assert not multiprocessing.active_children()


def _slow(i: int) -> np.ndarray:
    time.sleep(0.05)
    return np.zeros(2)


def test_stopping_early_ends_the_workers_at_once():
    batches = batch_ranges(0, 10_000, 8)  # minutes of work
    started = time.perf_counter()
    for k, _ in enumerate(read_batches(lambda: (_slow, lambda: None), batches, 2, (2,), np.float64)):
        if k == 1:
            break  # the generator is closed here, as on Ctrl-C or an error in the caller
    assert time.perf_counter() - started < 10
    assert not multiprocessing.active_children()


_KILLED_PARENT = """
import os, signal, sys, time
import numpy as np
from wsi_il.readers import read_batches

def make_load():
    return (lambda i: time.sleep(0.05) or np.zeros(2)), (lambda: None)

batches = [range(k, k + 4) for k in range(0, 400, 4)]
for _ in read_batches(make_load, batches, 2, (2,)):
    children = [int(p) for p in os.popen(f"pgrep -P {os.getpid()}").read().split()]
    print(" ".join(map(str, children)), flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_readers_end_when_their_parent_is_killed(tmp_path):
    """A command killed with SIGKILL (or by the out-of-memory killer) cannot stop its readers: they notice and end,
    rather than wait for tasks for ever."""
    import subprocess
    import sys

    script = tmp_path / "killed.py"
    script.write_text(_KILLED_PARENT)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert done.returncode == -signal.SIGKILL, done.stderr
    children = [int(p) for p in done.stdout.split()]
    assert len(children) >= 2, done.stdout

    def alive(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True

    deadline = time.monotonic() + 15
    while any(alive(pid) for pid in children) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(alive(pid) for pid in children), "reader processes outlived their killed parent"


def _by_spec() -> tuple:
    """A ReaderPool's load: spec ('block', i) -> _numbered(i); ('sums', i) -> 3 floats, never dropped."""

    def load(spec):
        kind, i = spec
        return _numbered(i) if kind == "block" else np.array([i, i / 2, -i], np.float64)

    return load, lambda: None


@pytest.mark.parametrize("kind", ["processes", "threads"])
def test_one_reader_pool_serves_reads_of_other_items_in_turn(monkeypatch, kind):
    """Started once (``ReaderPool``): a read of small float rows, then one of int blocks, from the same
    readers, each item what its spec says, in order; a read cut short stops the readers."""
    from wsi_il.readers import ReaderPool

    monkeypatch.setenv(READERS_ENV, kind)
    with ReaderPool(_by_spec, 3, 10, 10 * 4 * 4 * 4) as pool:
        sums = [
            rows.copy() for rows, kept in pool.read(batch_ranges(0, 23, 7), (3,), np.float64, lambda i: ("sums", i))
        ]
        assert np.concatenate(sums).tolist() == [[i, i / 2, -i] for i in range(23)]
        for batch, (items, kept) in zip(
            batch_ranges(5, 48, 10),
            pool.read(batch_ranges(5, 48, 10), (4, 4), np.int32, lambda i: ("block", i)),
            strict=True,
        ):
            assert (kept == np.array([i % 3 != 2 for i in batch])).all()
            assert (items[kept] == np.array(batch)[kept][:, None, None]).all()
        if kind == "processes":
            with pytest.raises(ValueError, match="exceeds"):  # more than a slot holds
                next(pool.read(batch_ranges(0, 20, 20), (4, 4), np.int32, lambda i: ("block", i)))
            with pytest.raises(RuntimeError, match="stopped"):
                next(pool.read(batch_ranges(0, 5, 5), (4, 4), np.int32, lambda i: ("block", i)))
    assert not multiprocessing.active_children()
