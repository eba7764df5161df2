from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

# As server.py: one OpenBLAS thread, before anything imports numpy. The in-process engine tests
# (decode niceness among them) measure the engine as the server runs it.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from client import ServerProcess  # noqa: E402

_PRIVATE_LINKS = {"lo", "v0", "v1"}
_LOG_TAIL = 60  # lines of each server's log in a failed test's report


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """A failed test shows what its servers logged: a rare failure in CI may not come back."""
    report = yield
    if report.failed:
        for proc in ServerProcess.running:
            try:
                tail = proc.log().splitlines()[-_LOG_TAIL:]
            except OSError:
                continue
            report.sections.append((f"server on port {proc.port} (last {len(tail)} lines)", "\n".join(tail)))
    return report


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


@pytest.fixture(scope="session", autouse=True)
def data_outside_the_repository(tmp_path_factory):
    """Every server a test starts saves its sessions in a temporary folder, never in ./data."""
    saved = os.environ.get("STT_DATA_DIR")
    os.environ["STT_DATA_DIR"] = str(tmp_path_factory.mktemp("stt-data"))
    yield
    if saved is None:
        del os.environ["STT_DATA_DIR"]
    else:
        os.environ["STT_DATA_DIR"] = saved


@pytest.fixture(scope="session")
def server(private_network, tmp_path_factory):
    """The server as the README starts it, with short timeouts so lifecycle tests stay quick."""
    proc = ServerProcess("--max-sessions", "6", "--idle-timeout-s", "6", "--ice-timeout-s", "5",
                         "--data-dir", str(tmp_path_factory.mktemp("server-data")))
    yield proc
    assert proc.stop() == 0, proc.log()


@pytest.fixture(scope="session")
def chromium():
    """Debian's Chromium, which `make test-deps` installs; never Playwright's own download."""
    from client import CHROMIUM

    if CHROMIUM.is_file():
        return CHROMIUM
    message = f"Debian's Chromium is missing at {CHROMIUM} (`make test-deps` installs it)"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)
