"""Access control: API keys, signed short-lived session tokens, allowed browser origins, and who a
client is (for the per-key limits and the audit log).

Off by default: with no API key configured, every route is open, as the server binds 127.0.0.1.
With keys, every route under /v1/ (and the legacy WebSocket routes of API_PATHS) needs a credential:

- `Authorization: Bearer <API key>` on any /v1/ route (or `Token <API key>`, the scheme Deepgram's SDKs send);
- a session token (POST /v1/tokens, signed with --token-secret) as `Authorization: Bearer <token>`,
  and, on GET routes (WebSocket, Server-Sent Events), where browsers cannot set headers, as
  `?token=<token>` or as a `Sec-WebSocket-Protocol` value: `bearer.<token>`, or the vendors' forms,
  OpenAI's `openai-insecure-api-key.<token>` and Deepgram's pair `token`, `<token>`. A token opens and
  watches live sessions only (TOKEN_ROUTES); the rest of /v1/ needs the key itself. A token minted by a
  vendor's API (an OpenAI `ek_` client secret) works on that API's routes only (TOKEN_SCOPES).

Browser origins are checked on every /v1/ route, WebSocket included: the server's own origin, and
those of --allowed-origins. CORS headers go on every response to an allowed origin.
"""

from __future__ import annotations

import hashlib
import math
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Mapping
from urllib.parse import urlsplit

import jwt
from aiohttp import hdrs, web

from config import Config
from errors import ApiError, client_json
from sessions import REGISTRY, Client, Session, SessionOptions, SessionRegistry

AUDIENCE = "livestt"  # a token of this server, not some other service's JWT signed with the same secret
WS_PROTOCOL = "livestt"  # the subprotocol a browser offers beside bearer.<token>; echoed when offered
TOKEN_PROTOCOL = "bearer."
DEFAULT_TTL_S = 300.0
# Method and route (as the router names it) that a session token may use; the rest needs a key.
TOKEN_ROUTES = {
    ("POST", "/v1/rtc"),
    ("DELETE", "/v1/rtc/{session_id}"),
    ("GET", "/v1/ws"),
    ("GET", "/v1/sessions/{session_id}/events"),
    # Files: a page may transcribe one with its token, as it opens a session.
    ("POST", "/v1/audio/transcriptions"),
    ("POST", "/v1/listen"),
    ("GET", "/v1/models"),
    ("GET", "/v1/models/{model_id}"),
    # The vendors' live APIs and the legacy WebSocket dialects (adapters/).
    ("GET", "/v1/realtime"),
    ("POST", "/v1/realtime"),
    ("POST", "/v1/realtime/calls"),
    ("POST", "/v1/realtime/calls/{call_id}/hangup"),
    ("GET", "/v1/listen"),
    ("GET", "/v1/transcriptions"),
    ("GET", "/ws"),
    ("GET", "/ws/transcribe"),
}
# A token minted for one API (its scope) is usable on that API's routes only.
TOKEN_SCOPES = {
    "openai-realtime": {("GET", "/v1/realtime"), ("POST", "/v1/realtime"), ("POST", "/v1/realtime/calls"),
                        ("POST", "/v1/realtime/calls/{call_id}/hangup")},
    "deepgram": {("GET", "/v1/listen"), ("POST", "/v1/listen")},
}
# Routes outside /v1/ that are guarded as /v1/ is: the legacy dialects, at the paths their pages use.
API_PATHS = frozenset({"/ws", "/ws/transcribe"})
_PREFIX = "/v1/"
_TOKENS = "/v1/tokens"
_ALLOW_METHODS = "GET, POST, DELETE, OPTIONS"
_ALLOW_HEADERS = "Authorization, Content-Type"  # and whatever else a preflight asks for (an SDK's own)
_EXPOSE_HEADERS = "Location, Retry-After, WWW-Authenticate"
_PREFLIGHT_MAX_AGE = "600"


