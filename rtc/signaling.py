"""HTTP offer/answer (WHIP, RFC 9725): POST an SDP offer, get the complete answer; DELETE to end."""

from __future__ import annotations

import logging

from aiohttp import web
from aiortc.sdp import SessionDescription

from typing import Callable

from ops import auth
import protocol
from errors import ApiError
from sessions import REGISTRY, Session, SessionOptions

from .peer import ChannelProtocol, NativeChannel, PeerSession, Post

log = logging.getLogger(__name__)

def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/rtc", post_offer)
    app.router.add_delete("/v1/rtc/{session_id}", delete_session)


async def post_offer(request: web.Request) -> web.Response:
    registry = request.app[REGISTRY]
    config = registry.config
    content_type = request.content_type
    if content_type not in ("application/sdp", "application/json"):
        raise ApiError(415, "unsupported_media_type",
                       "send the offer as application/sdp, or application/json {type, sdp}")
    body = await read_body(request, config.max_offer_bytes)
    raw_options = dict(request.query)
    if content_type == "application/json":
        try:
            sdp, extra = protocol.rtc_offer(body)
        except protocol.ClientError as e:
            raise ApiError(400, e.code, e.message) from None
        raw_options.update(extra)
    else:
        try:
            sdp = body.decode("utf-8")
        except UnicodeDecodeError:
            raise ApiError(400, "bad_sdp", "the offer is not UTF-8 text") from None
    options = auth.session_options(request, raw_options)
    session, answer = await open_peer(request, sdp, options)
    location = f"/v1/rtc/{session.id}"
    if content_type == "application/sdp":
        return web.Response(status=201, text=answer, content_type="application/sdp",
                            headers={"Location": location})
    return web.json_response(protocol.rtc_answer(answer, session.id), status=201, headers={"Location": location})


async def open_peer(request: web.Request, sdp: str, options: SessionOptions,
                    speaks: Callable[[Session, Post], ChannelProtocol] = NativeChannel,
                    api: str = "livestt") -> tuple[Session, str]:
    """A WebRTC session for this offer, within the limits: the session and the complete SDP answer.
    `speaks`: the protocol of its data channel."""
    registry = request.app[REGISTRY]
    config = registry.config
    _check_offer(sdp)
    client = auth.client(request)
    registry.check_capacity(client)
    session = registry.create("webrtc", options, hold_events=True, client=client, api=api)
    peer = PeerSession(session, config.ice_servers, config.ice_timeout_s, speaks, config.opus_bitrate)
    try:
        answer = await peer.answer(sdp)
    except Exception as e:
        log.info("rejected offer: %s", e)
        await session.end("bad_offer")
        raise ApiError(400, "bad_sdp", f"the offer could not be negotiated: {e}") from None
    return session, answer


async def delete_session(request: web.Request) -> web.Response:
    registry = request.app[REGISTRY]
    session = registry.get(request.match_info["session_id"])
    if session is None or not auth.owns(request, session):
        raise ApiError(404, "unknown_session", "no such session")
    await session.end("deleted")
    return web.json_response({"session_id": session.id, "reason": session.reason})


async def read_body(request: web.Request, limit: int) -> bytes:
    if request.content_length is not None and request.content_length > limit:
        raise ApiError(413, "too_large", f"the offer is larger than {limit} bytes")
    # read(n) returns what has arrived so far, not n bytes: a chunked body comes in pieces.
    body = bytearray()
    while chunk := await request.content.read(limit + 1 - len(body)):
        body += chunk
        if len(body) > limit:
            raise ApiError(413, "too_large", f"the offer is larger than {limit} bytes")
    return bytes(body)


_MAX_MEDIA = 16  # m-lines an offer may carry: one audio track is read; the rest are refused in the answer
_FINGERPRINT_BYTES = {"sha-256": 32, "sha-384": 48, "sha-512": 64}  # what DTLS 1.2 peers offer (RFC 8122)


def _check_offer(sdp: str) -> None:
    """Refuse what can never become a transcription before any peer is built."""
    if not sdp.lstrip().startswith("v=0"):
        raise ApiError(400, "bad_sdp", "the body is not an SDP offer")
    try:
        description = SessionDescription.parse(sdp)
    except Exception:
        raise ApiError(400, "bad_sdp", "the SDP offer could not be parsed") from None
    if len(description.media) > _MAX_MEDIA:
        raise ApiError(400, "too_many_tracks", f"the offer has {len(description.media)} media sections; "
                       f"at most {_MAX_MEDIA} are accepted (one audio track is transcribed)")
    audio = [m for m in description.media if m.kind == "audio"]
    if not audio:
        raise ApiError(400, "no_audio", "the offer has no audio track")
    if not any(c.mimeType.lower() == "audio/opus" for m in audio for c in m.rtp.codecs):
        raise ApiError(400, "no_opus", "the offer's audio does not offer Opus")
    if not any(m.direction in ("sendonly", "sendrecv", None) for m in audio):
        raise ApiError(400, "no_audio", "the offer sends no audio")
    for media in description.media:
        _check_transport(media)


def _check_transport(media) -> None:
    """What aiortc would otherwise fail on later, in a task of its own, while the session holds a slot."""
    fingerprints = [f for f in media.dtls.fingerprints if _fingerprint_ok(f.algorithm, f.value)]
    if not fingerprints:
        raise ApiError(400, "bad_sdp", f"the offer's {media.kind} section has no DTLS fingerprint "
                       f"({', '.join(_FINGERPRINT_BYTES)})")
    if not media.ice.usernameFragment or not media.ice.password:
        raise ApiError(400, "bad_sdp", f"the offer's {media.kind} section has no ice-ufrag and ice-pwd")
    ports = [media.port, media.rtcp_port, media.sctp_port, *(c.port for c in media.ice_candidates),
             *(c.relatedPort for c in media.ice_candidates)]
    if any(p is not None and not 0 <= p <= 65535 for p in ports):
        raise ApiError(400, "bad_sdp", f"the offer's {media.kind} section has a port outside 0 to 65535")
    if any(not 0 <= s.ssrc <= 0xFFFFFFFF for s in media.ssrc):
        raise ApiError(400, "bad_sdp", f"the offer's {media.kind} section has an SSRC outside 32 bits")


def _fingerprint_ok(algorithm: str, value: str) -> bool:
    size = _FINGERPRINT_BYTES.get(algorithm.lower())
    octets = value.split(":")
    return size is not None and len(octets) == size and all(
        len(o) == 2 and all(c in "0123456789abcdefABCDEF" for c in o) for o in octets)
