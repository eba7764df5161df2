"""The image built from the project's Dockerfile, run by podman: what a user of `docker run` gets."""

from __future__ import annotations

import asyncio
import contextlib
import json

from client import HOST, WSClient, free_port, say_over_ws
from podman import podman, wait_ready
from speech import pcm16, recording, word_errors


@contextlib.contextmanager
def container(image: str, *env: str):
    """The image on the host's network (WebRTC needs it), as the Dockerfile's header runs it."""
    port = free_port()
    name = f"livestt-test-{port}"
    podman("run", "-d", "--name", name, "--network", "host",
           "-e", f"STT_HOST={HOST}", "-e", f"STT_PORT={port}", *(a for e in env for a in ("-e", e)), image)
    try:
        url = f"http://{HOST}:{port}"
        wait_ready(url, container=name)
        yield name, url
    finally:
        podman("rm", "-f", "-t", "0", name, check=False)


def state(name: str) -> dict:
    return json.loads(podman("inspect", "--format", "{{json .State}}", name).stdout)


async def test_container_serves_a_transcript_as_a_non_root_user_and_is_healthy(private_network, image):
    speech = recording("ls-61-70968-0000")
    with container(image) as (name, url):
        # The server is PID 1 of the container, and runs as the image's user, not root.
        assert podman("exec", name, "stat", "-c", "%u:%g", "/proc/1").stdout.strip() == "10001:10001"
        assert "server.py" in podman("exec", name, "cat", "/proc/1/cmdline").stdout

        # The image's own HEALTHCHECK (kept by --format docker) runs and passes.
        check = json.loads(podman("inspect", "--format", "{{json .Config.Healthcheck}}", name).stdout)
        assert check["Test"][-1] == "/app/healthcheck.py", check
        podman("healthcheck", "run", name)
        assert state(name)["Health"]["Status"] == "healthy"

        client = await say_over_ws(url, pcm16(speech.audio))
        text = " ".join(e["text"] for e in client.of_type("transcript.final"))
        errors, words = word_errors(speech.text, text)
        assert errors / words < 0.3, (speech.text, text)
        assert client.of_type("session.saved"), client.events


async def test_sigterm_delivers_the_final_of_speech_in_flight(private_network, image):
    long = recording("ls-1221-135766-0001")  # 16.7 s of nearly unbroken speech
    with container(image) as (name, url):
        client = WSClient(url)
        try:
            await client.connect()
            speaking = asyncio.create_task(client.speak(pcm16(long.audio)))
            partial = await client.wait_type("transcript.partial", timeout=20)
            assert not client.of_type("transcript.final")
            # `podman stop` sends the image's STOPSIGNAL (SIGTERM), with the grace the docs give.
            stop = asyncio.create_task(asyncio.to_thread(podman, "stop", "-t", "30", name, timeout=60))
            final = (await client.wait_for(lambda e: e["type"] == "transcript.final"
                                           and e["utterance"] == partial["utterance"], timeout=25)).event
            assert final["text"].strip(), final
            ended = await client.wait_type("session.ended", timeout=25)
            assert ended["reason"] == "shutdown"
            assert await client.closed(timeout=10) == 1001
            speaking.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await speaking
            await stop
        finally:
            await client.close()
        stopped = state(name)
        assert stopped["Status"] == "exited" and stopped["ExitCode"] == 0, stopped
    print(f"\nfinal at SIGTERM: {final['text']!r}")