@dataclass(frozen=True)
class Grant:
    """What the request's credential allows."""

    key_id: str = ""  # the API key's id, or that of the key that minted the token; "" when open
    token: bool = False
    options: Mapping[str, Any] = field(default_factory=dict)  # session options the token fixes
    max_session_s: float | None = None  # a token's own session length limit
    scope: str = ""  # of TOKEN_SCOPES: the API it was minted for; "" for any of TOKEN_ROUTES
    settings: Mapping[str, Any] = field(default_factory=dict)  # the vendor session a token starts (not fixes)


OPEN = Grant()
GRANT = "livestt.grant"  # request[GRANT]: the Grant of a /v1/ request


def key_id(key: str) -> str:
    """How logs and limits name a key without revealing it."""
    return "key-" + hashlib.sha256(key.encode()).hexdigest()[:10]


def read_key_file(path: str) -> list[str]:
    """One key per line; blank lines and lines starting with # are skipped."""
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip() and not line.lstrip().startswith("#")]


class Access:
    """The server's keys, token secret and origins, and the checks made on each request."""

    def __init__(self, config: Config) -> None:
        self.config = config
        keys = [k.strip() for k in config.api_key if k.strip()]
        if config.api_key_file:
            try:
                keys += read_key_file(config.api_key_file)
            except OSError as e:
                raise SystemExit(f"cannot read --api-key-file: {e}") from None
        # Looked up by digest: a presented key is compared through its hash, never byte by byte.
        self._keys = {hashlib.sha256(k.encode()).hexdigest(): key_id(k) for k in keys}
        self.key_count = len(self._keys)
        self._key_ids = set(self._keys.values())
        self.enabled = bool(self._keys)
        # Random per start unless configured: replicas behind one load balancer need a shared secret.
        secret = config.token_secret.encode() or secrets.token_bytes(32)
        self._secret = hashlib.sha256(b"livestt token v1\0" + secret).digest()
        self.random_secret = not config.token_secret
        self._origins = {o.rstrip("/").lower() for o in config.allowed_origins if o.strip()}
        self._any_origin = "*" in self._origins

    # -- origins ---------------------------------------------------------------------------------

    def origin_allowed(self, request: web.Request) -> bool:
        """No Origin (not a browser), the server's own host, or one of --allowed-origins."""
        origin = request.headers.get(hdrs.ORIGIN)
        if origin is None:
            return True
        origin = origin.rstrip("/").lower()
        if self._any_origin or origin in self._origins:
            return True
        # Same origin: the page came from this host. The scheme is not compared, since a TLS proxy
        # in front makes the page https while the server sees http. Behind trusted proxies, the host
        # the browser asked for may come in X-Forwarded-Host.
        host = urlsplit(origin).netloc
        hosts = {(request.host or "").lower()}
        if self.config.trusted_proxies:
            hosts.update(h.strip().lower() for h in
                         request.headers.get(hdrs.X_FORWARDED_HOST, "").split(",") if h.strip())
        return origin != "null" and host in hosts

    def cors_headers(self, request: web.Request) -> dict[str, str]:
        origin = request.headers.get(hdrs.ORIGIN)
        if origin is None or not self.origin_allowed(request):
            return {}
        return {hdrs.ACCESS_CONTROL_ALLOW_ORIGIN: origin,
                hdrs.ACCESS_CONTROL_EXPOSE_HEADERS: _EXPOSE_HEADERS}

    # -- credentials -----------------------------------------------------------------------------

    def authenticate(self, request: web.Request) -> Grant:
        """The grant of a /v1/ request; 401 for a missing, wrong or expired credential."""
        if not self.enabled:
            return OPEN
        credential, where = _credential(request)
        if credential is None:
            raise _unauthorized("unauthorized",
                                "an API key or a session token is required (Authorization: Bearer ...)")
        key = self._keys.get(hashlib.sha256(credential.encode()).hexdigest())
        if key is not None:
            if where != "header":  # URLs end up in logs and browser history
                raise _unauthorized("invalid_token", "API keys go in the Authorization header only")
            return Grant(key_id=key)
        grant = self.verify(credential)
        route = request.match_info.route.resource
        name = route.canonical if route is not None else request.path
        if (request.method, name) not in TOKEN_ROUTES:
            raise ApiError(403, "key_required", "this route needs an API key; a session token "
                           "only opens and watches sessions",
                           {hdrs.WWW_AUTHENTICATE: 'Bearer realm="livestt", error="insufficient_scope"'})
        if grant.scope and (request.method, name) not in TOKEN_SCOPES.get(grant.scope, ()):
            raise ApiError(403, "token_not_allowed", f"this token was minted for the {grant.scope} API "
                           "and works on its routes only",
                           {hdrs.WWW_AUTHENTICATE: 'Bearer realm="livestt", error="insufficient_scope"'})
        return grant

    def verify(self, token: str) -> Grant:
        token = token.removeprefix(CLIENT_SECRET_PREFIX)
        try:
            claims = jwt.decode(token, self._secret, algorithms=["HS256"], audience=AUDIENCE,
                                options={"require": ["exp", "iat", "sub", "aud"]})
        except jwt.ExpiredSignatureError:
            raise _unauthorized("token_expired", "the session token has expired") from None
        except jwt.InvalidTokenError:
            raise _unauthorized("invalid_token", "the API key or session token is not valid") from None
        if claims["sub"] not in self._key_ids:  # its key was removed: so are the tokens it minted
            raise _unauthorized("invalid_token", "the key that minted this token is no longer valid")
        options = claims.get("options") or {}
        max_s = claims.get("max_session_s")
        settings = claims.get("settings") or {}
        return Grant(key_id=str(claims["sub"]), token=True,
                     options=options if isinstance(options, dict) else {},
                     max_session_s=float(max_s) if isinstance(max_s, (int, float)) else None,
                     scope=str(claims.get("scope") or ""),
                     settings=settings if isinstance(settings, dict) else {})

    def mint(self, grant: Grant, ttl_s: float, options: Mapping[str, Any],
             max_session_s: float | None, scope: str = "",
             settings: Mapping[str, Any] | None = None) -> tuple[str, int]:
        now = time.time()
        expires = math.ceil(now + ttl_s)
        claims: dict[str, Any] = {"aud": AUDIENCE, "sub": grant.key_id or "open", "iat": int(now),
                                  "exp": expires, "jti": secrets.token_hex(8)}
        if options:
            claims["options"] = dict(options)
        if max_session_s is not None:
            claims["max_session_s"] = max_session_s
        if scope:
            claims["scope"] = scope
        if settings:
            claims["settings"] = dict(settings)
        return jwt.encode(claims, self._secret, algorithm="HS256"), expires


