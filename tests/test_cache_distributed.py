"""Response cache across replicas: 2-3 `llm-gateway serve` processes on one test-owned redis-server, in
front of the simulated provider (in this process, recording every request it gets).

Covers: entries shared by every replica (and their TTL) under the documented Redis keys, key isolation,
50 identical concurrent requests over 3 replicas reaching the upstream once (plain and streamed), a
leader that fails on one replica while duplicates wait on the others, Redis killed under load (every
request still answered: the cache passes through) and back, and `llm-gateway cache stats|purge`, the
admin API and the access log.
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import json
import subprocess
import sys
import threading
import time
from typing import Any

import httpx
import redis

from tests.conftest import AUTH_YAML, GATEWAY_KEY, clear_recorded, recorded, standard_config
from tests.procs import ROOT, Procs, procs, restart_redis  # noqa: F401 - `procs` is a fixture

SECOND_KEY = "gw-test-second-key-0123456789"
ADMIN = "admin-test-key-0123456789"
AUTH = {"authorization": f"Bearer {GATEWAY_KEY}"}
MSGS = [{"role": "user", "content": "hello replicas"}]
KEYS = AUTH_YAML + f"""    - id: team-two
      sha256: {hashlib.sha256(SECOND_KEY.encode()).hexdigest()}
  admin_key: {ADMIN}
