"""Distributed rate limiting: the middleware and its per-request plan.

Lives here: `middleware` (`RateLimitMiddleware`: admission, rejection, fallback, settlement) and
`plan` (which scopes a request is checked against, built once per key policy, model and candidates).
The Redis side (batched reserve.lua and reconcile.lua calls, their packing and named replies) is
`proxy.state.reservations` and `proxy.state.settlements`.

May import: `config`, the kernel, `proxy.state` and `providers.base`; never another middleware.
"""
from middlewares.ratelimit.middleware import RateLimitMiddleware

__all__ = ["RateLimitMiddleware"]
