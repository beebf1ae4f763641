"""The limiter's per-request work, driven straight through `RateLimitMiddleware` (no HTTP) on both
stores: the embedded one and a test-owned redis-server.

- What repeats per (key policy, model, candidate set) is built once and reused, and follows a policy
  change; the KEYS and ARGV sent are exactly the layout `proxy/state/lua/reserve.lua` documents.
- Member ids are unique per reservation (also across processes) and keep the request id.
- A finished request leaves no reference cycle behind: every context is freed by reference counting,
  never by a cyclic GC pass (those passes cost CPU on every request under load).
"""
from __future__ import annotations

import asyncio
import gc
from types import SimpleNamespace
from typing import Any

import pytest

from config import parse_config
from middlewares.ratelimit.middleware import RateLimitMiddleware
from proxy.context import Principal, RequestContext, Usage, get_context, set_context
from proxy.state.health import PROBE_LOCK_MS, health_key, probe_key
from proxy.runtime import Runtime
from proxy.state.store import concurrency_key, counter_keys, limits_key


@pytest.fixture(params=["embedded", "redis"])
def url(request: pytest.FixtureRequest) -> str:
    return "" if request.param == "embedded" else request.getfixturevalue("redis_server")["url"]


def config_for(url: str) -> Any:
    # figures, not deadlines: on a loaded machine a first call (connect, script load) may outlast 250 ms
    return parse_config(f"""
gateway: {{timeout: 30s, rate_limit: {{requests_per_minute: 100000, tokens_per_minute: 100000000}}}}
state: {{redis_url: "{url}", redis_timeout: 2s}}
providers:
  a: {{type: openai, base_url: "http://127.0.0.1:9/v1", api_key: k, rate_limit: {{requests_per_minute: 7000}}}}
  b: {{type: openai, base_url: "http://127.0.0.1:9/v1", api_key: k}}
""", "t.yaml", {})


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    get_context(scope).usage = Usage(3, 4)
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": b"{}"})


class Harness:
    def __init__(self, url: str) -> None:
        self.config = config_for(url)
        self.runtime = Runtime(self.config)
        self.middleware = RateLimitMiddleware(app, self.config, deps=self.runtime)

    async def request(self, i: int, principal: Principal, model: str = "gpt-4o") -> tuple[RequestContext, list[Any]]:
        ctx = RequestContext(request_id=f"req-{i}", family="openai", adapter=self.runtime.adapters["openai"],
                             method="POST", path="/v1/chat/completions", query="", headers=[])
        ctx.principal, ctx.model, ctx.estimated_tokens = principal, model, 10
        ctx.candidates = list(self.config.providers)
        ctx.deployment, ctx.committed, ctx.status = ctx.candidates[0], True, 200
        scope: dict[str, Any] = {"type": "http"}
        set_context(scope, ctx)
        sent: list[Any] = []

        async def send(message: Any) -> None:
            sent.append(message)

        await self.middleware(scope, None, send)
        return ctx, sent

    async def aclose(self) -> None:
        await self.middleware.settlements.drain()
        await self.runtime.store.aclose()


def test_plans_are_built_once_per_policy_and_match_the_script_layout(url: str) -> None:
    async def scenario() -> None:
        h = Harness(url)
        key = Principal(key_id="team", rpm=50, max_concurrent=4)
        first, sent = await h.request(1, key)
        assert first.deployment is not None and first.deployment.name == "a"
        assert dict(first.response_headers or ())[b"x-ratelimit-limit-requests"] == b"50"  # the key is the tightest
        plan = h.middleware.plan(first)
        again, _ = await h.request(2, Principal(key_id="team", rpm=50, max_concurrent=4))
        assert h.middleware.plan(again) is plan, "same policy, model and candidates: the same plan"
        changed, sent = await h.request(3, Principal(key_id="team", rpm=40, max_concurrent=4))
        assert h.middleware.plan(changed) is not plan, "a policy change builds a new plan"
        assert dict(changed.response_headers or ())[b"x-ratelimit-limit-requests"] == b"40"

        scopes = ["global", "key:team", "model:gpt-4o"]
        keys = [k for s in scopes for k in (*counter_keys(s), limits_key(s))]
        keys += [k for d in ("a", "b") for k in (*counter_keys(f"provider:{d}"), limits_key(f"provider:{d}"),
                                                 health_key(d), probe_key(d))]
        assert [k.decode() for k in plan.block.keys] == [*keys, concurrency_key("team")]
        # common scopes, concurrency cap, lease, probe lock, then the default limits per scope
        assert plan.block.tail == [3, 4, 90000, PROBE_LOCK_MS, b"100000", b"100000000", b"50", b"-1", b"-1", b"-1",
                                   b"7000", b"-1", b"-1", b"-1"]
        await h.aclose()

    asyncio.run(scenario())


