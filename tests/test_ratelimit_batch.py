"""Reservations batched per loop turn (`proxy/state/reservations.py` + the batch form of
`proxy/state/lua/reserve.lua`), on both stores: the embedded one and a test-owned redis-server.

- Concurrent reservations of one turn are one script call, and each request is still taken in
  arrival order, all or nothing: exactly the limit is admitted, and each reply is its own.
- Plans with different keys share a batch: a key that appears in both blocks (the global scope)
  is counted once, across both.
- A request refused in a batch reserves nothing (its tokens stay for the requests after it).
- No reply reaches every waiter as its own `StoreUnavailable`.
"""
from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest
import redis

from config import parse_config
from proxy.state.reservations import REQUESTS, TOKENS, ReserveBatcher
from middlewares.ratelimit.plan import Plan
from proxy.context import Principal
from proxy.state.store import Store, StoreUnavailable, counter_keys, limits_key
from tests.servers import free_port


@pytest.fixture(params=["embedded", "redis"])
def url(request: pytest.FixtureRequest) -> str:
    return "" if request.param == "embedded" else request.getfixturevalue("redis_server")["url"]


def store_for(url: str) -> Store:
    return Store(parse_config(f'state: {{redis_url: "{url}", redis_timeout: 2s}}\n', "s.yaml", {}))


def evalsha_calls(url: str) -> int:
    if not url:
        return 0
    stats = redis.Redis.from_url(url).info("commandstats")
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0)) + int(stats.get("cmdstat_eval", {}).get("calls", 0))


def test_one_turn_is_one_call_and_exact(url: str) -> None:
    store = store_for(url)
    batcher = ReserveBatcher(SimpleNamespace(store=store))  # type: ignore[arg-type]
    plan = Plan((10, None), {}, None, None, ())

    async def scenario() -> list[Any]:
        await batcher.reserve(plan.block, "warm", 1)  # loads the script: not counted below
        before = evalsha_calls(url)
        replies = await asyncio.gather(*(batcher.reserve(plan.block, f"m{i}", 1) for i in range(40)))
        calls = evalsha_calls(url) - before
        await store.aclose()
        return [calls, replies]

    calls, replies = asyncio.run(scenario())
    if url:
        assert calls == 1, "40 reservations of one loop turn: one script call"
    admitted = [r.admitted for r in replies]
    assert admitted == [True] * 9 + [False] * 31, "the warm-up took 1 of 10; then arrival order, exactly"
    # each reply is its own: the remaining count falls one by one, the refused ones say when to retry
    assert [r.requests.remaining for r in replies[:9]] == list(range(8, -1, -1))
    assert all(r.retry_ms > 0 for r in replies[9:])
    assert all((r.refused_scope, r.refused_limit) == (1, REQUESTS) for r in replies[9:]), "the global rpm refused them"
    assert all((r.refused_scope, r.refused_limit) == (0, 0) for r in replies[:9])


def test_plans_with_a_shared_key_count_it_once(url: str) -> None:
    store = store_for(url)
    batcher = ReserveBatcher(SimpleNamespace(store=store))  # type: ignore[arg-type]
    alice = Plan((3, None), {}, Principal("alice"), None, ())
    bob = Plan((3, None), {}, Principal("bob"), None, ())
    assert alice.block.keys[0] == bob.block.keys[0] and alice.block.keys != bob.block.keys  # the global log, then their own keys

    async def scenario() -> list[Any]:
        calls = [batcher.reserve(p.block, f"{name}{i}", 1)
                 for i in range(2) for name, p in (("alice", alice), ("bob", bob))]
        replies = await asyncio.gather(*calls)
        await store.aclose()
        return replies

    replies = asyncio.run(scenario())
    assert [r.admitted for r in replies] == [True, True, True, False], "global rpm 3 across both plans, in arrival order"
    if url:
        assert redis.Redis.from_url(url).zcard(counter_keys("global")[0]) == 3


def test_a_refused_request_reserves_nothing(url: str) -> None:
    """Tokens per minute 100: 60 fits, 60 more does not, and the refused one leaves room for 40."""
    store = store_for(url)
    batcher = ReserveBatcher(SimpleNamespace(store=store))  # type: ignore[arg-type]
    plan = Plan((None, 100), {}, None, None, ())

    async def scenario() -> list[Any]:
        replies = await asyncio.gather(batcher.reserve(plan.block, "a", 60),
                                       batcher.reserve(plan.block, "b", 60),
                                       batcher.reserve(plan.block, "c", 40))
        await store.aclose()
        return replies

    replies = asyncio.run(scenario())
    assert [r.admitted for r in replies] == [True, False, True]
    assert (replies[1].refused_scope, replies[1].refused_limit) == (1, TOKENS), "the global tpm refused it"


