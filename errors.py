"""Client-facing errors: one JSON shape for every HTTP route."""

from __future__ import annotations

import json
import logging

from aiohttp import web

log = logging.getLogger(__name__)


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}

    def response(self) -> web.Response:
        return error_response(self.status, self.code, self.message, self.headers)


class BodyTimeout(TimeoutError):
    """A request body that did not arrive within --body-timeout-s (connections.py sets it on the
    body's stream). A TimeoutError, so that aiohttp's read of a body left unread ends quietly on it."""


def error_body(code: str, message: str) -> str:
    return json.dumps({"error": {"code": code, "message": message}})


def error_response(status: int, code: str, message: str,
                   headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, text=error_body(code, message), content_type="application/json",
                        headers=headers)


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
    try:
        return await handler(request)
    except ApiError as e:
        return e.response()
    except BodyTimeout as e:
        response = error_response(408, "body_timeout", str(e))
        response.force_close()  # the rest of the body may still trickle in: no further request here
        return response
    except ConnectionError:
        raise  # the client left (a body cut short): connections.py lets it go without a traceback
    except web.HTTPException as e:
        if e.status < 400:
            raise
        return error_response(e.status, _HTTP_CODES.get(e.status, "http_error"), e.reason,
                              {k: v for k, v in e.headers.items() if k.lower() == "allow"})
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return error_response(500, "internal", "internal server error")
