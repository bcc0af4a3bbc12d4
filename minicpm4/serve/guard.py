"""The server's gate, as a plain ASGI middleware: API key on /v1 routes, and a bound on request bodies.

Why not Starlette's BaseHTTPMiddleware with `await request.body()`: it wraps `receive`, and the route then never
sees the client's `http.disconnect`, so a non-streaming request whose client left kept generating. Here the body
is read once, under the bound, and replayed to the route; after it, `receive` is the server's own, so a
handler that waits on it learns at once that the client has gone (Completions.collect).

A refused request still has its body read and dropped (up to DRAIN_FACTOR times the limit): a server that
answers and closes while unread bytes sit in the socket makes the kernel reset the connection, and the client
sees "connection reset" instead of the 401 or 413. Past that much, the connection is closed unread.
"""

from __future__ import annotations

import hmac
import json

from minicpm4.serve.protocol import error_body

DRAIN_FACTOR = 16


class RequestGuard:
    def __init__(self, app, api_key: str | None, max_bytes: int):
        self.app, self.api_key, self.max_bytes = app, api_key, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])  # names are lower-case bytes in ASGI
        if self.api_key and scope["path"].startswith("/v1/"):
            given = headers.get(b"authorization", b"")
            if not hmac.compare_digest(given, f"Bearer {self.api_key}".encode()):
                return await self.refuse(receive, send, headers, 401, error_body(
                    "missing or wrong API key (send Authorization: Bearer KEY)", "authentication_error",
                    code="invalid_api_key"))
        if scope["method"] != "POST":
            return await self.app(scope, receive, send)
        too_big = error_body(f"request body over {self.max_bytes} bytes")
        size = headers.get(b"content-length")
        if size is not None and (not size.isdigit() or int(size) > self.max_bytes):
            return await self.refuse(receive, send, headers, 413, too_big)
        body = bytearray()  # also bounds chunked uploads, which carry no content-length
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if len(body) > self.max_bytes:
                return await self.refuse(receive, send, headers, 413, too_big, message.get("more_body", False))
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()
        return await self.app(scope, replay, send)

    async def refuse(self, receive, send, headers: dict, status: int, body: dict, more: bool = True) -> None:
        # a client that sent `Expect: 100-continue` has not sent the body and will not: nothing to drain
        if more and headers.get(b"expect", b"").lower() != b"100-continue":
            drained = 0
            while drained <= DRAIN_FACTOR * self.max_bytes:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                drained += len(message.get("body", b""))
                if not message.get("more_body", False):
                    break
        payload = json.dumps(body).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": payload})