def test_member_ids_are_unique_and_keep_the_request_id(url: str) -> None:
    async def scenario() -> list[str]:
        replicas = [Harness(url), Harness(url)]  # two processes' worth of middleware
        members = []
        for i in range(200):
            ctx, _ = await replicas[i % 2].request(i % 7, Principal(key_id="m"))  # request ids repeat on purpose
            members.append(ctx.reservation["member"])
            assert ctx.reservation["member"].startswith(f"req-{i % 7}:")
        for h in replicas:
            await h.aclose()
        return members

    members = asyncio.run(scenario())
    assert len(set(members)) == len(members)


def test_a_finished_request_leaves_no_reference_cycle(url: str) -> None:
    async def scenario() -> int:
        h = Harness(url)
        await h.request(0, Principal(key_id="gc"))
        await asyncio.sleep(0.05)  # the first settlement batch, the store's own lazy setup
        gc.collect()
        gc.disable()
        try:
            for i in range(50):
                await h.request(i, Principal(key_id="gc"))
            await h.aclose()
            return gc.collect()
        finally:
            gc.enable()

    assert asyncio.run(scenario()) == 0


def test_rate_limit_headers_are_formatted_exactly() -> None:
    """Every limited response carries these: IETF draft-11 fields plus the family's own, byte for byte
    (requests only, tokens only, both; a reset in ms rounds up to whole seconds for `t`)."""
    from providers import build_adapters

    openai = build_adapters()["openai"]
    req, tok = (50, 48, 1500, "key:team"), (1000, 750, 60000, "global")
    assert openai.rate_limit_headers(req, None) == [
        (b"ratelimit-policy", b'"requests";q=50;w=60'), (b"ratelimit", b'"requests";r=48;t=2'),
        (b"x-ratelimit-limit-requests", b"50"), (b"x-ratelimit-remaining-requests", b"48"),
        (b"x-ratelimit-reset-requests", b"1.5s")]
    assert openai.rate_limit_headers(None, tok)[:2] == [
        (b"ratelimit-policy", b'"tokens";q=1000;w=60;llmgw-unit="tokens"'), (b"ratelimit", b'"tokens";r=750;t=60')]
    both = dict(openai.rate_limit_headers(req, tok))
    assert both[b"ratelimit-policy"] == b'"requests";q=50;w=60, "tokens";q=1000;w=60;llmgw-unit="tokens"'
    assert both[b"ratelimit"] == b'"requests";r=48;t=2, "tokens";r=750;t=60'
    assert both[b"x-ratelimit-reset-tokens"] == b"1m0s" and both[b"x-ratelimit-limit-tokens"] == b"1000"
    assert openai.rate_limit_headers(None, None) == []


def test_settlements_queued_at_shutdown_are_sent_before_the_store_closes(redis_server: dict[str, Any]) -> None:
    """Closing the runtime drains the settlement queue first: a request that finished just before
    shutdown still has its reservation reconciled (and its concurrency slot freed) in Redis."""
    import redis

    async def scenario() -> list[str]:
        h = Harness(redis_server["url"])
        members = []
        for i in range(5):
            ctx, _ = await h.request(i, Principal(key_id="bye", max_concurrent=10))
            members.append(ctx.reservation["member"])
        assert h.middleware.settlements.queue, "settled on a timer, not yet sent"
        await h.runtime.aclose()  # no explicit drain: shutdown does it
        return members

    members = asyncio.run(scenario())
    r = redis.Redis.from_url(redis_server["url"])
    assert all(r.exists(f"llmgw:{{llmgw}}:settled:{m}") for m in members)
    assert r.zcard(concurrency_key("bye")) == 0, "every concurrency slot was freed"


