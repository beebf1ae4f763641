"""The hot path's pipelined Redis connection (`proxy/state/redis_wire.py`) and the store's breaker over it,
against real redis-server processes: the `redis_server` fixture's, or servers started here with AUTH,
ACL users, TLS (a throwaway CA from trustme) or a unix socket.

Faults are real too: SIGSTOP pauses the server (calls miss their deadline), SIGKILL closes its
sockets under a call in flight, `SCRIPT FLUSH` makes the next EVALSHA fail with NOSCRIPT. Nothing
here asserts a duration: deadlines only have to be shorter than a pause that the test ends itself.
"""
from __future__ import annotations

import asyncio
import os
import random
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import redis

from config import parse_config
from proxy.state.redis_wire import Packed, RedisWire, WireConnectionError, WireTimeout
from proxy.state.store import MISSES_TO_OPEN, Store, StoreUnavailable, counter_keys, limits_key
from tests.procs import restart_redis
from tests.servers import free_port

ECHO = "return {KEYS[1], ARGV[1], ARGV[2]}"
COUNT = "return {redis.call('INCR', KEYS[1]), ARGV[1], ARGV[2]}"


def reserve_call(scope: str, member: str) -> tuple[list[str], list[Any]]:
    """reserve.lua, a batch of one request on one common scope (ARGV record: its length, key offset,
    member, tokens, 1 scope, no concurrency cap, lease, probe lock, then the scope's default rpm and tpm)."""
    return [*counter_keys(scope), limits_key(scope)], [10, 0, member, 1, 1, 0, 60000, 0, 1000, -1]


async def reserve(store: Store, scope: str, member: str) -> Any:
    """That one request's reply."""
    return (await store.script("reserve", *reserve_call(scope, member)))[0]


def store_for(url: str, timeout: str = "30s") -> Store:
    return Store(parse_config(f'state: {{redis_url: "{url}", redis_timeout: {timeout}}}\n', "s.yaml", {}))


def info_for(redis_server: dict[str, Any]) -> tuple[int, str]:
    return redis_server["proc"].pid, redis_server["url"]


async def until_answered(store: Store, scope: str, bound: float = 15.0) -> Any:
    """Calls until one is answered (the breaker lets a probe through once per interval)."""
    deadline = time.monotonic() + bound
    while True:
        try:
            return await reserve(store, scope, f"probe-{time.monotonic()}")
        except StoreUnavailable:
            assert time.monotonic() < deadline, "the store never answered again"
            await asyncio.sleep(0.05)


