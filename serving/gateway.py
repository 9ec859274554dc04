"""ASGI middleware in front of the API (added with BentoML's public `add_asgi_middleware`):

- request body limits per route, checked on Content-Length before anything is read; a chunked body (no
  Content-Length) is received here up to the limit and replayed to the app (413 JSON once over it);
- optional bearer-token auth (constant-time compare), 401 JSON without it; health probes and CORS
  preflight stay open;
- `GET` on read-only API routes (`/model`) is served by the route's POST handler (BentoML APIs are POST);
- error bodies BentoML itself writes (request validation, unexpected failures) are rewritten to the API's
  `{error, type, detail}` shape, without echoing the input; a failure before the endpoint ran (BentoML
  could not parse the request: broken multipart, binary where a field should be) is the request's fault and
  answered 400, not 500;
- one audit line per request (`serving.audit`), health probes and /metrics excepted.
"""

from __future__ import annotations

import hmac
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from cthub.errors import AuthError
from serving.audit import AUDIT_KEY, AuditLog

log = logging.getLogger(__name__)

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

HEALTH_PATHS = frozenset({"/readyz", "/livez", "/healthz"})
UNAUDITED_PATHS = HEALTH_PATHS | {"/metrics"}
GET_ALIASES = frozenset({"/model"})


def json_body(error: str, type_: str, detail: str) -> bytes:
    return json.dumps({"error": error, "type": type_, "detail": detail}).encode()


class Gateway:
    """See the module docstring. `limits` maps API paths to body limits in bytes (`default_limit` else)."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        token: str | None,
        audit: AuditLog,
        limits: Mapping[str, int],
        default_limit: int,
        api_paths: frozenset[str],
    ) -> None:
        self.app = app
        self.token = token.encode() if token else None
        self.audit = audit
        self.limits = dict(limits)
        self.default_limit = default_limit
        self.api_paths = api_paths
        self.model_sha256: str | None = None  # remembered from the last endpoint that reported it

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        path, method = str(scope.get("path", "")), str(scope.get("method", ""))
        state = scope.setdefault("state", {})
        status = await self._handle(scope, receive, send, path, method)
        if path not in UNAUDITED_PATHS:
            details = state.pop(AUDIT_KEY, None) or {}
            self.model_sha256 = details.get("model_sha256") or self.model_sha256
            details.setdefault("model_sha256", self.model_sha256)
            endpoint = path if path in self.api_paths else "/" + path.strip("/").split("/")[0]
            self.audit.emit(
                self.audit.line(
                    endpoint=endpoint, method=method, status=status, started=started, details=details
                )
            )

    async def _handle(self, scope: Scope, receive: Receive, send: Send, path: str, method: str) -> int:
        """Run the request through the checks and the app; the response status."""
        if method != "OPTIONS" and path not in HEALTH_PATHS and not self._authorized(scope):
            err = AuthError("this server requires 'Authorization: Bearer <token>'")
            scope["state"][AUDIT_KEY] = {"error": err.code}
            return await _respond(
                send,
                err.http_status,
                json.dumps(err.to_dict()).encode(),
                [(b"www-authenticate", b'Bearer realm="cthub"')],
            )
        limit = self.limits.get(path, self.default_limit)
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            scope["state"][AUDIT_KEY] = {"error": "payload_too_large"}
            return await _respond(send, 413, _too_large(declared, limit))
        if declared is None and method in ("POST", "PUT", "PATCH"):
            replay = await _buffered(receive, limit)
            if replay is None:
                scope["state"][AUDIT_KEY] = {"error": "payload_too_large"}
                return await _respond(send, 413, _too_large(None, limit))
            receive = replay
        if method == "GET" and path in GET_ALIASES:
            scope["method"] = "POST"
        return await self._run(scope, receive, send, path)

    def _authorized(self, scope: Scope) -> bool:
        if self.token is None:
            return True
        for name, value in scope.get("headers", []):
            if name == b"authorization":
                scheme, _, presented = value.partition(b" ")
                if scheme.lower() == b"bearer":
                    return hmac.compare_digest(presented.strip(), self.token)
        return False

    async def _run(self, scope: Scope, receive: Receive, send: Send, path: str) -> int:
        """The app, with error bodies of API routes normalized; the status it answered."""
        state = scope["state"]
        out = _ResponseFilter(send, normalize=path in self.api_paths, endpoint_ran=lambda: AUDIT_KEY in state)
        await self.app(scope, receive, out)
        return out.status


class _ResponseFilter:
    """Passes a response through; for an error status of an API route, buffers it and rewrites a body that
    is not already `{error, type, detail}`."""

    def __init__(self, send: Send, normalize: bool, endpoint_ran: Callable[[], bool]) -> None:
        self.send, self.normalize, self.endpoint_ran = send, normalize, endpoint_ran
        self.status, self.started = 500, False
        self._start: Message | None = None
        self._body = bytearray()

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status, self.started = int(message["status"]), True
            if self.normalize and self.status >= 400:
                self._start = message
                return
        elif message["type"] == "http.response.body" and self._start is not None:
            self._body += message.get("body", b"")
            if message.get("more_body"):
                return
            if self.status == 500 and not self.endpoint_ran():
                self.status = 400  # BentoML failed on the request before any endpoint code ran
            body = _normalized(self.status, bytes(self._body))
            headers = [(k, v) for k, v in self._start.get("headers", []) if k.lower() != b"content-length"]
            headers.append((b"content-length", str(len(body)).encode()))
            await self.send(self._start | {"status": self.status, "headers": headers})
            await self.send({"type": "http.response.body", "body": body})
            return
        await self.send(message)


def _normalized(status: int, body: bytes) -> bytes:
    """An error body in the API's shape; BentoML's validation and failure bodies are rewritten."""
    try:
        data = json.loads(body or b"null")
    except ValueError:
        data = None
    if isinstance(data, dict) and {"error", "type", "detail"} <= set(data):
        return body
    if status >= 500:
        log.warning("an unexpected server error was answered with %d (see the traceback above)", status)
        return json_body("internal_error", "InternalError", "the server failed to process the request")
    detail = _validation_detail(data) or (
        "the request could not be parsed: send multipart/form-data with the fields this endpoint documents "
        "(see /docs.json)"
    )
    return json_body("invalid_request", "RequestError", detail)


def _validation_detail(data: object) -> str | None:
    """'field: message' pairs from BentoML's validation body (`include_input=False`: no input values)."""
    if isinstance(data, list) and data:
        data = data[0]
    if not isinstance(data, dict):
        return None
    items = data.get("detail")
    if isinstance(items, list):
        parts = [
            f"{'.'.join(str(x) for x in it.get('loc', []))}: {it.get('msg', '')}"
            for it in items
            if isinstance(it, dict)
        ]
        return "; ".join(parts) or None
    return None


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def _too_large(size: int | None, limit: int) -> bytes:
    got = f"of {size / 2**20:.1f} MB " if size is not None else ""
    return json_body(
        "payload_too_large",
        "PayloadTooLargeError",
        f"request body {got}exceeds the limit of {limit / 2**20:.0f} MB for this endpoint",
    )


async def _buffered(receive: Receive, limit: int) -> Receive | None:
    """Receive a body of unknown length up to `limit`; a `receive` that replays it, None when over."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return None
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body"):
            break
    pending = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

    async def replay() -> Message:
        return pending.pop() if pending else await receive()

    return replay


async def _respond(
    send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]] | None = None
) -> int:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *(headers or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
    return status