"""


def config(upstream: str, redis_url: str, cache: str = "{enabled: true}") -> str:
    extra = f"cache: {cache}\nstate: {{redis_url: \"{redis_url}\"}}\n"
    return standard_config(upstream, extra).replace(AUTH_YAML, KEYS)


def post(url: str, headers: dict[str, str] | None = None, content: str = "hello replicas", stream: bool = False,
         key: str = GATEWAY_KEY) -> httpx.Response:
    return httpx.post(url + "/v1/chat/completions", timeout=30,
                      headers={"authorization": f"Bearer {key}", **(headers or {})},
                      json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": content}], "stream": stream})


def calls(mock_upstream: str) -> int:
    return len(recorded(mock_upstream))


def test_replicas_share_entries_under_the_documented_keys(redis_server: dict[str, Any], procs: Procs,
                                                         mock_upstream: str) -> None:
    clear_recorded(mock_upstream)
    gws = procs.gateways(config(mock_upstream, redis_server["url"]), 3)
    first = post(gws[0].url)
    others = [post(gw.url) for gw in gws[1:]]
    assert first.headers["x-gateway-cache"] == "miss"
    assert [r.headers["x-gateway-cache"] for r in others] == ["hit", "hit"]
    assert all(r.content == first.content for r in others)
    assert calls(mock_upstream) == 1
    assert post(gws[1].url, key=SECOND_KEY).headers["x-gateway-cache"] == "miss"  # another key: never shared
    r = redis.Redis(port=redis_server["port"])
    deadline = time.monotonic() + 10
    while len(entries := r.keys("llmgw:{llmgw}:cache:e:*")) < 2:  # stored off the request path, just after it
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert {k.decode().rsplit(":", 2)[0] for k in entries} == {"llmgw:{llmgw}:cache:e:k.team-test",
                                                               "llmgw:{llmgw}:cache:e:k.team-two"}
    assert all(0 < r.pttl(k) <= 3600_000 for k in entries)  # cache.ttl: 1h
    assert not r.keys("llmgw:{llmgw}:cache:l:*")  # the leaders released their locks
    # an entry's own TTL holds on every replica
    assert post(gws[0].url, {"x-gateway-cache-ttl": "1"}, content="brief").headers["x-gateway-cache"] == "miss"
    assert post(gws[1].url, content="brief").headers["x-gateway-cache"] == "hit"
    time.sleep(1.3)
    assert post(gws[2].url, content="brief").headers["x-gateway-cache"] == "miss"
    assert calls(mock_upstream) == 4
    # a large streamed answer (read and written on a pool connection, not the pipelined one)
    big = {"x-mock-chunks": "1500"}
    first = post(gws[0].url, big, content="long", stream=True)
    again = post(gws[1].url, big, content="long", stream=True)
    assert len(first.content) > 64 * 1024 and again.content == first.content
    assert (first.headers["x-gateway-cache"], again.headers["x-gateway-cache"]) == ("miss", "hit")


def test_fifty_identical_requests_over_three_replicas_reach_the_upstream_once(
        redis_server: dict[str, Any], procs: Procs, mock_upstream: str) -> None:
    gws = procs.gateways(config(mock_upstream, redis_server["url"]), 3)
    for stream in (False, True):
        clear_recorded(mock_upstream)
        slow = {"x-mock-latency-ms": "1500", "x-mock-chunk-interval-ms": "20"}
        content = f"in flight, stream={stream}"
        with concurrent.futures.ThreadPoolExecutor(50) as pool:
            answers = list(pool.map(lambda i: post(gws[i % 3].url, slow, content, stream), range(50)))
        assert calls(mock_upstream) == 1, stream
        assert all(a.status_code == 200 for a in answers)
        assert len({a.content for a in answers}) == 1
        labels = [a.headers["x-gateway-cache"] for a in answers]
        assert labels.count("miss") == 1 and set(labels) <= {"miss", "coalesced", "hit"}, labels


def test_a_leader_failing_on_one_replica_hands_over_to_a_waiting_one(
        redis_server: dict[str, Any], procs: Procs, mock_upstream: str) -> None:
    clear_recorded(mock_upstream)
    gws = procs.gateways(config(mock_upstream, redis_server["url"]), 3)
    failing = {"x-mock-latency-ms": "800", "x-mock-fault-status": "400"}
    with concurrent.futures.ThreadPoolExecutor(9) as pool:
        lead = pool.submit(post, gws[0].url, failing)
        deadline = time.monotonic() + 10
        while calls(mock_upstream) < 1:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        followers = [pool.submit(post, gws[1 + i % 2].url) for i in range(8)]
        assert lead.result().status_code == 400 and lead.result().headers["x-gateway-cache"] == "miss"
        answers = [f.result() for f in followers]
    assert all(a.status_code == 200 for a in answers) and len({a.content for a in answers}) == 1
    assert [a.headers["x-gateway-cache"] for a in answers].count("miss") == 1
    assert calls(mock_upstream) == 2


def test_redis_killed_under_load_is_a_pass_through(redis_server: dict[str, Any], procs: Procs,
                                                    mock_upstream: str) -> None:
    gws = procs.gateways(config(mock_upstream, redis_server["url"]), 2)
    assert post(gws[0].url, content="warm").headers["x-gateway-cache"] == "miss"
    assert post(gws[1].url, content="warm").headers["x-gateway-cache"] == "hit"
    stop = threading.Event()
    seen: list[tuple[float, int, str]] = []

    def load(i: int) -> None:
        n = 0
        while not stop.is_set():
            r = post(gws[(i + n) % 2].url, content="warm" if n % 2 else f"load {i} {n}")
            seen.append((time.monotonic(), r.status_code, r.headers.get("x-gateway-cache", "")))
            n += 1

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        workers = [pool.submit(load, i) for i in range(6)]
        time.sleep(0.7)
        redis_server["proc"].kill()  # mid-load
        killed = time.monotonic()
        redis_server["proc"].wait()
        time.sleep(1.5)
        stop.set()
        for w in workers:
            w.result()
    after = [s for s in seen if s[0] > killed + 0.1]
    assert seen and after
    assert all(status == 200 for _, status, _ in seen), sorted({s for _, s, _ in seen})
    # nothing can be read: every request passes through (identical ones in flight on one replica still share)
    assert "miss" in {label for _, _, label in after} and {label for _, _, label in after} <= {"miss", "coalesced"}
    restart_redis(redis_server)  # back: caching resumes (the breaker probes once a second)
    deadline = time.monotonic() + 10
    while post(gws[0].url, content="again").headers["x-gateway-cache"] != "hit":
        assert time.monotonic() < deadline, "caching did not resume after Redis came back"
        time.sleep(0.2)


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "proxy.cli", "cache", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)


def test_cli_admin_api_and_access_log(redis_server: dict[str, Any], procs: Procs, mock_upstream: str) -> None:
    clear_recorded(mock_upstream)
    [gw] = procs.gateways(config(mock_upstream, redis_server["url"]), 1)
    url = redis_server["url"]
    assert post(gw.url).headers["x-gateway-cache"] == "miss"
    assert post(gw.url).headers["x-gateway-cache"] == "hit"
    assert post(gw.url, {"x-gateway-cache-namespace": "blue"}).headers["x-gateway-cache"] == "miss"
    deadline = time.monotonic() + 10
    while True:  # each replica adds its counts to the shared stats once a second
        stats = json.loads(cli("stats", "--json", "--redis-url", url).stdout)
        if (stats["requests"]["hit"], stats["entries"]) == (1, 2) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert stats["entries"] == 2 and stats["bytes"] > 0 and stats["saved_tokens"] > 0
    assert stats["requests"] == {"hit": 1, "miss": 2, "bypass": 0, "coalesced": 0}
    table = cli("stats", "--redis-url", url)
    assert table.returncode == 0 and "entries:        2" in table.stdout
    admin = {"authorization": f"Bearer {ADMIN}"}
    assert httpx.get(gw.url + "/admin/cache", headers=admin).json()["entries"] == 2
    purged = cli("purge", "--namespace", "blue", "--json", "--redis-url", url)
    assert json.loads(purged.stdout) == {"purged": 1, "target": "namespace:blue"}
    assert "cache_purged" in purged.stderr
    assert json.loads(cli("purge", "--key", "team-test", "--json", "--redis-url", url).stdout)["purged"] == 1
    assert post(gw.url).headers["x-gateway-cache"] == "miss"
    assert httpx.delete(gw.url + "/admin/cache?all=true", headers=admin).json()["purged"] == 1
    assert cli("purge", "--redis-url", url).returncode == 2  # one of --key, --namespace, --all
    assert cli("purge", "--namespace", "a b", "--redis-url", url).returncode == 1
    assert cli("stats", "--redis-url", "redis://127.0.0.1:1/0").returncode == 1
    log = [json.loads(line) for line in gw.log_path.read_text().splitlines() if '"event":"request"' in line]
    assert [line["cache"] for line in log] == ["miss", "hit", "miss", "miss"]
