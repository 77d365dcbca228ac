"""Errors in each API's own shape.

Anthropic: ``{"type": "error", "error": {"type": ..., "message": ...}, "request_id": ...}``.
OpenAI: ``{"error": {"message": ..., "type": ..., "param": null, "code": ...}}``.
Both carry a ``request-id`` (and ``x-request-id``) header, set by the app's middleware.
"""

from __future__ import annotations

import json

from starlette.requests import Request
from starlette.responses import JSONResponse

# status -> Anthropic error type (https://docs.anthropic.com/en/api/errors)
ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    529: "overloaded_error",
}
# status -> (OpenAI error type, code)
OPENAI_TYPES = {
    400: ("invalid_request_error", None),
    401: ("invalid_request_error", "invalid_api_key"),
    403: ("invalid_request_error", None),
    404: ("invalid_request_error", "not_found"),
    405: ("invalid_request_error", "method_not_allowed"),
    413: ("invalid_request_error", "request_too_large"),
    429: ("rate_limit_error", "rate_limit_exceeded"),
    500: ("server_error", None),
    529: ("server_error", "overloaded"),
}


class APIError(Exception):
    """An error answered with ``status`` in the API's shape; ``headers`` (e.g. retry-after) are added."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None, param: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}
        self.param = param


def api_of(request: Request) -> str:
    """Which API's error shape a request gets: by path, then by the Anthropic SDK's version header."""
    path = request.url.path
    if path.startswith("/v1/messages"):
        return "anthropic"
    if path.startswith(("/v1/chat/", "/v1/completions", "/v1/responses")):
        return "openai"
    return "anthropic" if "anthropic-version" in request.headers or "x-api-key" in request.headers else "openai"


def error_body(api: str, status: int, message: str, request_id: str | None, param: str | None = None) -> dict:
    if api == "anthropic":
        body = {"type": "error", "error": {"type": ANTHROPIC_TYPES.get(status, "api_error"), "message": message}}
        if request_id:
            body["request_id"] = request_id
        return body
    kind, code = OPENAI_TYPES.get(status, ("server_error", None))
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(request: Request, status: int, message: str, headers: dict[str, str] | None = None,
                   param: str | None = None) -> JSONResponse:
    rid = getattr(request.state, "request_id", None)
    return JSONResponse(error_body(api_of(request), status, message, rid, param), status_code=status,
                        headers=headers or {})


def stream_error_anthropic(status: int, message: str) -> str:
    """An ``event: error`` SSE frame (for failures after the 200 was sent)."""
    data = {"type": "error", "error": {"type": ANTHROPIC_TYPES.get(status, "api_error"), "message": message}}
    return f"event: error\ndata: {json.dumps(data)}\n\n"


def stream_error_openai(status: int, message: str) -> str:
    return f"data: {json.dumps(error_body('openai', status, message, None))}\n\n"