@pytest.fixture
def spawn_redis(tmp_path: Path) -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    """redis-server with extra arguments; waits until `ready()` holds. Stopped at teardown."""
    binary = shutil.which("redis-server")
    if binary is None:
        if os.environ.get("REQUIRE_REDIS") == "1":
            pytest.fail("redis-server is required (REQUIRE_REDIS=1) but not installed")
        pytest.skip("redis-server not installed")
    started: list[subprocess.Popen[bytes]] = []

    def spawn(args: list[str], ready: Callable[[], bool]) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen([binary, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                                 "--dir", str(tmp_path), *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        started.append(proc)
        deadline = time.monotonic() + 10
        while not ready():
            assert proc.poll() is None and time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.02)
        return proc

    yield spawn
    for proc in started:
        proc.kill()
        proc.wait()


def port_open(port: int) -> Callable[[], bool]:
    def check() -> bool:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return True
        except OSError:
            return False

    return check


# --- the connection ------------------------------------------------------------------------------
def test_many_concurrent_callers_share_one_connection_and_get_their_own_replies(redis_server: dict[str, Any]) -> None:
    wire = RedisWire(redis_server["url"], {"echo": ECHO})
    admin = redis.Redis(port=redis_server["port"])

    async def caller(worker: int, rng: random.Random) -> list[bool]:
        ok = []
        for i in range(60):
            tag = f"{worker}-{i}"
            kind = rng.randrange(3)
            if kind == 0:  # one of many in the same loop turn
                ok.append((await asyncio.gather(*(wire.script("echo", [b"k"], [f"{tag}-{j}", "y"], 30) for j in range(3))))
                          == [[b"k", f"{tag}-{j}".encode(), b"y"] for j in range(3)])
            elif kind == 1:
                ok.append(await wire.script("echo", [f"k{tag}"], [tag, "x"], 30) == [f"k{tag}".encode(), tag.encode(), b"x"])
            else:  # the hot path's form: a call packed by the caller
                reply = await wire.script("echo", Packed.of([b"shared"], [tag, "tail"]), [], 30)
                ok.append(reply == [b"shared", tag.encode(), b"tail"])
            for _ in range(rng.randrange(3)):
                await asyncio.sleep(0)
        return ok

    async def scenario() -> tuple[list[bool], int]:
        results = await asyncio.gather(*(caller(w, random.Random(w)) for w in range(64)))
        clients = int(admin.info("clients")["connected_clients"])  # the wire's one, plus this admin client
        wire.close()
        return [ok for r in results for ok in r], clients

    replies, clients = asyncio.run(scenario())
    admin.close()
    assert len(replies) == 64 * 60 and all(replies)
    assert clients == 2


def test_a_caller_that_gives_up_never_shifts_the_replies(redis_server: dict[str, Any]) -> None:
    pid, url = info_for(redis_server)
    wire = RedisWire(url, {"echo": ECHO})

    def echo(tag: str, timeout: float = 30) -> asyncio.Future:
        return wire.script("echo", [b"k"], [tag, "x"], timeout)

    async def scenario() -> list[Any]:
        seen = [(await echo("first"))[1]]
        cancelled = echo("cancelled")
        cancelled.cancel()  # already queued: its reply will arrive and must be dropped
        seen.append((await echo("next"))[1])
        os.kill(pid, signal.SIGSTOP)
        try:
            missed = [echo(f"late-{i}", 0.05) for i in range(5)]
            for call in missed:
                with pytest.raises(WireTimeout):
                    await call
        finally:
            os.kill(pid, signal.SIGCONT)
        # The five late replies arrive first on the same connection; each caller still gets its own.
        seen += [reply[1] for reply in await asyncio.gather(*(echo(f"after-{i}") for i in range(3)))]
        wire.close()
        return seen

    assert asyncio.run(scenario()) == [b"first", b"next", b"after-0", b"after-1", b"after-2"]


def test_noscript_after_a_flush_runs_each_call_exactly_once(redis_server: dict[str, Any]) -> None:
    wire = RedisWire(redis_server["url"], {"count": COUNT})
    admin = redis.Redis(port=redis_server["port"])
    counter = b"llmgw:{llmgw}:test:count"

    async def scenario() -> list[Any]:
        first = await wire.script("count", [counter], ["a", "b"], 30)
        admin.script_flush()
        admin.config_resetstat()
        # 50 calls in flight together: every one gets NOSCRIPT, is resent once as EVAL, runs once.
        replies = await asyncio.gather(*(wire.script("count", Packed.of([counter], [f"m{i}", "tail"]), [], 30)
                                         for i in range(50)))
        after = await wire.script("count", [counter], ["c", "d"], 30)  # EVAL reloaded it: EVALSHA works again
        wire.close()
        return [first, replies, after]

    first, replies, after = asyncio.run(scenario())
    stats = admin.info("commandstats")
    admin.close()
    assert first == [1, b"a", b"b"]
    assert sorted(r[0] for r in replies) == list(range(2, 52))
    assert all(r[1:] == [f"m{i}".encode(), b"tail"] for i, r in enumerate(replies))
    assert after == [52, b"c", b"d"]
    assert stats["cmdstat_eval"]["calls"] == 50
    assert stats["cmdstat_evalsha"]["calls"] == 51 and stats["cmdstat_evalsha"]["failed_calls"] == 50


def test_connection_refused_fails_every_waiting_call() -> None:
    port = free_port()  # nothing listens here
    wire = RedisWire(f"redis://127.0.0.1:{port}/0", {"echo": ECHO})

    async def scenario() -> list[Any]:
        return await asyncio.gather(*(wire.script("echo", [b"k"], ["a", "b"], 30) for _ in range(5)),
                                    return_exceptions=True)

    assert all(isinstance(r, WireConnectionError) for r in asyncio.run(scenario()))


# --- the store over it: breaker, deadlines, reconnects --------------------------------------------
def test_killed_mid_call_fails_at_once_opens_the_breaker_then_reconnects(redis_server: dict[str, Any]) -> None:
    pid, url = info_for(redis_server)
    store = store_for(url)  # a long deadline: only the kill can end the call in flight

    async def scenario() -> None:
        assert (await reserve(store, "kill", "m0"))[0] == 1
        os.kill(pid, signal.SIGSTOP)
        in_flight = asyncio.ensure_future(reserve(store, "kill", "m1"))
        for _ in range(5):  # written and waiting
            await asyncio.sleep(0)
        redis_server["proc"].kill()
        await asyncio.to_thread(redis_server["proc"].wait)
        with pytest.raises(StoreUnavailable):
            await asyncio.wait_for(in_flight, 20)  # a hang guard, not a time limit on the behaviour
        assert store.degraded
        with pytest.raises(StoreUnavailable, match="breaker open"):
            await reserve(store, "kill", "m2")
        await asyncio.to_thread(restart_redis, redis_server)
        reply = await until_answered(store, "kill")  # a fresh server: NOSCRIPT is transparent
        assert reply[0] == 1 and not store.degraded
        await store.aclose()

    asyncio.run(scenario())


def test_paused_redis_misses_deadlines_and_one_slow_reply_never_opens(redis_server: dict[str, Any]) -> None:
    pid, url = info_for(redis_server)
    store = store_for(url, "100ms")

    async def misses(n: int) -> None:
        for i in range(n):
            with pytest.raises(StoreUnavailable, match="deadline"):
                await asyncio.wait_for(reserve(store, "pause", f"late-{i}"), 20)

    async def scenario() -> None:
        await until_answered(store, "pause")
        os.kill(pid, signal.SIGSTOP)
        try:
            await misses(MISSES_TO_OPEN - 1)
        finally:
            os.kill(pid, signal.SIGCONT)
        assert (await reserve(store, "pause", "answered"))[0] == 1
        assert not store.degraded, "misses short of MISSES_TO_OPEN, then an answer: still closed"
        os.kill(pid, signal.SIGSTOP)
        try:
            await misses(MISSES_TO_OPEN - 1)
            assert not store.degraded, "the answer reset the count"
            await misses(1)
            assert store.degraded
            with pytest.raises(StoreUnavailable, match="breaker open"):
                await reserve(store, "pause", "refused")
        finally:
            os.kill(pid, signal.SIGCONT)
        await until_answered(store, "pause")
        assert not store.degraded
        members = await store.call(lambda c: c.zrange(counter_keys("pause")[0], 0, -1))
        await store.aclose()
        assert b"answered" in members and b"refused" not in members

    asyncio.run(scenario())


def test_a_settlement_batch_is_one_call_and_survives_a_flush(redis_server: dict[str, Any]) -> None:
    store = store_for(redis_server["url"])
    admin = redis.Redis(port=redis_server["port"])
    scope = "batch"

    def settlements(batch: str) -> tuple[list[Any], list[Any]]:
        """reconcile.lua, 40 records: done marker (twice: no concurrency lease), then the scope's token
        TAT and live-limit hash; each record: length, key count, member, delta, the scope's default
        tpm, the estimate."""
        keys: list[Any] = []
        args: list[Any] = []
        for i in range(40):
            keys += [f"llmgw:{{llmgw}}:settled:{batch}{i}"] * 2 + [counter_keys(scope)[1], limits_key(scope)]
            args += [6, 4, f"{batch}{i}", -1, 1000, 10]
        return keys, args

    async def scenario() -> list[list[Any]]:
        first = await store.script("reconcile", *settlements("a"))
        admin.script_flush()
        after_flush = await store.script("reconcile", *settlements("b"))  # NOSCRIPT: resent once, as EVAL
        again = await store.script("reconcile", *settlements("b"))  # idempotent: each settles once
        await store.aclose()
        return [first, after_flush, again]

    calls = int(admin.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0))
    first, after_flush, again = asyncio.run(scenario())
    calls = int(admin.info("commandstats")["cmdstat_evalsha"]["calls"]) - calls
    admin.close()
    assert first == [1] * 40 and after_flush == [1] * 40 and again == [0] * 40
    assert calls == 3, "one call per batch of 40"