ACCESS = web.AppKey("access", Access)
# OpenAI's client secrets start so, and its browser SDKs refuse any other; the token follows.
CLIENT_SECRET_PREFIX = "ek_"
OPENAI_KEY_PROTOCOL = "openai-insecure-api-key."  # OpenAI's browser form: the credential in a subprotocol
_PAIR_SCHEMES = ("token", "bearer")  # Deepgram's browser form: the scheme, then the credential


def _unauthorized(code: str, message: str) -> ApiError:
    challenge = 'Bearer realm="livestt"'
    if code != "unauthorized":  # RFC 6750: a credential was given, and it did not do
        challenge += f', error="invalid_token", error_description="{message}"'
    return ApiError(401, code, message, {hdrs.WWW_AUTHENTICATE: challenge})


def _credential(request: web.Request) -> tuple[str | None, str]:
    """The presented credential and where it came from: header, protocol or query."""
    header = request.headers.get(hdrs.AUTHORIZATION)
    if header is not None:
        scheme, _, value = header.partition(" ")
        # Deepgram's SDKs send `Token <key>`, and a lowercase `bearer` with their access tokens.
        if scheme.lower() not in ("bearer", "token") or not value.strip():
            raise _unauthorized("invalid_token", "use Authorization: Bearer <API key or token>")
        return value.strip(), "header"
    if request.method == "GET":
        offered = _offered_protocols(request)
        for protocol in offered:
            for prefix in (TOKEN_PROTOCOL, OPENAI_KEY_PROTOCOL):
                if protocol.startswith(prefix):
                    return protocol[len(prefix):], "protocol"
        for scheme, value in zip(offered, offered[1:]):
            if scheme.lower() in _PAIR_SCHEMES:
                return value, "protocol"
        if "token" in request.query:
            return request.query["token"], "query"
    return None, ""


