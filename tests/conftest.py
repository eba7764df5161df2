from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from client import ServerProcess  # noqa: E402

_PRIVATE_LINKS = {"lo", "v0", "v1"}


@pytest.fixture(scope="session")
def private_network() -> None:
    """WebRTC tests send UDP between peers: only inside the namespace tests/netns.sh makes."""
    links = {name for _, name in socket.if_nameindex()}
    if links <= _PRIVATE_LINKS:
        return
    message = ("WebRTC tests must run in a private network namespace (run `make test`, "
               f"or tests/netns.sh pytest); this one has {sorted(links)}")
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="session")
def server(private_network):
    """The server as the README starts it, with short timeouts so lifecycle tests stay quick."""
    proc = ServerProcess("--max-sessions", "6", "--idle-timeout-s", "6", "--ice-timeout-s", "5")
    yield proc
    assert proc.stop() == 0, proc.log()