def test_a_live_limit_change_is_logged_once_by_each_replica(url: str) -> None:
    """A replica logs `limit_applied` when a request first sees a scope's effective limits change
    (set live through the store, as the CLI, the admin API or redis-cli do), once per change, with
    the old and new values; an unchanged limit logs nothing. Clearing a live limit is a change too
    (back to the configured default)."""
    from structlog.testing import capture_logs

    from proxy.state.live_limits import clear_limit, set_limit

    async def scenario() -> list[dict[str, Any]]:
        h = Harness(url)
        key = Principal(key_id="live", rpm=50)
        with capture_logs() as logs:
            await h.request(1, key)  # first sight of every scope: nothing to compare with
            await h.request(2, key)
            await set_limit(h.runtime.store, "key:live", 20, None)
            await h.request(3, key)
            await h.request(4, key)  # same limits: no second line
            await set_limit(h.runtime.store, "model:gpt-4o", None, 900)
            await h.request(5, key)
            await clear_limit(h.runtime.store, "key:live")
            await h.request(6, key)
        await h.aclose()
        return [e for e in logs if e["event"] == "limit_applied"]

    lines = asyncio.run(scenario())
    assert [(e["scope"], e["requests_per_minute"], e["tokens_per_minute"], e["previous_requests_per_minute"],
             e["previous_tokens_per_minute"]) for e in lines] == [
        ("key:live", 20, -1, 50, -1), ("model:gpt-4o", -1, 900, -1, -1), ("key:live", 50, -1, 20, -1)]


def test_a_failed_settlement_batch_is_logged_and_the_queue_keeps_working(redis_server: dict[str, Any]) -> None:
    """Settling never reaches a request: with Redis unreachable a batch is logged as skipped, an
    error reply is logged as failed, and in both cases later batches still go out (the timer is
    re-armed, nothing stays in flight)."""
    import redis
    from structlog.testing import capture_logs

    from proxy.state.settlements import SettleBlock, Settlements
    from proxy.state.store import Store, done_key
    from tests.servers import free_port

    def settlements(url: str) -> tuple[Store, Settlements]:
        store = Store(parse_config(f'state: {{redis_url: "{url}", redis_timeout: 1s}}\n', "s.yaml", {}))
        return store, Settlements(SimpleNamespace(store=store), {})  # type: ignore[arg-type]

    def block(name: str) -> SettleBlock:  # one scope: token TAT key, live-limit hash, 1000 tpm
        return SettleBlock([counter_keys(name)[1].encode(), limits_key(name).encode()], [1000])

    # a token TAT that is not a number makes reconcile.lua fail: an error reply
    redis.Redis.from_url(redis_server["url"]).set(counter_keys("key:spoiled")[1], "garbage")

    async def scenario() -> tuple[list[dict[str, Any]], int, int]:
        with capture_logs() as logs:
            store, queue = settlements(f"redis://127.0.0.1:{free_port()}/0")  # nobody listens there
            for i in range(3):
                queue.add(f"down{i}", f"down{i}", None, 5, block("global"), [], 10)
            await queue.drain()
            await store.aclose()
            store, queue = settlements(redis_server["url"])
            queue.add("bad", "bad", None, 5, block("key:spoiled"), [], 10)
            await queue.drain()
            queue.add("good", "good", None, 5, block("global"), [], 10)
            await asyncio.sleep(0.05)  # on its timer, not drained
            queued, in_flight = len(queue.queue), len(queue.in_flight)
            await store.aclose()
        return [e for e in logs if e["event"].startswith("reconcile_")], queued, in_flight

    events, queued, in_flight = asyncio.run(scenario())
    assert [(e["event"], e["count"]) for e in events] == [("reconcile_skipped", 3), ("reconcile_failed", 1)]
    assert queued == 0 and in_flight == 0
    assert redis.Redis.from_url(redis_server["url"]).exists(done_key("good")) == 1
