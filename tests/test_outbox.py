"""The engine thread's outputs reach an asyncio loop's thread in order, one wake-up a batch, and the
wake-up keeps the GIL, so the loop's thread runs when the engine thread lets it (in the model's
native kernels), not the moment it is woken. Real loops, threads and pipes."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading

import pytest

from fundament.engine.outbox import LoopInbox, _write


def test_batches_from_another_thread_arrive_in_order_and_a_failing_put_stays_its_own():
    got: list[int] = []

    def put(i):
        if i == 13:
            raise ValueError("this caller is broken")
        got.append(i)

    async def main():
        inbox = LoopInbox.of(asyncio.get_running_loop())
        assert LoopInbox.of(asyncio.get_running_loop()) is inbox
        sender = threading.Thread(target=lambda: [inbox.send([(put, 3 * b + j) for j in range(3)]) for b in range(40)])
        sender.start()
        while len(got) < 119:
            await asyncio.sleep(0.005)
        sender.join()

    asyncio.run(asyncio.wait_for(main(), 10))
    assert got == [i for i in range(120) if i != 13]


def test_a_closed_loop_refuses_outputs():
    loop = asyncio.new_event_loop()
    inbox = LoopInbox.of(loop)
    loop.close()
    with pytest.raises(RuntimeError, match="closed"):
        inbox.send([(print, 1)])


# Run in a fresh interpreter: any other thread of the test process waiting for the GIL (with the
# switch interval it started waiting under) could force a switch that has nothing to do with this.
GIL_CHECK = """
import asyncio, os, select, sys, threading, time
from fundament.engine.outbox import LoopInbox, _write

r, w = os.pipe()
ready, ran = threading.Event(), []

def waiter():
    ready.set()
    select.select([r], [], [])  # the GIL released while blocked here
    ran.append(True)  # needs the GIL

sys.setswitchinterval(2.0)  # no forced switch within the check: only a release lets it run
loop = asyncio.new_event_loop()
inbox = LoopInbox.of(loop)
t = threading.Thread(target=waiter)
t.start()
ready.wait()
time.sleep(0.05)  # the waiter is in select
_write(w, b"\\0", 1)  # wake it, GIL held: from here on it waits for the GIL
for i in range(500):
    inbox.send([(print, None)])
    if ran:
        sys.exit(f"the waiting thread ran during wake-up {i}: the GIL was released")
time.sleep(0.01)  # now release it
t.join(5)
sys.exit(0 if ran else "the waiting thread never ran")
"""


@pytest.mark.skipif(_write is None, reason="no C library to call with the GIL held")
def test_waking_a_loop_keeps_the_gil():
    """A thread that is waiting for the GIL does not get it while this thread sends 500 batches:
    the wake-up byte is written with the GIL held. (socket.send or os.write would let it in.)"""
    done = subprocess.run([sys.executable, "-c", GIL_CHECK], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
