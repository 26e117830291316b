"""How the engine thread hands outputs to their callers: a step's outputs are gathered while it
samples and delivered at its end, in order, one wake-up per asyncio loop. Knows requests' callbacks
and asyncio; nothing of models or scheduling."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from .request import EngineOutput, EngineRequest, ScoreOutput

log = logging.getLogger(__name__)

Item = EngineOutput | ScoreOutput | BaseException


class LoopDelivery:
    """An on_output that hands each output to an asyncio loop's thread (`put` runs there). The
    outbox gathers a step's outputs for one loop into one call (`deliver_all`), so the loop's
    thread wakes once a step, after sampling, instead of once a row in the middle of it."""

    def __init__(self, loop: asyncio.AbstractEventLoop, put: Callable[[Any], object]):
        self.loop, self.put = loop, put

    def __call__(self, out: Any) -> None:
        self.loop.call_soon_threadsafe(self.put, out)

    @staticmethod
    def deliver_all(items: list[tuple[Callable[[Any], object], Any]]) -> None:
        for put, out in items:
            put(out)


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
        loops: dict[asyncio.AbstractEventLoop, list[tuple[EngineRequest, Callable, object]]] = {}
        for req, out in items:
            if isinstance(req.on_output, LoopDelivery):
                loops.setdefault(req.on_output.loop, []).append((req, req.on_output.put, out))
            elif isinstance(out, BaseException):
                tell_error(req, out)
            else:
                try:
                    req.on_output(out)
                except Exception as e:
                    log.exception("request %s failed in the engine", req.request_id)
                    fail(req, e)
        for loop, group in loops.items():
            try:
                loop.call_soon_threadsafe(LoopDelivery.deliver_all, [(put, out) for _, put, out in group])
            except RuntimeError as e:  # the loop is closed: its callers are gone
                for req, _, _ in group:
                    fail(req, e)
