"""How the engine thread hands outputs to their callers: a step's outputs are gathered while it
samples and delivered at its end, in order, one wake-up per asyncio loop, made so that the loop's
work overlaps the next forward pass. Knows requests' callbacks, asyncio and the GIL; nothing of
models or scheduling."""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import weakref
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from .request import EngineOutput, EngineRequest, ScoreOutput

log = logging.getLogger(__name__)

Item = EngineOutput | ScoreOutput | BaseException


def _gil_holding_write() -> Callable[[int, bytes, int], int] | None:
    """libc's write(2) called through ctypes.PyDLL, which keeps the GIL during the call."""
    try:
        write = ctypes.PyDLL(None).write
    except (OSError, AttributeError, TypeError):  # no C library to load this way (Windows)
        return None
    write.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t]
    write.restype = ctypes.c_ssize_t
    return write


_write = _gil_holding_write()


class LoopInbox:
    """Batches of outputs waiting for one asyncio loop's thread, and the pipe that wakes it.

    `loop.call_soon_threadsafe` wakes a loop with `socket.send`, which releases the GIL: the woken
    loop thread then takes the GIL and runs its callbacks (SSE chunks, JSON, socket writes) while
    the engine thread, back from its one-byte send, waits for it before it can start the next step.
    Measured at one HTTP stream on the default model on a busy machine: ~0.6 ms of a 6 ms step
    (py-spy: 6.5% of the engine thread in that send); through HTTP, 16 and 64 streams gained 3-5%,
    one stream about nothing on a quiet machine. Here the wake-up byte is written with the GIL held (ctypes.PyDLL), so the loop thread
    wakes but runs only once the engine thread releases the GIL itself, in the next forward pass's
    native kernels: its work then overlaps the model's instead of preceding it. Made in the loop's
    own thread (add_reader is not thread-safe); `send` may be called from any thread."""

    _by_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, LoopInbox] = weakref.WeakKeyDictionary()

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = weakref.ref(loop)  # a loop's inbox must not keep it alive
        self._batches: deque[list[tuple[Callable[[Any], object], Any]]] = deque()
        self._rfd, self._wfd = os.pipe()
        for fd in (self._rfd, self._wfd):
            os.set_blocking(fd, False)
        weakref.finalize(loop, _close, self._rfd, self._wfd)
        loop.add_reader(self._rfd, self._deliver)

    @classmethod
    def of(cls, loop: asyncio.AbstractEventLoop) -> LoopInbox:
        inbox = cls._by_loop.get(loop)
        if inbox is None:
            inbox = cls._by_loop[loop] = cls(loop)
        return inbox

    def send(self, batch: list[tuple[Callable[[Any], object], Any]]) -> None:
        """Queue `put(out)` calls to run on the loop's thread, in order; RuntimeError if the loop
        is closed (its callers are gone)."""
        loop = self._loop()
        if loop is None or loop.is_closed():
            raise RuntimeError("Event loop is closed")
        self._batches.append(batch)
        try:
            if _write is not None:
                _write(self._wfd, b"\0", 1)  # full pipe (-1, EAGAIN): a wake-up is pending anyway
            else:
                os.write(self._wfd, b"\0")
        except BlockingIOError:
            pass

    def _deliver(self) -> None:
        """On the loop's thread: empty the pipe first, then the batches, so a batch queued after
        this read has a byte of its own that wakes the loop again."""
        try:
            while os.read(self._rfd, 4096):
                pass
        except BlockingIOError:
            pass
        while self._batches:
            for put, out in self._batches.popleft():
                try:
                    put(out)
                except Exception:  # one caller's fault stays its own
                    log.exception("could not deliver an engine output")


def _close(*fds: int) -> None:
    for fd in fds:
        os.close(fd)


class LoopDelivery:
    """An on_output that hands each output to an asyncio loop's thread (`put` runs there), through
    the loop's LoopInbox. The outbox sends a step's outputs for one loop as one batch, so the
    loop's thread wakes once a step, after sampling, instead of once a row in the middle of it."""

    def __init__(self, loop: asyncio.AbstractEventLoop, put: Callable[[Any], object]):
        self.inbox, self.put = LoopInbox.of(loop), put

    def __call__(self, out: Any) -> None:
        self.inbox.send([(self.put, out)])


def tell_error(req: EngineRequest, error: BaseException) -> None:
    """Give a request's caller its error; a callback that fails too has nothing more to be told."""
    try:
        req.on_output(error)
    except Exception:
        log.exception("could not deliver an error to request %s", req.request_id)


class Outbox:
    """Outputs on their way from the engine thread. Outside `gathering`, an output goes to its
    caller at once (an exception from the caller's callback reaches the code that put it); inside,
    outputs wait and are delivered when the block ends, errors included, in the order put."""

    def __init__(self) -> None:
        self._items: list[tuple[EngineRequest, Item]] | None = None

    def put(self, req: EngineRequest, out: EngineOutput | ScoreOutput) -> None:
        if self._items is None:
            req.on_output(out)
        else:
            self._items.append((req, out))

    def put_error(self, req: EngineRequest, error: BaseException) -> None:
        if self._items is None:
            tell_error(req, error)
        else:  # after the outputs it had this step, in order
            self._items.append((req, error))

    @contextmanager
    def gathering(self, fail: Callable[[EngineRequest, BaseException], None]) -> Iterator[None]:
        """Gather what is put in the block and deliver it when the block ends: one call per asyncio
        loop for the outputs going to a loop's thread (LoopDelivery), which then wakes once, while
        the next forward pass runs, rather than once a row, competing with the sampling of the rows
        after it. A request whose delivery fails is handed to `fail`, after the gathering."""
        self._items = []
        try:
            yield
        finally:
            items, self._items = self._items, None
            self._deliver(items, fail)

    @staticmethod
    def _deliver(items: list[tuple[EngineRequest, Item]], fail: Callable[[EngineRequest, BaseException], None]) -> None:
        loops: dict[LoopInbox, list[tuple[EngineRequest, Callable, object]]] = {}
        for req, out in items:
            if isinstance(req.on_output, LoopDelivery):
                loops.setdefault(req.on_output.inbox, []).append((req, req.on_output.put, out))
            elif isinstance(out, BaseException):
                tell_error(req, out)
            else:
                try:
                    req.on_output(out)
                except Exception as e:
                    log.exception("request %s failed in the engine", req.request_id)
                    fail(req, e)
        for inbox, group in loops.items():
            try:
                inbox.send([(put, out) for _, put, out in group])
            except RuntimeError as e:  # the loop is closed: its callers are gone
                for req, _, _ in group:
                    fail(req, e)