# --- connection settings from the URL -------------------------------------------------------------
def reserve_in(url: str) -> list[Any]:
    async def scenario() -> list[Any]:
        store = store_for(url)
        try:
            return list(await reserve(store, "url", "m1"))
        finally:
            await store.aclose()

    return asyncio.run(scenario())


def logged(client: redis.Redis) -> int:
    return int(client.zcard(counter_keys("url")[0]))


def test_password_acl_user_and_db_from_the_url(spawn_redis: Any) -> None:
    port = free_port()

    def ready() -> bool:
        try:
            return bool(redis.Redis(port=port, password="s3cret").ping())
        except redis.RedisError:
            return False

    spawn_redis(["--port", str(port), "--requirepass", "s3cret",
                 "--user", "alice", "on", ">alicepw", "~*", "&*", "+@all"], ready)
    assert reserve_in(f"redis://:s3cret@127.0.0.1:{port}/3")[0] == 1
    assert reserve_in(f"redis://alice:alicepw@127.0.0.1:{port}/5")[0] == 1
    dbs = {db: redis.Redis(port=port, password="s3cret", db=db) for db in (0, 3, 5)}
    assert {db: logged(c) for db, c in dbs.items()} == {0: 0, 3: 1, 5: 1}
    for c in dbs.values():
        c.close()
    with pytest.raises(StoreUnavailable, match="handshake refused"):
        reserve_in(f"redis://alice:wrong@127.0.0.1:{port}/0")


