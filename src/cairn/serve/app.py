"""The HTTP server: a FastAPI app over an ``Engine``.

``create_app(engine, ...)`` returns the app; ``cairn serve`` runs it with uvicorn. Routes: the Anthropic Messages
API (``cairn.serve.anthropic``), OpenAI chat/completions (``cairn.serve.openai``) and Responses
(``cairn.serve.responses``), ``/v1/models``, ``/health``, ``/metrics`` and the chat page at ``/``. The outer
ASGI middleware gives every response a request id, checks API keys and rate limits, refuses oversized bodies
and counts requests for the metrics.
"""

from __future__ import annotations

import logging
import secrets
from datetime import UTC, datetime
from html import escape
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException

from cairn.errors import CairnError
from cairn.serve import anthropic, openai, responses, tokenize
from cairn.serve.auth import KeyChecker, RateLimiter
from cairn.serve.errors import APIError, error_response
from cairn.serve.metrics import Metrics
from cairn.serve.runtime import ClientGone, ServerState
from cairn.serve.timeouts import MIN_BODY_RATE, READ_TIMEOUT, BodyDeadline

log = logging.getLogger("cairn.serve")
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
ANTHROPIC_MAX_BODY = 32 * 1024 * 1024  # the Messages API's own limit


class BodyTooLarge(StarletteHTTPException):
    def __init__(self, limit: int):
        super().__init__(413, f"the request body is larger than this server's limit of {limit} bytes")


STATIC_TYPES = {"js": "text/javascript; charset=utf-8", "md": "text/plain; charset=utf-8",
                "txt": "text/plain; charset=utf-8"}
# The page runs only its own scripts: markup that a model writes into a reply cannot run script (defence in depth
# beside the sanitiser), and images in replies load only from this server or data: URLs.
PAGE_HEADERS = {"content-security-policy": "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
                                           "img-src 'self' data:; object-src 'none'; base-uri 'none'; "
                                           "frame-ancestors 'none'"}


def _route_label(path: str) -> str:
    if path.startswith("/v1/models/"):
        return "/v1/models/{id}"
    known = {"/", "/health", "/metrics", "/v1/models", "/v1/messages", "/v1/messages/count_tokens",
             "/v1/chat/completions", "/v1/completions", "/v1/responses", "/favicon.ico", *tokenize.PATHS}
    return path if path in known else "other"


class Gatekeeper:
    """ASGI middleware: request ids, API keys, rate limits, the body-size limit and read deadline, request
    counting."""

    def __init__(self, app, state: ServerState, max_body: int, read_timeout: float = READ_TIMEOUT,
                 min_body_rate: float = MIN_BODY_RATE):
        self.app, self.state, self.max_body = app, state, max_body
        self.read_timeout, self.min_body_rate = read_timeout, min_body_rate

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        rid = "req_" + secrets.token_hex(12)
        scope.setdefault("state", {})["request_id"] = rid
        status, started = [500], [False]

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                started[0] = True
                status[0] = message["status"]
                headers = MutableHeaders(scope=message)
                headers["request-id"] = rid
                headers["x-request-id"] = rid
            await send(message)

        request = Request(scope)
        path = scope["path"]
        try:
            refusal = self._refusal(request, path)
            if refusal is not None:
                await refusal(scope, receive, send_with_id)
                return
            seen = [0]
            timed_receive = BodyDeadline(receive, self.read_timeout, self.min_body_rate)

            async def limited_receive():
                message = await timed_receive()
                if message["type"] == "http.request":
                    seen[0] += len(message.get("body", b""))
                    if seen[0] > self.max_body:
                        raise BodyTooLarge(self.max_body)
                return message

            await self.app(scope, limited_receive, send_with_id)
        except Exception as e:
            if started[0]:
                raise  # the response has begun: nothing better to send
            log.exception("internal error on %s %s", scope["method"], path)
            response = error_response(request, 500, f"internal server error ({type(e).__name__}); "
                                                    "see the server log")
            await response(scope, receive, send_with_id)
        finally:
            method = scope["method"] if scope["method"] in _METHODS else "other"  # labels from a fixed set
            self.state.metrics.http_done(method, _route_label(path), status[0])

    def _refusal(self, request: Request, path: str):
        allowed = self.state.allowed_hosts
        if allowed is not None and not self.state.keys.enabled:
            host = _host_name(request.headers.get("host", ""))
            if host not in allowed:
                self.state.metrics.reject("bad_host")
                return error_response(request, 403, f"Host {host!r} is not a name of this server (it answers to "
                                                    f"{', '.join(sorted(allowed))}): refused to stop DNS rebinding; "
                                                    "start it with --allowed-host NAME, or with an API key")
        # the API schema and its pages follow the API's own keys: they describe what a key unlocks
        protected = path.startswith("/v1/") or path in tokenize.PATHS or path in (
            "/metrics", "/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect")
        if protected and request.method != "OPTIONS":
            key = KeyChecker.presented(request.headers)
            if not self.state.keys.check(key):
                self.state.metrics.reject("unauthenticated")
                what = "no API key was given" if key is None else "the API key is not valid"
                return error_response(request, 401, f"{what}: send it as 'x-api-key: KEY' or "
                                                    "'Authorization: Bearer KEY'")
            client = key or (request.client.host if request.client else "unknown")
            wait = self.state.limiter.acquire(client)
            if wait > 0:
                self.state.metrics.reject("rate_limited")
                return error_response(request, 429, f"rate limit of {self.state.limiter.rate:g} requests per "
                                                    f"minute exceeded; retry in {wait:.1f} s",
                                      headers={"retry-after": str(max(1, int(wait + 0.999)))})
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            self.state.metrics.reject("too_large")
            return error_response(request, 413, f"the request body ({length} bytes) is larger than this server's "
                                                f"limit of {self.max_body} bytes")
        return None


