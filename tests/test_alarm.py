"""The timer poll's alarm: it wakes the poll at the earliest due time it was told since
the poll began, never before it, and at the latest after its longest wait."""

from __future__ import annotations

import asyncio

from presence_hub.store.alarm import Alarm

#: Far longer than any of these tests runs: a sleep that ends is ended by a due time.
LONG = 60.0
#: How long a test waits for a sleep that should end soon (a slow machine's worst).
PATIENCE = 10.0


async def test_a_sleep_with_nothing_due_ends_after_the_longest_wait() -> None:
    loop = asyncio.get_running_loop()
    alarm = Alarm(loop.time, most=0.2)
    began = loop.time()
    await asyncio.wait_for(alarm.sleep(), PATIENCE)
    assert loop.time() - began >= 0.2


async def test_a_due_time_told_during_a_sleep_ends_it_at_that_time_not_before() -> None:
    loop = asyncio.get_running_loop()
    alarm = Alarm(loop.time, most=LONG)
    sleeping = asyncio.create_task(alarm.sleep())
    await asyncio.sleep(0.05)
    assert not sleeping.done()
    at = loop.time() + 0.1
    alarm.due(at)
    await asyncio.wait_for(sleeping, PATIENCE)
    assert loop.time() >= at


async def test_a_later_due_time_does_not_put_off_an_earlier_one() -> None:
    loop = asyncio.get_running_loop()
    alarm = Alarm(loop.time, most=LONG)
    alarm.due(loop.time() + 0.05)
    alarm.due(loop.time() + LONG / 2)
    await asyncio.wait_for(alarm.sleep(), PATIENCE)


async def test_a_poll_forgets_the_due_times_told_before_it_began() -> None:
    """The poll that begins claims every timer due by then: the sleep after it waits for
    what it found or was told since, not for what it has just fired."""
    loop = asyncio.get_running_loop()
    alarm = Alarm(loop.time, most=0.3)
    alarm.due(loop.time())
    alarm.polling()
    began = loop.time()
    await asyncio.wait_for(alarm.sleep(), PATIENCE)
    assert loop.time() - began >= 0.3

    alarm = Alarm(loop.time, most=LONG)
    alarm.polling()
    alarm.due(loop.time() + 0.05)  # found by the poll, or told while it ran
    await asyncio.wait_for(alarm.sleep(), PATIENCE)
