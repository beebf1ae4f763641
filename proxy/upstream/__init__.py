"""The upstream client: how an attempt's bytes reach a deployment and come back.

Lives here: `wire` (the default HTTP/1.1 transport: pooled connections, httptools parser),
`connection` (one upstream connection and its reader), `transport` (the aiohttp alternative).
All of them speak httpx's transport interface, so the forwarder drives either the same way.

May import: the standard library and third-party packages only. Nothing of the gateway's own:
the upstream client knows bytes and sockets, not requests, keys or deployments.
"""