def _host_name(header: str) -> str:
    """The host of a Host header, without its port or IPv6 brackets, lower case."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:].split("]", 1)[0]
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def create_app(
    engine,
    *,
    api_keys: list[str] | None = None,
    max_queue: int = 256,
    rate_limit: float | None = None,
    max_body_bytes: int = ANTHROPIC_MAX_BODY,
    ping_interval: float = 10.0,
    model_name: str | None = None,
    adapters: dict[str, object] | None = None,
    self_critique: bool = False,
    critique_settings=None,
    allowed_hosts: list[str] | None = None,
    read_timeout: float = READ_TIMEOUT,
    min_body_rate: float = MIN_BODY_RATE,
) -> FastAPI:
    """The server app over ``engine``.

    ``api_keys``: when non-empty, every /v1/ route and /metrics need one of them. ``max_queue``: the most generation
    requests held at once (running or waiting); more get 529 with retry-after. ``rate_limit``: requests per minute
    per API key (per client address without keys). ``ping_interval``: seconds without output before a streamed
    Messages response sends a ``ping`` event. ``adapters``: more models by name, each an engine of its own (the
    base with a LoRA adapter merged); a request picks one with its ``model`` field, and ``/v1/models`` lists them
    after the base. The queue limit and rate limits are the server's, over all models together.
    ``self_critique``: chat requests are drafted, critiqued and revised unless they say otherwise (a request's
    ``"cairn": {"self_critique": ...}`` turns it on or off); ``critique_settings`` (``self_critique.Settings``):
    the constitution and principles (default: cairn's own constitution, one principle drawn per reply).
    ``allowed_hosts``: without API keys, requests whose Host header names another host are refused (403): a web
    page on another site cannot reach a keyless local server by pointing its own name at 127.0.0.1 (DNS
    rebinding). None: any Host. ``read_timeout``, ``min_body_rate``: a request body must arrive within
    ``read_timeout + bytes / min_body_rate`` seconds of its head, or the request gets 408 (the deadline for the head
    itself is the HTTP protocol's: ``cairn.serve.timeouts.header_guard``).
    """
    from cairn.serve.self_critique import Settings, load_constitution

    if not read_timeout > 0 or not min_body_rate > 0:
        raise CairnError(f"the read timeout ({read_timeout}) and the minimum body rate ({min_body_rate}) must be "
                         "positive: give --read-timeout in seconds and --min-body-rate in KiB/s")
    if critique_settings is None:
        critique_settings = Settings(load_constitution())
    state = ServerState(
        engine=engine,
        model_name=model_name or getattr(engine, "model_name", None) or "cairn",
        keys=KeyChecker(api_keys),
        limiter=RateLimiter(rate_limit),
        metrics=Metrics(),
        max_queue=max_queue,
        ping_interval=ping_interval,
        adapters=dict(adapters or {}),
        self_critique=self_critique,
        critique_settings=critique_settings,
        allowed_hosts=frozenset(h.lower().strip("[]") for h in allowed_hosts) if allowed_hosts is not None else None,
    )
    taken = {"default", "cairn", state.model_name.lower()}
    for name in state.adapters:
        if not name or name.lower() in taken:
            raise CairnError(f"adapter model name {name!r} is empty or already taken (by the base model, another "
                             "adapter or the aliases 'default' and 'cairn'): give each adapter a name of its own")
        taken.add(name.lower())
    app = FastAPI(title="cairn", version="0.1.0", summary="Anthropic Messages and OpenAI APIs over the cairn engine")
    app.state.cairn = state
    app.include_router(anthropic.router(state))
    app.include_router(openai.router(state))
    app.include_router(responses.router(state))
    app.include_router(tokenize.router(state))  # vLLM's tokenizer endpoints (lm-evaluation-harness's remote tokenizer)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return error_response(request, exc.status, exc.message, exc.headers, exc.param)

    @app.exception_handler(ClientGone)
    async def _client_gone(request: Request, exc: ClientGone):
        # the client left before a non-streamed reply was ready: its generation is already cancelled,
        # and nobody reads this answer (499: nginx's "client closed request", for the access log)
        return JSONResponse({}, status_code=499)

    @app.exception_handler(CairnError)
    async def _cairn_error(request: Request, exc: CairnError):
        return error_response(request, 400, str(exc))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        return error_response(request, 400, _validation_message(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        status = exc.status_code
        message = str(exc.detail)
        if status == 404:
            message = f"{request.method} {request.url.path}: no such endpoint"
        elif status == 405:
            message = f"{request.method} is not allowed on {request.url.path}"
        return error_response(request, status, message, dict(exc.headers or {}))

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": state.model_name, "models": state.model_names(),
                "in_flight": state.in_flight}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics() -> PlainTextResponse:
        try:
            stats = dict(engine.stats())
        except Exception:  # metrics must not fail because the engine's stats did
            stats = {}
        return PlainTextResponse(state.metrics.render(stats, state.model_name),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    def model_card(served=state) -> dict:
        created = datetime.fromtimestamp(state.created, UTC)
        return {
            # Anthropic's fields
            "type": "model",
            "id": served.model_name,
            "display_name": served.model_name,
            "created_at": created.strftime("%Y-%m-%dT%H:%M:%SZ"),
            # OpenAI's fields
            "object": "model",
            "created": state.created,
            "owned_by": "cairn",
            "max_model_len": served.max_context,
        }

    @app.get("/v1/models")
    async def models() -> dict:
        cards = [model_card(state.select(name)) for name in state.model_names()]
        return {"object": "list", "data": cards, "has_more": False, "first_id": cards[0]["id"],
                "last_id": cards[-1]["id"]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict:
        return model_card(state.select(model_id))

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        html = resources.files("cairn.serve").joinpath("static/index.html").read_text(encoding="utf-8")
        html = html.replace("{{SELF_CRITIQUE}}", "checked" if state.self_critique else "")
        return HTMLResponse(html.replace("{{MODEL}}", escape(state.model_name)), headers=PAGE_HEADERS)

    @app.get("/static/{name}", include_in_schema=False)
    async def static(name: str) -> Response:
        """The page's scripts: its own and the vendored markdown renderer and sanitiser (no CDN)."""
        kind = STATIC_TYPES.get(name.rsplit(".", 1)[-1])
        path = resources.files("cairn.serve").joinpath("static", name)
        if kind is None or "/" in name or name.startswith(".") or not path.is_file():
            raise StarletteHTTPException(404)
        return Response(path.read_bytes(), media_type=kind, headers={"cache-control": "no-cache"})

    app.add_middleware(Gatekeeper, state=state, max_body=max_body_bytes, read_timeout=read_timeout,
                       min_body_rate=min_body_rate)
    return app


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        if err.get("type") == "json_invalid":
            detail = (err.get("ctx") or {}).get("error", "")
            parts.append(f"the request body is not valid JSON{': ' + str(detail) if detail else ''}")
            continue
        loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
        parts.append(f"{loc}: {err.get('msg', 'invalid')}" if loc else str(err.get("msg", "invalid")))
    return "; ".join(parts) or "invalid request"
