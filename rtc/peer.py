"""The server's end of one WebRTC session: audio track in, events out on the data channel."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Any, Callable, Protocol

import numpy as np

from aiortc import RTCConfiguration, RTCDataChannel, RTCIceServer, RTCPeerConnection, RTCRtpReceiver
from aiortc.codecs import get_decoder
from aiortc.codecs.base import Decoder
from aiortc.jitterbuffer import JitterBuffer, JitterFrame
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from aiortc.rtcrtpparameters import RTCRtpCodecParameters
from aiortc.sdp import SessionDescription

from ops import metrics
import protocol
from asr.audio import SAMPLE_RATE, Resampler
from protocol import Event
from sessions import Session

from .opus import opus_decoder

log = logging.getLogger(__name__)

_FLUSH_TIMEOUT_S = 2.0
_MAX_UNSENT = 1 << 20  # bytes of events the peer may leave unacknowledged before its session ends
# A peer that sends no audio for this long sends silence: its file has ended (aiortc's MediaPlayer goes
# quiet and sends no BYE), or it sends nothing while nobody speaks (Opus DTX). The time is heard as
# silence, so an utterance in progress ends at its endpoint as if the speaker had paused...
_GAP_S = 0.25
_GAP_CHECK_S = 0.1
# ... up to this much beyond the endpoint: past it, a peer that still sends nothing is left to the
# idle timeout.
_GAP_FILL_BEYOND_S = 1.5


def rtc_configuration(ice_servers: list[dict[str, Any]]) -> RTCConfiguration:
    # Always explicit: with no configuration aiortc would ask Google's public STUN server.
    return RTCConfiguration(iceServers=[
        RTCIceServer(urls=s["urls"], username=s.get("username"), credential=s.get("credential"))
        for s in ice_servers
    ])


def asking_opus_bitrate(sdp: str, bitrate: int) -> str:
    """`sdp`, an answer, asking the peer to send Opus at `bitrate` bit/s on average (RFC 7587's
    `maxaveragebitrate`, which a browser's encoder takes as its target).

    Unasked, browsers send 32 kbit/s, and Whisper misses more words in Opus coded that thinly
    (docs/accuracy.md). aiortc offers no setting for a codec's parameters in its answers."""
    description = SessionDescription.parse(sdp)
    for media in (m for m in description.media if m.kind == "audio"):
        for codec in media.rtp.codecs:
            if codec.mimeType.lower() == "audio/opus":
                codec.parameters["maxaveragebitrate"] = bitrate
    return str(description)


def release_audio_promptly(receiver: RTCRtpReceiver) -> bool:
    """Frames leave the receiver's jitter buffer as soon as they are whole, not four packets later.

    aiortc holds each audio packet until four more have come, to smooth playback. Nothing is played
    here, so that wait would only add to every final's latency. Lost or late packets are still waited
    for as before. aiortc offers no setting for it, so its private buffer is replaced;
    if a newer aiortc moves it, audio keeps working with the old delay. Call before RTP flows.
    """
    name = "_RTCRtpReceiver__jitter_buffer"
    buffer = getattr(receiver, name, None)
    if not isinstance(buffer, JitterBuffer):
        log.warning("aiortc's audio jitter buffer not found: audio arrives four packets later than it could")
        return False
    setattr(receiver, name, JitterBuffer(capacity=buffer.capacity, prefetch=1))
    return True


class _LoopDecoder:
    """Stands in for the queue that feeds aiortc's decoder thread: each frame is decoded on the loop,
    as it leaves the jitter buffer, and goes straight to the track.

    aiortc decodes in a thread per track, and each frame crosses to that thread and back to the loop
    through `run_coroutine_threadsafe`. That crossing costs more than the decoding, and a thread per
    stream contending for the GIL slows the loop's own work too (docs/performance.md).
    """

    def __init__(self, frames: asyncio.Queue) -> None:
        self._frames = frames
        self._decoder: Decoder | None = None
        self._codec: str | None = None
        self._ended = threading.Event()

    def put(self, item: tuple[RTCRtpCodecParameters, JitterFrame] | None) -> None:
        if item is None:  # the receiver stops: aiortc's thread wakes and ends the track
            self._ended.set()
            return
        codec, encoded = item
        if self._decoder is None or codec.name != self._codec:
            native = opus_decoder() if codec.mimeType.lower() == "audio/opus" else None
            self._decoder, self._codec = native or get_decoder(codec), codec.name
        try:
            frames = self._decoder.decode(encoded)
        except Exception as e:  # a corrupt packet is lost audio, never a lost session or loop
            log.debug("could not decode a %s frame: %s", codec.name, e)
            return
        for frame in frames:
            self._frames.put_nowait(frame)

    def get(self) -> None:
        """aiortc's decoder thread still starts; it waits here, idle, and ends the track on None."""
        self._ended.wait()
        return None


def decode_on_loop(receiver: RTCRtpReceiver) -> bool:
    """Audio is decoded on the event loop, not in a thread per track. Call before the receiver starts
    (aiortc fires "track" before it does). If a newer aiortc moves what this replaces, the server logs
    a warning and audio is decoded in aiortc's threads as before."""
    frames = getattr(receiver.track, "_queue", None)
    if (not hasattr(receiver, "_RTCRtpReceiver__decoder_queue") or not isinstance(frames, asyncio.Queue)
            or getattr(receiver, "_RTCRtpReceiver__decoder_thread", True) is not None):
        log.warning("aiortc's decoder queue not found: audio is decoded in a thread per track")
        return False
    setattr(receiver, "_RTCRtpReceiver__decoder_queue", _LoopDecoder(frames))
    return True


class ChannelProtocol(Protocol):
    """What the data channel speaks: our protocol (NativeChannel), or a vendor's (adapters/)."""

    def opening(self) -> list[str]:
        """What the client hears first, once its channel opens."""

    def encode(self, item: Event) -> list[str]:
        """The messages one of the session's events (or an item the protocol posted) becomes."""

    def receive(self, message: str | bytes) -> None:
        """A message from the client."""


Post = Callable[[Event], None]  # an item to encode and send, in order with the session's events


class NativeChannel:
    """Our protocol: every event as it is, and the client's stop."""

    def __init__(self, session: Session, post: Post) -> None:
        self.session, self.post = session, post

    def opening(self) -> list[str]:
        return [protocol.encode(self.session.started_event())]

    def encode(self, item: Event) -> list[str]:
        return [protocol.encode(item)]

    def receive(self, message: str | bytes) -> None:
        try:
            protocol.channel_message(message)  # Stop, the one message a data channel carries
        except protocol.ClientError as e:
            metrics.error("event", e.code)
            self.post(protocol.error(e.code, e.message))
            return
        self.session.end_soon("stop")


class PeerSession:
    """Binds a session to its RTCPeerConnection; the session's lifecycle rules."""

    def __init__(self, session: Session, ice_servers: list[dict[str, Any]], ice_timeout_s: float,
                 speaks: Callable[[Session, Post], ChannelProtocol] = NativeChannel, opus_bitrate: int = 0):
        self.session = session
        self._opus_bitrate = opus_bitrate
        self.pc = RTCPeerConnection(rtc_configuration(ice_servers))
        self.channel: RTCDataChannel | None = None
        self._speaks = speaks
        self.protocol: ChannelProtocol | None = None
        self._track: MediaStreamTrack | None = None  # the one audio track transcribed
        self._deaf = False  # the peer stopped acknowledging events
        self._reader: asyncio.Task | None = None
        self._gaps: asyncio.Task | None = None
        self._heard = 0.0  # when the last frame came (monotonic); 0: none yet
        self._filled = 0.0  # seconds of silence fed since then
        self._ice_timer = asyncio.create_task(self._ice_deadline(ice_timeout_s))
        session.on_close(self.close)
        self.pc.on("datachannel", self._on_datachannel)
        self.pc.on("track", self._on_track)
        self.pc.on("connectionstatechange", self._on_state)

    async def answer(self, offer_sdp: str) -> str:
        from aiortc import RTCSessionDescription

        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=offer_sdp, type="offer"))
        self._refuse_unread_tracks()
        answer = await self.pc.createAnswer()
        if self._opus_bitrate:
            answer = RTCSessionDescription(sdp=asking_opus_bitrate(answer.sdp, self._opus_bitrate), type="answer")
        await self.pc.setLocalDescription(answer)
        # aiortc gathers every candidate inside setLocalDescription: the answer is complete.
        return self.pc.localDescription.sdp

    def _refuse_unread_tracks(self) -> None:
        """The answer refuses (a=inactive) every media track but the audio that is read, so their
        packets are never decoded or queued: an offer of many tracks costs what one costs."""
        for transceiver in self.pc.getTransceivers():
            if self._track is None or transceiver.receiver.track is not self._track:
                transceiver.direction = "inactive"

    def _on_datachannel(self, channel: RTCDataChannel) -> None:
        if self.channel is not None:
            return  # the first channel the client opens carries the events
        self.channel = channel
        self.protocol = self._speaks(self.session, self._send)
        channel.on("message", self.protocol.receive)
        channel.on("close", lambda: self.session.end_soon("peer_closed"))
        for text in self.protocol.opening():
            self._send_text(text)
        self.session.add_sink(self._send, replay=True)

    def _on_track(self, track: MediaStreamTrack) -> None:
        if track.kind == "audio" and self._track is None:
            # aiortc fires "track" inside setRemoteDescription, before any RTP can arrive.
            self._track = track
            for transceiver in self.pc.getTransceivers():
                if transceiver.receiver.track is track:
                    release_audio_promptly(transceiver.receiver)
                    decode_on_loop(transceiver.receiver)
            self._reader = asyncio.create_task(self._read(track))
            self._gaps = asyncio.create_task(self._fill_gaps())

    async def _on_state(self) -> None:
        state = self.pc.connectionState
        if state == "connected":
            self._ice_timer.cancel()
        elif state in ("failed", "closed"):
            self.session.end_soon("connection_failed" if state == "failed" else "peer_closed")

    async def _ice_deadline(self, timeout: float) -> None:
        await asyncio.sleep(timeout)
        if self.pc.connectionState != "connected":
            self.session.end_soon("ice_timeout")

    async def _read(self, track: MediaStreamTrack) -> None:
        resampler = Resampler()
        try:
            while True:
                frame = await track.recv()  # promptly: aiortc queues unread frames without bound
                self._heard, self._filled = time.monotonic(), 0.0
                self.session.feed(resampler.frame(frame))
        except MediaStreamError:
            self.session.feed(resampler.frame(None))
            self.session.end_soon("peer_closed")

    async def _fill_gaps(self) -> None:
        """The time a peer sends nothing, as silence (_GAP_S)."""
        while True:
            await asyncio.sleep(_GAP_CHECK_S)
            if not self._heard:
                continue
            limit = self.session.options.endpoint_ms / 1000 + _GAP_FILL_BEYOND_S
            silent = min(time.monotonic() - self._heard, limit)
            if silent >= _GAP_S and silent - self._filled >= _GAP_CHECK_S / 2:
                self.session.feed(np.zeros(int((silent - self._filled) * SAMPLE_RATE), np.float32))
                self._filled = silent

    def _send(self, event: Event) -> None:
        if self.protocol is None:
            return
        for text in self.protocol.encode(event):
            self._send_text(text)

    def _send_text(self, text: str) -> None:
        if self.channel is None or self.channel.readyState != "open":
            return
        if self.channel.bufferedAmount > _MAX_UNSENT:
            # The peer acknowledges nothing: its events would queue without end.
            if not self._deaf:
                self._deaf = True
                log.info("session %s: the peer takes no events; ending it", self.session.id)
                self.session.end_soon("not_reading")
            return
        self.channel.send(text)

    async def close(self) -> None:
        self._ice_timer.cancel()
        await self._flush()
        for task in (self._reader, self._gaps):
            if task is not None:
                task.cancel()
        await self.pc.close()

    async def _flush(self) -> None:
        """Let the last events reach the client before the association is torn down."""
        if self.channel is None or self.channel.readyState != "open":
            return
        sctp = self.pc.sctp
        loop = asyncio.get_running_loop()
        deadline = loop.time() + _FLUSH_TIMEOUT_S
        while loop.time() < deadline:
            # aiortc exposes no "all acknowledged" signal; its queues are the ground truth.
            pending = self.channel.bufferedAmount or (sctp is not None and (
                getattr(sctp, "_data_channel_queue", None) or getattr(sctp, "_outbound_queue", None)
                or getattr(sctp, "_sent_queue", None)))
            if not pending:
                return
            await asyncio.sleep(0.02)