def test_the_reply_names_the_most_constraining_scope_per_dimension(url: str) -> None:
    """reserve.lua reports the figures the rate-limit headers need: for requests and for tokens
    separately, the checked scope with the lowest remaining share of a limit above 0 (the first on a
    tie; scope 0 when none applies), then the effective limits of the checked scopes that have a
    live limit set (and only those: the defaults are the caller's own)."""
    store = store_for(url)
    batcher = ReserveBatcher(SimpleNamespace(store=store))  # type: ignore[arg-type]
    # global: 1000 rpm, 100 tpm; key: 10 rpm, 100000 tpm; model: unlimited
    tight = Plan((1000, 100), {}, Principal("tight", rpm=10, tpm=100000), "m", ())
    loose = Plan((None, None), {}, None, "m", ())
    # after the first (the second sets no global rpm, so it is not logged there), a global 2 rpm
    # leaves 0 of 2 and the key's 1 rpm 0 of 1: a tie, and the first scope wins
    even = Plan((2, None), {}, Principal("even", rpm=1), None, ())

    async def scenario() -> list[Any]:
        replies = [await batcher.reserve(tight.block, "t", 50), await batcher.reserve(loose.block, "l", 1),
                   await batcher.reserve(even.block, "e", 1)]
        await store.call(lambda c: c.hset(limits_key("model:m"), "tokens_per_minute", 5000))
        replies.append(await batcher.reserve(loose.block, "l2", 1))
        await store.aclose()
        return replies

    tight_reply, loose_reply, even_reply, live_reply = asyncio.run(scenario())
    assert tight_reply.requests == (2, 10, 9, 60000), "requests: the key's 10 rpm, 9 left, a full window to reset"
    assert tight_reply.tokens[:3] == (1, 100, 50), "tokens: the global 100 tpm, 50 left"
    assert tight_reply.live == (), "no live limits: nothing more"
    assert loose_reply.requests is None and loose_reply.tokens is None
    assert even_reply.requests[:3] == (1, 2, 0) and even_reply.tokens is None
    assert live_reply.tokens[:3] == (2, 5000, 4999) and live_reply.live == (2, -1, 5000), \
        "the model (scope 2 here: no key) has a live 5000 tpm: its figures, and its effective limits"


def test_no_reply_reaches_every_waiter() -> None:
    store = store_for(f"redis://127.0.0.1:{free_port()}/0")  # nobody listens there
    batcher = ReserveBatcher(SimpleNamespace(store=store))  # type: ignore[arg-type]
    plan = Plan((10, None), {}, None, None, ())

    async def scenario() -> list[Any]:
        out = await asyncio.gather(*(batcher.reserve(plan.block, f"m{i}", 1) for i in range(5)),
                                   return_exceptions=True)
        await store.aclose()
        return out

    errors = asyncio.run(scenario())
    assert all(isinstance(e, StoreUnavailable) for e in errors), errors
    assert len({id(e) for e in errors}) == 5, "one exception instance per waiter"


def test_the_packed_call_is_the_call_hiredis_would_pack() -> None:
    """The hot path packs a batch from each plan's pieces packed once; the bytes must be exactly what
    packing the KEYS and ARGV values (the embedded store's form) gives."""
    from proxy.state.reservations import _lists, _packed
    from proxy.state.redis_wire import Packed

    alice = Plan((3, 1000), {"a": (5, None)}, Principal("alice", rpm=2, max_concurrent=3), "gpt-4o", ("a", "b"))
    bob = Plan((3, 1000), {}, Principal("bob"), None, ())
    loop = asyncio.new_event_loop()
    try:
        batch = [(alice, "m-1", 17), (bob, "m-2", 0), (alice, "m-é", 123456789)]
        waiters = [(p.block, member, tokens, loop.create_future()) for p, member, tokens in batch]
        expected = Packed.of(*_lists(waiters))
        got = _packed(waiters)
        assert (got.count, got.body) == (expected.count, expected.body)
    finally:
        loop.close()


def test_settlement_batches_pack_exactly_like_their_values() -> None:
    """The packed reconcile.lua call (per-plan pieces joined per record) is byte for byte the call
    made from values, with and without common scopes, deployments and a concurrency key."""
    from proxy.state.settlements import SettleBlock, _lists, _packed
    from proxy.state.redis_wire import Packed

    common = SettleBlock([b"llmgw:{llmgw}:rl:global:tok", b"llmgw:{llmgw}:limits:global"] * 3, [1000, -1, 7])
    dep = SettleBlock([b"llmgw:{llmgw}:rl:provider:a:tok", b"llmgw:{llmgw}:limits:provider:a"], [500])
    other = SettleBlock([b"llmgw:{llmgw}:rl:provider:b:tok", b"llmgw:{llmgw}:limits:provider:b"], [-1])
    none = SettleBlock([], [])
    batch = [("r1:m1", "r1:m1", None, 17, common, [dep], 1040),
             ("r2:m2:failed", "r2:m2", None, -30, none, [dep, dep], 30),
             ("r3:m3", "r3:m3", "llmgw:{llmgw}:inflight:k", 0, common, [], 5),
             ("r4:m4", "r4:m4", None, 3, common, [other], 9)]  # same plan, another deployment: its own shape
    packed, from_values = _packed(batch), Packed.of(*_lists(batch))
    assert (packed.count, packed.body) == (from_values.count, from_values.body)
    again = _packed(batch[::-1])  # every shape now comes from the plans' caches
    assert (again.count, again.body) == (Packed.of(*_lists(batch[::-1])).count, Packed.of(*_lists(batch[::-1])).body)
    keys, args = _lists(batch[2:3])
    assert keys[:2] == [b"llmgw:{llmgw}:settled:r3:m3", b"llmgw:{llmgw}:inflight:k"]
    assert args == [8, 8, "r3:m3", 0, 1000, -1, 7, 5]  # length, keys, member, delta, tpm per scope, estimate
