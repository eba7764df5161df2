"""compose.yaml, unchanged, run by podman-compose: the server, and coturn behind the `turn` profile."""

from __future__ import annotations

import secrets
import socket
import subprocess
import sys

from client import HOST, free_port, say_over_ws
from podman import ENV, ROOT, podman, require, wait_ready
from speech import pcm16, recording, word_errors

STUN_BINDING = bytes.fromhex("0001 0000 2112a442".replace(" ", ""))  # a request, no attributes, the cookie


def compose(env: dict[str, str], *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "podman_compose", "-f", str(ROOT / "compose.yaml"), "--profile", "turn", *args]
    result = subprocess.run(command, env={**ENV, **env}, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(args)}: exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result


def stun_binding(host: str, port: int) -> bytes:
    """A STUN Binding request over UDP; the answer's first bytes (0x0101: a success response)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(2)
        for _ in range(10):
            s.sendto(STUN_BINDING + secrets.token_bytes(12), (host, port))
            try:
                return s.recv(2048)
            except (TimeoutError, ConnectionRefusedError):
                continue
    raise AssertionError(f"no STUN answer from {host}:{port}")


async def test_compose_runs_the_server_and_coturn(private_network, image):
    require("podman")
    port = free_port()
    # compose.yaml's own variables, as a `.env` would set them; the project name is its `name:`.
    env = {"STT_HOST": HOST, "STT_PORT": str(port), "TURN_PASSWORD": secrets.token_hex(8), "TURN_REALM": "test"}
    compose(env, "down", "-v", "-t", "0")  # what an interrupted run may have left
    compose(env, "up", "-d")
    try:
        running = podman("ps", "--filter", "label=io.podman.compose.project=livestt",
                         "--format", "{{.Names}} {{.Image}}").stdout
        assert "livestt:local" in running and "coturn/coturn" in running, running
        wait_ready(f"http://{HOST}:{port}", container="livestt_stt_1")
        assert stun_binding(HOST, 3478)[:2] == b"\x01\x01"

        speech = recording("ls-61-70968-0000")
        client = await say_over_ws(f"http://{HOST}:{port}", pcm16(speech.audio))
        text = " ".join(e["text"] for e in client.of_type("transcript.final"))
        errors, words = word_errors(speech.text, text)
        assert errors / words < 0.3, (speech.text, text)
        # The named volume keeps the session: compose's STT_DATA_DIR is /data, whatever the host says.
        listed = podman("exec", "livestt_stt_1", "ls", "/data").stdout
        assert any(line.endswith(client.of_type("session.started")[0]["session_id"]) for line in listed.split())
    finally:
        compose(env, "down", "-v")
