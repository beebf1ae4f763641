"""A cancel is never lost on the embedded store, and closing the app stops the health refresher.

fakeredis waits for each reply with `asyncio.wait_for`, which on Python 3.11 can return the reply
and drop a cancel that lands with it. Each case cancels the caller after every possible number of
loop steps, so the cancel lands at every await point of the call in turn. A cancel the store lost
once kept the health refresher looping after the app closed, and `asyncio.run` waited on it for ever.
"""
from __future__ import annotations

import asyncio
from typing import Any, Awaitable, Callable

import pytest

from config import parse_config
from proxy.state.health import SharedHealth, health_key, probe_key
from proxy.state.store import Store
from tests.conftest import standard_config

CONFIG = parse_config(standard_config("http://127.0.0.1:9"), "test.yaml", {})
STEPS = range(25)  # more loop steps than any of these calls takes


async def _pipeline(store: Store) -> Any:
    async def op(c: Any) -> Any:
        async with c.pipeline(transaction=False) as p:
            p.hincrby("llmgw:test:cancel", "n", 1)
            p.expire("llmgw:test:cancel", 60)
            return await p.execute()
    return await store.call(op)


async def _command(store: Store) -> Any:
    return await store.call(lambda c: c.hincrby("llmgw:test:cancel", "n", 1))


async def _script(store: Store) -> Any:
    return await store.script("health", [health_key("x"), probe_key("x")], ["ok", 0, 5, 30000, 300000, 0.5])


@pytest.mark.parametrize("call", [_pipeline, _command, _script], ids=["pipeline", "command", "script"])
def test_a_cancel_during_an_embedded_store_call_is_raised(call: Callable[[Store], Awaitable[Any]]) -> None:
    async def scenario() -> tuple[list[int], list[int]]:
        store = Store(CONFIG)
        assert store.embedded
        await call(store)  # first use builds the client and registers the scripts
        cancelled, lost = [], []
        for steps in STEPS:
            task = asyncio.ensure_future(call(store))
            for _ in range(steps):
                await asyncio.sleep(0)
            if task.done():  # finished before the cancel: nothing to lose
                continue
            task.cancel()
            try:
                await task
                lost.append(steps)
            except asyncio.CancelledError:
                cancelled.append(steps)
        await store.aclose()
        return cancelled, lost

    cancelled, lost = asyncio.run(scenario())
    assert cancelled, "every call finished before its cancel: the case tested nothing"
    assert lost == [], f"cancels lost after {lost} loop steps"


def test_closing_stops_the_health_refresher_wherever_it_is() -> None:
    async def scenario() -> list[int]:
        running = []
        for steps in STEPS:
            store = Store(CONFIG)
            health = SharedHealth(CONFIG, store)
            health.snapshot()  # starts the refresher: one flush and one read, then a pause
            refresher = health._refresher
            assert refresher is not None
            for _ in range(steps):
                await asyncio.sleep(0)
            await asyncio.wait_for(health.aclose(), 5)
            await store.aclose()
            if not refresher.done():
                running.append(steps)
                refresher.cancel()
            health.snapshot()  # a read after close starts no new refresher
            assert health._refresher is refresher
        return running

    assert asyncio.run(scenario()) == []
