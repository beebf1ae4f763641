#!/usr/bin/env python
"""The limiter's hot path on its hand-written Redis connection against redis-py, with the same batching.

    .venv/bin/python bench/redis_client.py [--rounds 6] [--duration 3] [--concurrency 16,64]
                                           [--keys 4] [--loop uvloop|asyncio] [--redis-url URL]

Both variants run in this process, on one event loop (uvloop, the gateway's, when installed), and
make the same Redis calls: every reservation asked in one loop turn goes out as one EVALSHA of
proxy/state/lua/reserve.lua (at most `MAX_BATCH` per call), with the KEYS/ARGV layout of the
script's header, and each request gets its own `Reservation`.
- A `wire`:    the product's path: `ReserveBatcher` -> `Store.script_soon` -> `RedisWire` (the plan's
               keys and constant arguments packed once, one write per turn on one auto-pipelined
               connection, no task per call, one sweep timer for the deadlines).
- B `redis-py`: the same batching (`_lists` from proxy/state/reservations.py builds the call's
               values) sent with `redis.asyncio` (hiredis parser, the options `Store.client` uses: no
               retries, no socket timeouts) as one non-transactional pipeline per loop turn, executed
               by one task under `asyncio.timeout(state.redis_timeout)`. It has no breaker and no
               call accounting (A has both): it is the least a redis-py hot path would cost.
N simulated requests (`--concurrency`, default 16 and 64) each reserve in a loop for `--duration`
seconds, after a 0.5 s warm-up; plans are realistic: global, key and model scopes plus 2 candidate
deployments, `--keys` API keys (default 4, so a batch carries several plans' blocks), every limit
high enough to admit (the model scope's limit is live, set in Redis as ops would).
Per variant: reservations/s, this process's CPU µs per reservation (`time.process_time`: client
side only), p50/p99 latency of one reservation (from `reserve()` to the awaited reply), the mean
reservations per EVALSHA and Redis's own CPU µs per reservation (`INFO commandstats` / `INFO cpu`:
the batching is the same when these match). Rounds are interleaved ABBA (odd rounds run B first),
Redis is flushed before every measurement, and the ratios B/A are the median of the rounds' ratios
(runs seconds apart), with the ratio of the medians beside them.
Redis: a bench-owned `redis-server` on a free loopback port, pinned to CPU 1 while this process
is pinned to CPU 0 (with 2+ CPUs; `--no-pin` to leave both free), or `--redis-url`
(that server's db is flushed: never point it at one that holds data).
"""
from __future__ import annotations

import argparse
import asyncio
import hashlib
import itertools
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import redis  # noqa: E402
import redis.asyncio as aredis  # noqa: E402
from redis.asyncio.retry import Retry  # noqa: E402
from redis.backoff import NoBackoff  # noqa: E402
from redis.utils import HIREDIS_AVAILABLE  # noqa: E402

from config.models import Config, Secret, StateSettings  # noqa: E402
from middlewares.ratelimit.plan import Plan  # noqa: E402
from proxy.context import Principal  # noqa: E402
from proxy.state.reservations import MAX_BATCH, Block, Reservation, ReserveBatcher, _lists  # noqa: E402
from proxy.state.store import Store, StoreUnavailable, _sources, limits_key  # noqa: E402

MODEL = "gpt-4o-mini"
DEPLOYMENTS = ("openai-a", "openai-b")
BIG_RPM, BIG_TPM = 100_000_000, 1_000_000_000_000
WARMUP = 0.5
VARIANTS = ("wire", "redis-py")


