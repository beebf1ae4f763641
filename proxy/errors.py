"""The gateway's error model: one exception type, a closed code vocabulary grouped by fault.

Contract: middlewares and the forwarder short-circuit by raising `GatewayError(code, message)`.
The code decides the default status; the inbound family's adapter renders it natively (body,
headers, or an in-stream error frame after the first byte). Messages are written for the client and
never carry secrets, tracebacks or upstream URLs.
"""
from __future__ import annotations

from typing import Final

# code -> default HTTP status. caller_* = the client's fault, policy_* = our limits,
# upstream_* = a provider's fault, gateway_* = ours.
CODES: Final[dict[str, int]] = {
    "caller_invalid_request": 400,
    "caller_missing_credentials": 401,
    "caller_invalid_credentials": 401,
    "caller_invalid_signature": 403,
    "caller_forbidden": 403,
    "caller_not_found": 404,
    "caller_method_not_allowed": 405,
    "caller_payload_too_large": 413,
    "policy_rate_limited": 429,
    "policy_concurrency_limited": 429,
    "upstream_rate_limited": 429,
    "upstream_error": 502,
    "upstream_unreachable": 502,
    "upstream_unavailable": 503,
    "upstream_timeout": 504,
    "upstream_stream_error": 502,
    "gateway_unavailable": 503,
    "gateway_internal": 500,
}


class GatewayError(Exception):
    """A failure the gateway reports to the client in the inbound family's own format."""

    __slots__ = ("code", "message", "status", "headers", "retry_after", "detail")

    def __init__(
        self,
        code: str,
        message: str,
        *,
        status: int | None = None,
        headers: dict[str, str] | None = None,
        retry_after: float | None = None,
        detail: str | None = None,
    ) -> None:
        if code not in CODES:
            raise ValueError(f"unknown gateway error code {code!r}")
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status or CODES[code]
        self.headers = headers or {}
        self.retry_after = retry_after
        self.detail = detail  # e.g. the AWS exception name for Bedrock, or an OpenAI error code

    @property
    def fault(self) -> str:
        return self.code.split("_", 1)[0]

    def __repr__(self) -> str:
        return f"GatewayError({self.code!r}, {self.message!r}, status={self.status})"


class UpstreamFailure(GatewayError):
    """An upstream attempt failed before anything reached the client, in a way another attempt may fix.

    `kind` is the adapter's classification ("transient", "rate_limited"); `response` keeps the
    upstream's own status, headers and (bounded) body so the final answer can pass it through
    verbatim when no attempt succeeds.
    """

    __slots__ = ("kind", "response")

    def __init__(self, code: str, message: str, *, kind: str = "transient",
                 response: tuple[int, list[tuple[bytes, bytes]], bytes] | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(code, message, status=response[0] if response else None, retry_after=retry_after)
        self.kind = kind
        self.response = response
