"""Shared state: everything replicas share through Redis (or the embedded store in one process).

Lives here: `store` (the only module that talks to Redis: deadlines, breaker, scripts), `redis_wire`
(the hot path's pipelined connection), `reservations` and `settlements` (the limiter's batched
reserve.lua and reconcile.lua calls and their named replies), `live_limits`, `local_limits` (the
in-memory fallback), `keys` (managed gateway keys), `health` (shared circuit breakers) and `lua/`.

May import: `config`, the kernel's types (`proxy.context`, `proxy.errors`) and
`proxy.telemetry.observer` (the hook protocol). Never the kernel's runtime, middlewares or the CLI.
RESP bytes, EVALSHA, the embedded-store branch and Lua reply positions stay inside this folder.
"""