def _offered_protocols(request: web.Request) -> list[str]:
    return [p.strip() for value in request.headers.getall(hdrs.SEC_WEBSOCKET_PROTOCOL, [])
            for p in value.split(",") if p.strip()]


def ws_protocols(request: web.Request, named: str = WS_PROTOCOL) -> tuple[str, ...]:
    """The subprotocols the WebSocket may answer with (RFC 6455: one the client offered).

    A browser offers ["livestt", "bearer.<token>"] and gets "livestt" back; OpenAI's offers ["realtime",
    "openai-insecure-api-key.<token>"] and gets `named` "realtime" back; Deepgram's offers ["token",
    "<token>"] and gets "token" back. A client that offered only its token protocol gets that back: a
    browser fails a handshake that echoes none.
    """
    offered = _offered_protocols(request)
    if named in offered:
        return (named,)
    pair = [p for p in offered[:-1] if p.lower() in _PAIR_SCHEMES]
    if pair:
        return (pair[0],)
    return tuple(p for p in offered if p.startswith(TOKEN_PROTOCOL))[:1]


# -- what the routes ask -------------------------------------------------------------------------

def grant(request: web.Request) -> Grant:
    return request.get(GRANT, OPEN)


def client(request: web.Request) -> Client:
    """Who opens a session: for the per-key limit, the token's time limit and the audit log."""
    g = grant(request)
    config = request.app[ACCESS].config
    return Client(address=client_address(request, config.trusted_proxies), key=g.key_id,
                  max_session_s=g.max_session_s)


def client_address(request: web.Request, trusted_proxies: int) -> str:
    """The peer's address; behind `trusted_proxies` reverse proxies, the one they report."""
    if trusted_proxies:
        hops = [h.strip() for value in request.headers.getall(hdrs.X_FORWARDED_FOR, [])
                for h in value.split(",") if h.strip()]
        if hops:
            return hops[-trusted_proxies] if len(hops) >= trusted_proxies else hops[0]
    return request.remote or ""


def session_options(request: web.Request, raw: Mapping[str, Any]) -> SessionOptions:
    """The session's options; a token's options are fixed: asking for another value is a 403."""
    return options_within(request.app[REGISTRY], grant(request), raw)


def options_within(registry: SessionRegistry, grant: Grant, raw: Mapping[str, Any]) -> SessionOptions:
    """session_options for a grant already read (a session whose options change after its request)."""
    bound = grant.options
    if not bound:
        return registry.options(raw)
    asked, fixed = registry.options(raw), registry.options(bound)
    for name in bound:
        if name in raw and getattr(asked, name) != getattr(fixed, name):
            raise ApiError(403, "option_not_allowed",
                           f"this token allows only {name}={bound[name]!r}")
    return registry.options({**raw, **bound})


def owns(request: web.Request, session: Session) -> bool:
    """With access control on, a session is visible to the key that opened it (and its tokens)."""
    key = grant(request).key_id
    return not key or not session.client.key or key == session.client.key


# -- middleware and routes -----------------------------------------------------------------------

@web.middleware
async def guard(request: web.Request, handler):
    """CORS preflights, the origin check, and the credential check of every /v1/ route."""
    access = request.app[ACCESS]
    if request.method == "OPTIONS" and hdrs.ACCESS_CONTROL_REQUEST_METHOD in request.headers:
        return _preflight(request, access)
    if not guarded(request.path):
        return await handler(request)
    if not access.origin_allowed(request):
        raise ApiError(403, "forbidden_origin",
                       f"origin {request.headers[hdrs.ORIGIN]!r} is not allowed (--allowed-origins)")
    result = access.authenticate(request)  # a token cannot mint tokens: /v1/tokens needs a key
    if "token" in request.query:  # a credential, not a session option
        request = request.clone(rel_url=request.rel_url.without_query_params("token"))
    request[GRANT] = result
    return await handler(request)


