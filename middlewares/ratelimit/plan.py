"""The limiter's request layout: which scopes a request is checked against, and the script arguments
derived from them, built once per (key policy, model, candidate set) and shared by every request.

Contract:
- A `Scope` is (name, default rpm, default tpm); None means no default (sent as -1: unlimited
  unless a live limit, read by the script, says otherwise).
- `Plan(global_limits, providers, principal, model, deployments, lease_ms)`: the common scopes (`global`,
  `key:<id>` with the key's policy, `model:<name>`), which must all admit a request, and the
  candidate scopes (`provider:<name>`, in routing order), of which the first that admits it is
  reserved. It holds reserve.lua's KEYS and constant ARGV tail as a `proxy.state.reservations.Block`
  (`block`: values and RESP, made once; a batch sends a plan's keys once), the scope
  names and default limits (-1: none) by reply position (`names`, `defaults`), the key's concurrency cap and key, and reconcile.lua's keys
  and token limits for the common scopes (`settle`, a `proxy.state.settlements.SettleBlock`). A plan is
  never mutated.
- `refusal(ctx, reply, plan)`: what refused a request, in words (which scope, which limit, its value
  and what was asked, as providers word it) and its kind (`requests` or `tokens`, OpenAI's 429 `type`).
- `encode(common, candidates, conc_key)`: reserve.lua's KEYS and per-scope ARGV tail in the layout
  its header documents (per scope: request log, token TAT, live-limit hash, and for a candidate its
  health and probe keys; with a concurrency cap, its key last). `settle_keys(scope)`: what reconcile.lua
  touches in one scope. Key names are encoded once per scope (LRU cached).
"""
from __future__ import annotations

import functools
from typing import Any

from proxy.context import Principal, RequestContext
from proxy.state.reservations import ALL_AT_LIMIT, CONCURRENCY, TOKENS, Block, Reservation
from proxy.state.settlements import SettleBlock
from proxy.state.health import PROBE_LOCK_MS, health_key, probe_key
from proxy.state.store import concurrency_key, counter_keys, limits_key

Scope = tuple[str, "int | None", "int | None"]  # name, default rpm, default tpm


def limit_arg(value: int | None) -> int:
    """A default limit as the scripts take it: -1 for none."""
    return -1 if value is None else value


@functools.lru_cache(maxsize=65536)
def scope_keys(scope: str, deployment: bool) -> tuple[bytes, ...]:
    """The Redis keys of one scope, encoded once (scopes repeat on every request)."""
    names = [*counter_keys(scope), limits_key(scope)]
    if deployment:
        dep = scope.split(":", 1)[1]
        names += [health_key(dep), probe_key(dep)]
    return tuple(n.encode() for n in names)


def settle_keys(scope: str) -> tuple[bytes, bytes]:
    """What reconcile.lua touches in one scope: its token TAT and its live-limit hash."""
    keys = scope_keys(scope, False)
    return keys[1], keys[2]


def encode(common: list[Scope], candidates: list[Scope], conc_key: str | None) -> tuple[list[bytes], list[bytes]]:
    """reserve.lua's KEYS and the per-scope tail of its ARGV (see the script's header)."""
    keys: list[bytes] = [k for name, _, _ in common for k in scope_keys(name, False)]
    keys += [k for name, _, _ in candidates for k in scope_keys(name, True)]
    if conc_key:
        keys.append(conc_key.encode())
    return keys, [str(limit_arg(v)).encode() for _, rpm, tpm in common + candidates for v in (rpm, tpm)]


class Plan:
    """A request's scopes (all common ones must admit; the first admitting candidate is reserved) and
    everything derived from them. Built once per (key policy, model, candidate set), then shared."""

    __slots__ = ("common", "candidates", "names", "defaults", "block", "conc", "conc_key", "settle")

    def __init__(self, global_limits: tuple[int | None, int | None], providers: dict[str, Any],
                 p: Principal | None, model: str | None, deployments: tuple[str, ...], lease_ms: int = 60000) -> None:
        self.common: list[Scope] = [("global", *global_limits)]
        if p is not None:
            self.common.append((f"key:{p.key_id}", p.rpm, p.tpm))
        if model:
            self.common.append((f"model:{model}", None, None))
        self.candidates: list[Scope] = [(f"provider:{d}", *providers.get(d, (None, None))) for d in deployments]
        self.conc = p.max_concurrent if p is not None else None
        self.conc_key = concurrency_key(p.key_id) if self.conc and p is not None else None
        self.names = [name for name, _, _ in self.common + self.candidates]  # replies name scopes by position
        self.defaults = [(limit_arg(rpm), limit_arg(tpm)) for _, rpm, tpm in self.common + self.candidates]
        keys, limits = encode(self.common, self.candidates, self.conc_key)
        # reserve.lua's KEYS and constant ARGV tail for this plan (common scopes, concurrency cap and
        # lease, probe lock, default limits), packed once
        self.block = Block(tuple(keys), [len(self.common), self.conc or 0, lease_ms, PROBE_LOCK_MS, *limits])
        self.settle = SettleBlock([k for name, _, _ in self.common for k in settle_keys(name)],
                                  [limit_arg(tpm) for _, _, tpm in self.common])


def _scope_words(name: str) -> str:
    kind, _, rest = name.partition(":")
    return {"key": f"key {rest!r}", "model": f"model {rest!r}", "provider": f"deployment {rest!r}",
            "team": f"team {rest!r}"}.get(kind, "the gateway (global)")


def refusal(ctx: RequestContext, reply: Reservation, plan: "Plan") -> tuple[str, str]:
    """Which limit refused the request, in words, and whether it was a requests or a tokens limit."""
    if reply.marker == CONCURRENCY:
        return f"key {ctx.principal.key_id!r} is at its concurrent request limit ({plan.conc})", "requests"  # type: ignore[union-attr]  # only a key (ctx.principal) has a concurrency cap
    position, tokens = reply.refused_scope, reply.refused_limit == TOKENS
    if not position:
        return "rate limit", "requests"
    rows = reply.live  # the effective (live) limits of scopes that have one; else the plan's defaults
    live = {rows[k]: (rows[k + 1], rows[k + 2]) for k in range(0, len(rows) - 2, 3)}
    rpm, tpm = live.get(position, plan.defaults[position - 1])
    if tokens:
        what = f"tokens per min (TPM): Limit {tpm}, Requested {ctx.estimated_tokens}"
    else:
        what = f"requests per min (RPM): Limit {rpm}, Requested 1"
    words = f"{_scope_words(plan.names[position - 1])} on {what}"
    if reply.marker == ALL_AT_LIMIT:
        words = f"every deployment for this model is at its limit ({words})"
    return words, "tokens" if tokens else "requests"
