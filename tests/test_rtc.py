"""End to end over WebRTC: a real aiortc peer streams real speech in real time."""

from __future__ import annotations

import asyncio
import socket

import av
import numpy as np
import pytest
from aiortc import RTCPeerConnection
from aiortc.rtp import RtpPacket

from client import RTCClient, SpeechTrack, check_transcript, wait_sessions
from speech import (GAP_S, data_recording, load_devset, lost_sentences, recording, split_by_duration,
                    stereo_frame, wer, with_pauses, word_errors)


async def stream_session(server, recordings, form: str) -> tuple[RTCClient, float]:
    track = SpeechTrack(with_pauses(recordings))
    client = RTCClient(server.url, track=track)
    await client.connect(form=form)
    await client.wait_type("session.started", timeout=10)
    await client.heard_all()
    client.send({"type": "stop"})
    await client.wait_type("session.ended", timeout=15)
    await asyncio.sleep(0.3)
    await client.close()
    return client, track.speech_offset


async def test_devset_over_webrtc(server):
    recordings = load_devset()
    groups = split_by_duration(recordings, 3)
    results = await asyncio.gather(*(stream_session(server, g, form)
                                     for g, form in zip(groups, ["sdp", "json", "sdp"])))
    pairs = [check_transcript([r.event for r in client.events], group)
             for (client, _), group in zip(results, groups)]
    error_rate = wer(pairs)
    print(f"devset WER over WebRTC: {error_rate:.3f}")
    assert error_rate <= 0.12
    await wait_sessions(server.url, 0, timeout=5)


async def test_quiet_and_noisy_speakers_keep_every_sentence_over_webrtc(server):
    """One session: a loud speaker, then one recorded 40 dB quieter, one at -40 dBFS, and one in kitchen
    noise at 10 dB SNR. Silero's state must not carry the loud speaker's level over to mute the quiet one."""
    ids = ["arctic-aew-a0003", "fleurs-en-002", "quiet40-arctic-aew-a0003", "noisy10-fleurs-en-005"]
    recordings = [data_recording(i) for i in ids]
    client, offset = await stream_session(server, recordings, "sdp")
    finals = client.of_type("transcript.final")
    at = offset
    for rec in recordings:  # each recording's finals: those that end within it or its pause
        heard = " ".join(f["text"] for f in finals if at <= f["end"] < at + rec.seconds + GAP_S)
        assert not lost_sentences(rec.text, heard), (rec.id, heard)
        assert word_errors(rec.text, heard)[0] <= len(rec.text.split()) // 3, (rec.id, heard)
        at += rec.seconds + GAP_S
    assert all(f["text"] for f in finals), finals  # no empty final: every utterance had words


async def test_the_server_hands_on_each_audio_packet_when_the_next_arrives():
    """aiortc would hold every packet until four more came: 60 ms more latency on every final."""
    from rtc.peer import release_audio_promptly, rtc_configuration

    pc = RTCPeerConnection(rtc_configuration([]))  # never aiortc's default public STUN server
    try:
        receivers = [pc.addTransceiver("audio", direction="recvonly").receiver for _ in range(2)]
        assert release_audio_promptly(receivers[0])
        for receiver, released_after in zip(receivers, (1, 4)):
            buffer = receiver._RTCRtpReceiver__jitter_buffer
            out = []
            for n in range(6):
                packet = RtpPacket(payload_type=111, sequence_number=n, timestamp=960 * n)
                packet._data = bytes([n])  # the depacketized payload, as the receiver sets it
                out.append(buffer.add(packet)[1])
            first = next(i for i, frame in enumerate(out) if frame is not None)
            assert first == released_after and out[first].data == bytes([0])
    finally:
        await pc.close()


async def test_the_server_decodes_each_audio_frame_on_the_loop_as_it_leaves_the_jitter_buffer():
    """aiortc decodes in a thread per track; the crossing to it and back cost more than decoding."""
    from aiortc.codecs import get_encoder
    from aiortc.jitterbuffer import JitterFrame
    from aiortc.rtcrtpparameters import RTCRtpCodecParameters
    from aiortc.rtcrtpreceiver import RemoteStreamTrack

    from rtc.peer import decode_on_loop, rtc_configuration

    pc = RTCPeerConnection(rtc_configuration([]))
    try:
        receiver = pc.addTransceiver("audio", direction="recvonly").receiver
        receiver._track = RemoteStreamTrack(kind="audio")  # as a remote offer's track would be
        assert decode_on_loop(receiver)
        opus = RTCRtpCodecParameters(mimeType="audio/opus", clockRate=48000, channels=2, payloadType=111)
        t = np.arange(960) / 48000
        tone = (8000 * np.sin(2 * np.pi * 440 * t)).astype(np.int16).repeat(2).reshape(1, -1)
        frame = av.AudioFrame.from_ndarray(tone, format="s16", layout="stereo")
        frame.sample_rate, frame.pts = 48000, 0
        payloads, _ = get_encoder(opus).encode(frame)

        decoder = receiver._RTCRtpReceiver__decoder_queue
        decoder.put((opus, JitterFrame(data=payloads[0], timestamp=0)))
        frames = receiver.track._queue
        assert frames.qsize() == 1  # decoded within the call: no thread in between
        decoded = frames.get_nowait()
        # Straight to the pipeline's rate and layout: nothing left to resample.
        assert (decoded.sample_rate, decoded.samples, decoded.layout.name) == (16000, 320, "mono")

        decoder.put((opus, JitterFrame(data=b"", timestamp=960)))  # an empty packet: lost, nothing raised
        decoder.put((opus, JitterFrame(data=b"\xff" * 3, timestamp=1920)))  # one libopus rejects: the same
        assert frames.qsize() == 0

        # aiortc's decoder thread still starts and waits on the queue; stopping the receiver ends it.
        waiting = asyncio.get_running_loop().run_in_executor(None, decoder.get)
        decoder.put(None)
        assert await asyncio.wait_for(waiting, 2) is None
    finally:
        await pc.close()


