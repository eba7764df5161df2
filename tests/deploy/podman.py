"""podman as the deployment tests drive it: the project's image built from its own Dockerfile, and containers."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
IMAGE = "localhost/livestt:local"  # compose.yaml's `image: livestt:local`, as podman names it
# runc and the open-file limits this machine allows (containers.conf says why).
ENV = {**os.environ, "CONTAINERS_CONF": str(HERE / "containers.conf")}


def require(*tools: str) -> None:
    """Skips where a tool is missing; under CI, where `make test-deploy` installs them, fails."""
    missing = [t for t in tools if shutil.which(t) is None and not Path(t).exists()]
    if missing:
        message = f"missing {missing} (`make deploy-deps` installs them)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)


def podman(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["podman", *args], env=ENV, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)}: exit {result.returncode}\n{result.stderr}")
    return result


def build_image() -> float:
    """Builds IMAGE from the Dockerfile; the seconds it took. The base images and the pip layer stay cached."""
    require("podman", "mmdebstrap")
    started = time.monotonic()
    subprocess.run([str(HERE / "base-images.sh")], env=ENV, check=True, timeout=900)
    # --format docker keeps HEALTHCHECK; the host's CA bundle lets pip trust the index as the host does.
    podman("build", "--format", "docker", "--pull=never", "--network=host",
           "-v", "/etc/ssl/certs/ca-certificates.crt:/etc/ssl/certs/ca-certificates.crt:ro",
           "-t", IMAGE, str(ROOT), timeout=900)
    return time.monotonic() - started


def wait_ready(url: str, timeout: float = 90, container: str | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + "/ready", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    logs = podman("logs", container, check=False).stderr if container else ""
    raise AssertionError(f"{url} never became ready\n{logs}")


if __name__ == "__main__":
    # `make test-deploy` builds here first, outside the tests' network namespace, where pip and the
    # Debian mirror can be reached; the tests' own build then finds every layer cached.
    print(f"image {IMAGE} built in {build_image():.0f} s")