def guarded(path: str) -> bool:
    """The API's routes: /v1/, and the legacy dialects' paths outside it."""
    return path.startswith(_PREFIX) or path in API_PATHS


def _preflight(request: web.Request, access: Access) -> web.Response:
    if not access.origin_allowed(request):
        raise ApiError(403, "forbidden_origin",
                       f"origin {request.headers.get(hdrs.ORIGIN)!r} is not allowed (--allowed-origins)")
    # The vendors' browser SDKs add headers of their own (X-Stainless-*, OpenAI-Beta): what is asked is allowed.
    asked = request.headers.get(hdrs.ACCESS_CONTROL_REQUEST_HEADERS, "")
    return web.Response(status=204, headers={
        hdrs.ACCESS_CONTROL_ALLOW_METHODS: _ALLOW_METHODS,
        hdrs.ACCESS_CONTROL_ALLOW_HEADERS: ", ".join(filter(None, [_ALLOW_HEADERS, asked])),
        hdrs.ACCESS_CONTROL_MAX_AGE: _PREFLIGHT_MAX_AGE,
    })


async def _cors(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: streamed responses (SSE) get their headers too."""
    headers = request.app[ACCESS].cors_headers(request)
    if headers:
        response.headers.update(headers)
        vary = response.headers.get(hdrs.VARY)
        response.headers[hdrs.VARY] = f"{vary}, Origin" if vary else "Origin"


async def mint_token(request: web.Request) -> web.Response:
    """POST /v1/tokens {"ttl_s", "options", "max_session_s"}: a token for one web page."""
    access, registry = request.app[ACCESS], request.app[REGISTRY]
    config = access.config
    body = await request.read()
    try:
        data = _json_object(body) if body.strip() else {}
    except ValueError:
        raise ApiError(400, "bad_json", "the body must be a JSON object") from None
    unknown = set(data) - {"ttl_s", "options", "max_session_s"}
    if unknown:
        raise ApiError(400, "unknown_option", f"unknown field(s): {', '.join(sorted(unknown))}")
    ttl_s = _number(data.get("ttl_s", DEFAULT_TTL_S), "ttl_s")
    if not 1 <= ttl_s <= config.token_max_ttl_s:
        raise ApiError(400, "bad_option", f"ttl_s must be between 1 and {config.token_max_ttl_s:g}")
    options = data.get("options") or {}
    if not isinstance(options, dict):
        raise ApiError(400, "bad_option", "options must be an object")
    registry.options(options)  # a bad language or value is refused now, not when the page uses it
    max_session_s = data.get("max_session_s")
    if max_session_s is not None:
        max_session_s = _number(max_session_s, "max_session_s")
        if not 0 < max_session_s <= config.max_session_s:
            raise ApiError(400, "bad_option",
                           f"max_session_s must be above 0 and at most {config.max_session_s:g}")
    token, expires = access.mint(grant(request), ttl_s, options, max_session_s)
    return web.json_response(
        {"token": token, "expires_at": expires, "ttl_s": ttl_s, "options": options,
         "max_session_s": max_session_s if max_session_s is not None else config.max_session_s},
        headers={hdrs.CACHE_CONTROL: "no-store"})


def _json_object(body: bytes) -> dict[str, Any]:
    data = client_json(body)
    if not isinstance(data, dict):
        raise ValueError
    return data


def _number(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ApiError(400, "bad_option", f"{name} must be a number")
    return float(value)


def setup(app: web.Application, config: Config) -> Access:
    """Adds POST /v1/tokens and the CORS headers; `guard` must be among the app's middlewares."""
    access = Access(config)
    app[ACCESS] = access
    app.router.add_post(_TOKENS, mint_token)
    app.on_response_prepare.append(_cors)
    return access