# --- variant B: the same batching on redis-py ---------------------------------------------------
class PipelineBatcher:
    """`ReserveBatcher`'s batching (the first reservation of a turn schedules the call for the end of
    the turn; `MAX_BATCH` per call), sent as one redis-py pipeline per turn by one task."""

    def __init__(self, client: aredis.Redis, sha: str, timeout: float) -> None:
        self.client, self.sha, self.timeout = client, sha, timeout
        self.queue: list[tuple[Block, str, int, asyncio.Future[Any]]] = []
        self.tasks: set[asyncio.Task[None]] = set()

    def reserve(self, block: Block, member: str, tokens: int) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        if not self.queue:
            loop.call_soon(self._flush)
        self.queue.append((block, member, tokens, fut))
        return fut

    def _flush(self) -> None:
        queue, self.queue = self.queue, []
        task = asyncio.ensure_future(self._send([queue[s:s + MAX_BATCH] for s in range(0, len(queue), MAX_BATCH)]))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _send(self, batches: list[list[Any]]) -> None:
        pipe = self.client.pipeline(transaction=False)
        for batch in batches:
            keys, args = _lists(batch)
            pipe.evalsha(self.sha, len(keys), *keys, *args)
        try:
            async with asyncio.timeout(self.timeout):
                replies = await pipe.execute(raise_on_error=False)
        except BaseException as exc:  # noqa: BLE001 - every waiter of this turn gets it
            for batch in batches:
                _fail(batch, exc if isinstance(exc, Exception) else StoreUnavailable("cancelled"))
            if not isinstance(exc, Exception):
                raise
            return
        for batch, reply in zip(batches, replies):
            if isinstance(reply, Exception):
                _fail(batch, reply)
                continue
            for (*_, fut), one in zip(batch, reply):
                if not fut.done():
                    fut.set_result(Reservation.of(one))


def _fail(batch: list[Any], exc: Exception) -> None:
    for *_, fut in batch:
        if not fut.done():
            one = type(exc)(*exc.args) if isinstance(exc, StoreUnavailable) else StoreUnavailable(repr(exc))
            fut.set_exception(one)  # one instance per waiter, as `ReserveBatcher` does


# --- load ---------------------------------------------------------------------------------------
def plans(keys: int) -> list[Plan]:
    """One plan per API key: global + key + model scopes, two candidate deployments, high limits."""
    providers = {d: (BIG_RPM, BIG_TPM) for d in DEPLOYMENTS}
    return [Plan((BIG_RPM, BIG_TPM), providers, Principal(key_id=f"bench-{k}", rpm=BIG_RPM, tpm=BIG_TPM),
                 MODEL, DEPLOYMENTS) for k in range(keys)]


