"""HTTP errors on a vendor's routes in that vendor's shape, so that its SDK reads them: the server's
`{"error": {"code", "message"}}` becomes OpenAI's (with `type` and `param`) or Deepgram's
(`err_code`, `err_msg`, `request_id`). The codes stay the server's own (protocol.ERRORS)."""

from __future__ import annotations

import json
import uuid
from typing import Any, Callable

from aiohttp import web

Shape = Callable[[int, str, str], dict[str, Any]]  # (status, code, message) -> the body
SHAPES = web.AppKey("vendor_error_shapes", dict)  # path prefix -> Shape


def openai_error(status: int, code: str, message: str) -> dict[str, Any]:
    """What OpenAI's SDKs read into their exceptions' `.message`, `.type`, `.param` and `.code`."""
    kind = "server_error" if status >= 500 else {401: "authentication_error", 403: "permission_error",
                                                 429: "rate_limit_error"}.get(status, "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def deepgram_error(status: int, code: str, message: str) -> dict[str, Any]:
    return {"err_code": code, "err_msg": message, "request_id": str(uuid.uuid4())}


def register(app: web.Application, prefix: str, shape: Shape) -> None:
    """Errors on `prefix` and the paths under it take `shape`."""
    app.setdefault(SHAPES, {})[prefix] = shape


@web.middleware
async def vendor_errors(request: web.Request, handler):
    """Outside json_errors, which has made every error a response in the server's shape."""
    response = await handler(request)
    if response.status < 400 or not isinstance(response, web.Response) or response.content_type != "application/json":
        return response
    shape = next((s for prefix, s in request.app.get(SHAPES, {}).items()
                  if request.path == prefix or request.path.startswith(prefix + "/")), None)
    if shape is None or not isinstance(response.body, bytes):
        return response
    try:
        error = json.loads(response.body)["error"]
        code, message = error["code"], error["message"]
    except (ValueError, KeyError, TypeError):
        return response  # already a vendor's body
    if "type" in error:  # OpenAI's shape already
        return response
    response.text = json.dumps(shape(response.status, code, message))
    return response
