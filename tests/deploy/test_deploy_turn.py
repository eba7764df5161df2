"""TURN for real: Debian's coturn on a loopback address, and a client that may only send through it."""

from __future__ import annotations

import json
import secrets
import socket
import subprocess
import time

from aiortc import RTCConfiguration, RTCIceServer
from aiortc.rtcconfiguration import RTCIceTransportPolicy

from client import HOST, RTCClient, ServerProcess, SpeechTrack, free_port
from podman import require
from speech import recording, word_errors

USER = "livestt"


def wait_udp_listening(port: int, proc: subprocess.Popen, timeout: float = 10) -> None:
    """Until a STUN Binding request to the TURN port is answered."""
    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(0.3)
        while time.monotonic() < deadline and proc.poll() is None:
            s.sendto(bytes.fromhex("000100002112a442") + secrets.token_bytes(12), (HOST, port))
            try:
                if s.recv(2048)[:2] == b"\x01\x01":
                    return
            except OSError:
                continue
    raise AssertionError(f"coturn does not answer on {HOST}:{port}")


async def test_a_relay_only_client_gets_its_transcript_through_coturn(private_network, tmp_path):
    require("turnserver")
    port, password = free_port(), secrets.token_hex(12)
    low = 49160 + port % 1000  # a relay range of its own, as compose.yaml gives coturn one
    log = open(tmp_path / "coturn.log", "w")
    coturn = subprocess.Popen(
        ["turnserver", "-n", "--no-cli", "--log-file=stdout", "--simple-log", "--no-tls", "--no-dtls",
         f"--pidfile={tmp_path}/coturn.pid", f"--userdb={tmp_path}/turndb", f"--listening-ip={HOST}",
         f"--relay-ip={HOST}",
         f"--listening-port={port}", f"--min-port={low}", f"--max-port={low + 40}",
         # Peers on loopback are refused by default; here every peer is.
         "--allow-loopback-peers", "--lt-cred-mech", "--realm=livestt", f"--user={USER}:{password}"],
        stdout=log, stderr=subprocess.STDOUT)
    server = None
    try:
        wait_udp_listening(port, coturn)
        turn = {"urls": f"turn:{HOST}:{port}", "username": USER, "credential": password}
        # The server gets the TURN server as the docs set it (STT_ICE_SERVERS).
        server = ServerProcess(env={"STT_ICE_SERVERS": json.dumps([turn])})
        speech = recording("ls-61-70968-0000")
        relay_only = RTCConfiguration(iceServers=[RTCIceServer(**turn)],
                                      iceTransportPolicy=RTCIceTransportPolicy.RELAY)
        client = RTCClient(server.url, track=SpeechTrack(speech.audio), configuration=relay_only)
        try:
            await client.connect()
            candidates = [line for line in client.pc.localDescription.sdp.splitlines()
                          if line.startswith("a=candidate:")]
            # Only coturn's relay addresses: the media can reach the server by no other way.
            assert candidates and all(" typ relay" in c for c in candidates), candidates
            await client.heard_all(timeout=30)
        finally:
            await client.close()
        text = " ".join(e["text"] for e in client.of_type("transcript.final"))
        errors, words = word_errors(speech.text, text)
        assert errors / words < 0.3, (speech.text, text)
    finally:
        if server is not None:
            assert server.stop() == 0
        coturn.terminate()
        coturn.wait(10)
        log.close()