def test_opus_is_decoded_to_16_khz_mono_as_faithfully_as_aiortc_decodes_it():
    """libopus synthesises 16 kHz itself: the same speech as aiortc's 48 kHz stereo, resampled."""
    from aiortc.codecs.opus import OpusDecoder
    from aiortc.jitterbuffer import JitterFrame

    from asr.audio import Resampler
    from rtc.opus import opus_decoder

    speech = recording("ls-61-70968-0000").audio
    encoder = av.CodecContext.create("libopus", "w")
    encoder.sample_rate, encoder.layout, encoder.format, encoder.bit_rate = 48000, "stereo", "s16", 32000
    packets = [bytes(p) for p in encoder.encode(stereo_frame(speech, 48000))]  # the encoder cuts it into 20 ms frames

    native, reference = opus_decoder(), OpusDecoder()
    assert native is not None  # PyAV's wheel bundles libopus
    ours, theirs, resampler = [], [], Resampler()
    for i, packet in enumerate(packets):
        ours += [f.to_ndarray().reshape(-1) for f in native.decode(JitterFrame(packet, 960 * i))]
        theirs += [resampler.frame(f) for f in reference.decode(JitterFrame(packet, 960 * i))]
    ours_pcm = np.concatenate(ours).astype(np.float32) / 32768
    theirs_pcm = np.concatenate(theirs)
    n = min(ours_pcm.size, theirs_pcm.size)
    assert abs(ours_pcm.size - theirs_pcm.size) <= 320 and n > 0.95 * speech.size
    assert np.corrcoef(ours_pcm[:n], theirs_pcm[:n])[0, 1] > 0.9
    with pytest.raises(ValueError):
        native.decode(JitterFrame(b"\xff" * 3, 0))  # not Opus: the loop decoder drops such a packet


def test_the_server_loop_reads_every_waiting_datagram_of_a_socket_in_one_turn():
    """Each peer's audio comes on its own UDP socket. With asyncio's loop, which reads one
    datagram per socket per turn, 32 WebRTC streams on 2 cores fell behind their sockets until the
    ICE consent checks queued behind the audio timed out and every connection closed."""
    from server import new_event_loop

    async def turns_to_read(count: int) -> int:
        loop = asyncio.get_running_loop()
        received: list[bytes] = []

        class Receiver(asyncio.DatagramProtocol):
            def datagram_received(self, data: bytes, addr) -> None:
                received.append(data)

        transport, _ = await loop.create_datagram_endpoint(Receiver, local_addr=("127.0.0.1", 0))
        sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            for n in range(count):  # into the receiving socket's buffer before the loop looks
                sender.sendto(n.to_bytes(2, "big"), transport.get_extra_info("sockname"))
            turns = 0
            while len(received) < count and turns < 2 * count:
                await asyncio.sleep(0)  # one turn of the loop
                turns += 1
        finally:
            sender.close()
            transport.close()
        assert sorted(received) == [n.to_bytes(2, "big") for n in range(count)]
        return turns

    loop = new_event_loop()
    try:
        turns = loop.run_until_complete(turns_to_read(100))
    finally:
        loop.close()
    assert turns <= 10, f"100 waiting datagrams took {turns} turns of the loop"


async def test_the_answer_asks_for_the_opus_bit_rate_and_changes_nothing_else():
    from aiortc import RTCSessionDescription
    from aiortc.mediastreams import AudioStreamTrack

    from rtc.peer import asking_opus_bitrate, rtc_configuration

    # Never aiortc's default public STUN server: both ends gather host candidates only.
    client, server = RTCPeerConnection(rtc_configuration([])), RTCPeerConnection(rtc_configuration([]))
    try:
        client.addTrack(AudioStreamTrack())
        client.createDataChannel("events")
        await client.setLocalDescription(await client.createOffer())
        await server.setRemoteDescription(client.localDescription)
        answer = (await server.createAnswer()).sdp
        asked = asking_opus_bitrate(answer, 96000)
        opus = next(line.split()[0].removeprefix("a=rtpmap:") for line in answer.splitlines() if "opus/48000" in line)
        added = [line for line in asked.splitlines() if line not in answer.splitlines()]
        assert added == [f"a=fmtp:{opus} maxaveragebitrate=96000"], asked
        assert [line for line in asked.splitlines() if line not in added] == answer.splitlines()
        await server.setLocalDescription(RTCSessionDescription(sdp=asked, type="answer"))  # aiortc takes it
    finally:
        await client.close()
        await server.close()