def test_tls_url_verifies_the_server(spawn_redis: Any, tmp_path: Path) -> None:
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    ca_path, cert_path, key_path = tmp_path / "ca.pem", tmp_path / "cert.pem", tmp_path / "key.pem"
    ca.cert_pem.write_to_path(str(ca_path))
    cert.cert_chain_pems[0].write_to_path(str(cert_path))
    cert.private_key_pem.write_to_path(str(key_path))
    port = free_port()
    spawn_redis(["--port", "0", "--tls-port", str(port), "--tls-cert-file", str(cert_path),
                 "--tls-key-file", str(key_path), "--tls-ca-cert-file", str(ca_path), "--tls-auth-clients", "no"],
                port_open(port))
    assert reserve_in(f"rediss://localhost:{port}/2?ssl_ca_certs={ca_path}")[0] == 1
    with pytest.raises(StoreUnavailable, match="CERTIFICATE_VERIFY_FAILED|certificate verify failed"):
        reserve_in(f"rediss://localhost:{port}/2")  # the system trust store does not know this CA
    client = redis.Redis(host="localhost", port=port, db=2, ssl=True, ssl_ca_certs=str(ca_path))
    assert logged(client) == 1
    client.close()


def test_unix_socket_url(spawn_redis: Any, tmp_path: Path) -> None:
    path = tmp_path / "redis.sock"
    spawn_redis(["--port", "0", "--unixsocket", str(path), "--unixsocketperm", "700"], path.exists)
    assert reserve_in(f"unix://{path}?db=4")[0] == 1
    client = redis.Redis(unix_socket_path=str(path), db=4)
    assert logged(client) == 1
    client.close()