async def drive(reserve: Callable[[Block, str, int], "asyncio.Future[Any]"], blocks: list[Block],
                concurrency: int, duration: float, prefix: str) -> dict[str, Any]:
    """`concurrency` simulated requests reserving in a loop until `duration` has passed."""
    loop = asyncio.get_running_loop()
    end = loop.time() + duration
    seq = itertools.count()
    latencies: list[int] = []
    outcome = {"refused": 0, "errors": 0}
    clock = time.perf_counter_ns

    async def worker(i: int) -> None:
        block, tokens = blocks[i % len(blocks)], 40 + i  # estimates differ per request
        record = latencies.append
        while loop.time() < end:
            member = f"{prefix}{next(seq):x}"
            t0 = clock()
            try:
                reply = await reserve(block, member, tokens)
            except StoreUnavailable:
                outcome["errors"] += 1
                continue
            record(clock() - t0)
            if not reply.admitted:
                outcome["refused"] += 1

    cpu0, t0 = time.process_time(), time.perf_counter()
    await asyncio.wait_for(asyncio.gather(*(worker(i) for i in range(concurrency))), duration + 30)
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    latencies.sort()
    n = len(latencies)
    return {"n": n, "rps": n / elapsed, "cpu_us": cpu / n * 1e6 if n else float("nan"),
            "p50_us": latencies[n // 2] / 1000 if n else float("nan"),
            "p99_us": latencies[min(n - 1, n * 99 // 100)] / 1000 if n else float("nan"), **outcome}


def server_counters(admin: redis.Redis) -> tuple[int, float]:
    """Redis's EVALSHA calls so far and its CPU seconds (main process, user + system)."""
    stats = admin.info("commandstats").get("cmdstat_evalsha", {})
    cpu = admin.info("cpu")
    return int(stats.get("calls", 0)), float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])


def reset_redis(admin: redis.Redis) -> None:
    admin.flushdb()
    # the model scope has no default limit: a live one, set the way ops would
    admin.hset(limits_key(f"model:{MODEL}"), mapping={"requests_per_minute": BIG_RPM, "tokens_per_minute": BIG_TPM})


async def measure(reserve: Any, blocks: list[Block], admin: redis.Redis, concurrency: int,
                  duration: float, tag: str) -> dict[str, Any]:
    reset_redis(admin)  # outside the measured window (a blocking call: nothing else runs meanwhile)
    await drive(reserve, blocks, concurrency, WARMUP, f"w{tag}:")
    calls0, scpu0 = server_counters(admin)
    result = await drive(reserve, blocks, concurrency, duration, f"{tag}:")
    calls1, scpu1 = server_counters(admin)
    n = result["n"] or 1
    result["per_call"] = n / max(1, calls1 - calls0)
    result["redis_us"] = (scpu1 - scpu0) / n * 1e6
    return result


# --- redis-server ------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_redis(workdir: Path, cpu: int | None) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    cmd = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
           "--dir", str(workdir)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,  # noqa: S603 - fixed argv
                            start_new_session=True)
    if cpu is not None:
        os.sched_setaffinity(proc.pid, {cpu})
    url = f"redis://127.0.0.1:{port}/0"
    for _ in range(100):
        try:
            redis.Redis.from_url(url).ping()
            return proc, url
        except redis.ConnectionError:
            time.sleep(0.05)
    proc.kill()
    proc.wait()
    raise RuntimeError("redis-server did not start")


# --- report ------------------------------------------------------------------------------------
def med(rows: list[dict[str, Any]], field: str) -> float:
    return statistics.median(r[field] for r in rows)


def report(runs: dict[int, dict[str, list[dict[str, Any]]]], args: argparse.Namespace) -> None:
    for c, by in runs.items():
        print(f"\n### concurrency {c}: {args.rounds} ABBA rounds of {args.duration:g} s (medians over rounds)\n")
        print("| variant | reservations/s | CPU µs/res | p50 µs | p99 µs | res/EVALSHA | Redis CPU µs/res "
              "| refused | errors |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for name in VARIANTS:
            rs = by[name]
            print(f"| {'A' if name == 'wire' else 'B'} {name} | {med(rs, 'rps'):,.0f} | {med(rs, 'cpu_us'):.1f} | "
                  f"{med(rs, 'p50_us'):.0f} | {med(rs, 'p99_us'):.0f} | {med(rs, 'per_call'):.1f} | "
                  f"{med(rs, 'redis_us'):.1f} | {sum(r['refused'] for r in rs)} | {sum(r['errors'] for r in rs)} |")
        a, b = by["wire"], by["redis-py"]
        print("\n| B/A | median of rounds' ratios | ratio of medians | per round |")
        print("|---|---:|---:|---|")
        for field, label in (("rps", "reservations/s"), ("cpu_us", "CPU µs/res"), ("p50_us", "p50 latency"),
                             ("p99_us", "p99 latency")):
            per = [rb[field] / ra[field] for ra, rb in zip(a, b)]
            print(f"| {label} | {statistics.median(per):.2f} | {med(b, field) / med(a, field):.2f} | "
                  f"{' '.join(f'{x:.2f}' for x in per)} |")


# --- main --------------------------------------------------------------------------------------
async def run(args: argparse.Namespace, url: str) -> dict[int, dict[str, list[dict[str, Any]]]]:
    timeout = StateSettings().redis_timeout
    store = Store(Config(state=StateSettings(redis_url=Secret(url), redis_timeout=timeout)))

    class Owner:
        pass

    owner = Owner()
    owner.store = store  # type: ignore[attr-defined]
    wire = ReserveBatcher(owner)  # type: ignore[arg-type]
    # redis-py as `Store.client` builds it (no socket timeouts, no retries, hiredis when installed)
    client = aredis.Redis.from_url(url, socket_connect_timeout=None, socket_timeout=None, health_check_interval=0,
                                   max_connections=256, retry=Retry(NoBackoff(), 0), retry_on_timeout=False)
    source = _sources()["reserve"]
    sha = hashlib.sha1(source.encode(), usedforsecurity=False).hexdigest()
    if await client.script_load(source) != sha:
        raise RuntimeError("unexpected script digest")
    pipelined = PipelineBatcher(client, sha, timeout)
    reservers = {"wire": wire.reserve, "redis-py": pipelined.reserve}
    admin = redis.Redis.from_url(url)
    blocks = [p.block for p in plans(args.keys)]
    prefix = os.urandom(4).hex()
    runs: dict[int, dict[str, list[dict[str, Any]]]] = {c: {name: [] for name in VARIANTS} for c in args.concurrency}
    try:
        for i in range(args.rounds):
            order = VARIANTS if i % 2 == 0 else VARIANTS[::-1]
            for c in args.concurrency:
                for name in order:
                    tag = f"{prefix}{i}{name[0]}{c}"  # members stay unique across runs
                    r = await measure(reservers[name], blocks, admin, c, args.duration, tag)
                    runs[c][name].append(r)
                    print(f"round {i + 1}/{args.rounds} c={c} {name:8} {r['rps']:9,.0f} res/s "
                          f"{r['cpu_us']:6.1f} CPU µs/res p50 {r['p50_us']:5.0f} µs p99 {r['p99_us']:5.0f} µs "
                          f"{r['per_call']:5.1f} res/call {r['errors']} errors",
                          file=sys.stderr, flush=True)
    finally:
        await store.aclose()
        await client.aclose()
        admin.close()
    return runs


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--duration", type=float, default=3.0)
    p.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[16, 64])
    p.add_argument("--keys", type=int, default=4, help="API keys (plans) the simulated requests spread over")
    p.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    p.add_argument("--redis-url", default="", help="use this Redis (its db is FLUSHED) instead of starting one")
    p.add_argument("--no-pin", action="store_true", help="do not pin this process to CPU 0 and redis-server to CPU 1")
    args = p.parse_args()
    if args.rounds < 1 or args.duration <= 0 or args.keys < 1 or min(args.concurrency) < 1:
        p.error("rounds, duration, keys and concurrency must be positive")

    loop_factory = None
    if args.loop == "uvloop":
        try:
            import uvloop

            loop_factory = uvloop.new_event_loop
        except ImportError:
            args.loop = "asyncio"
    pin = not args.no_pin and (os.cpu_count() or 1) >= 2 and hasattr(os, "sched_setaffinity")
    with tempfile.TemporaryDirectory(prefix="llm-gw-bench-redis-") as tmp:
        proc = None
        try:
            if args.redis_url:
                url = args.redis_url
            else:
                proc, url = start_redis(Path(tmp), 1 if pin else None)
            if pin:
                os.sched_setaffinity(0, {0})
            version = redis.Redis.from_url(url).info("server")["redis_version"]
            print("# reserve.lua hot path: A = ReserveBatcher -> Store.script_soon -> RedisWire, "
                  "B = same batching on redis.asyncio (pipeline per loop turn)\n")
            print(f"loop {args.loop}; Python {sys.version.split()[0]}; redis-py {redis.__version__} "
                  f"(hiredis parser: {HIREDIS_AVAILABLE}); redis-server {version}"
                  f"{' (bench-owned)' if proc else ''}; {args.keys} API keys x (global, key, model) + "
                  f"{len(DEPLOYMENTS)} deployments; pinned: {'this process CPU 0, redis CPU 1' if pin else 'no'}")
            with asyncio.Runner(loop_factory=loop_factory) as runner:
                runs = runner.run(run(args, url))
            report(runs, args)
        finally:
            if proc is not None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
