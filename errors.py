"""Client-facing errors: one JSON shape for every HTTP route, `{"error": {"code", "message"}}`, unless a
vendor's route registers its vendor's own (ERROR_SHAPES; adapters/openai_audio.py registers OpenAI's)."""

from __future__ import annotations

import json
import logging
from typing import Any, Callable

from aiohttp import web

log = logging.getLogger(__name__)


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None,
                 param: str | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}
        self.param = param  # the request field at fault, where there is one

    def response(self, shape: "Shape | None" = None) -> web.Response:
        return error_response(self.status, self.code, self.message, self.headers, self.param, shape)


# A vendor's error body: (status, code, message, param) -> the JSON object.
Shape = Callable[[int, str, str, "str | None"], dict[str, Any]]
# Paths (a path and those under it) whose errors take their vendor's shape, the middlewares' errors too.
ERROR_SHAPES = web.AppKey("error_shapes", dict)


class BodyTimeout(TimeoutError):
    """A request body that did not arrive within --body-timeout-s (connections.py sets it on the
    body's stream). A TimeoutError, so that aiohttp's read of a body left unread ends quietly on it."""


def plain_error(status: int, code: str, message: str, param: str | None = None) -> dict[str, Any]:
    return {"error": {"code": code, "message": message}}


def error_body(code: str, message: str) -> str:
    return json.dumps(plain_error(0, code, message))


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None,
                   param: str | None = None, shape: Shape | None = None) -> web.Response:
    body = (shape or plain_error)(status, code, message, param)
    return web.Response(status=status, text=json.dumps(body), content_type="application/json", headers=headers)


def shape_of(request: web.Request) -> Shape | None:
    """The error shape registered for the request's path, if any."""
    for prefix, shape in request.app.get(ERROR_SHAPES, {}).items():
        if request.path == prefix or request.path.startswith(prefix.rstrip("/") + "/"):
            return shape
    return None


def client_json(data: str | bytes):
    """JSON a client sent. Any malformed input raises ValueError, nesting too deep for the parser too
    (its RecursionError would otherwise escape every handler as a 500 or a torn-down session)."""
    try:
        return json.loads(data)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


def quoted(value) -> str:
    """A client's value quoted in an error message, at most a line: an error must not amplify its input."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "too_large"}


@web.middleware
async def json_errors(request: web.Request, handler):
    shape = shape_of(request)
    try:
        return await handler(request)
    except ApiError as e:
        return e.response(shape)
    except BodyTimeout as e:
        response = error_response(408, "body_timeout", str(e), shape=shape)
        response.force_close()  # the rest of the body may still trickle in: no further request here
        return response
    except ConnectionError:
        raise  # the client left (a body cut short): connections.py lets it go without a traceback
    except web.HTTPException as e:
        if e.status < 400:
            raise
        return error_response(e.status, _HTTP_CODES.get(e.status, "http_error"), e.reason,
                              {k: v for k, v in e.headers.items() if k.lower() == "allow"}, shape=shape)
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return error_response(500, "internal", "internal server error", shape=shape)
