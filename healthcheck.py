"""The container's health probe: exit 0 when the server on this machine answers GET /health.

Standard library only: the slim image has no curl. It follows the server's own settings as the
environment gives them (STT_HOST, STT_PORT, STT_CERTFILE, STT_SELF_SIGNED), so in a container set
those as environment variables, not flags, or the probe looks at the default address.
"""

from __future__ import annotations

import json
import os
import ssl
import sys
import urllib.request
from typing import Mapping

TIMEOUT_S = 4.0


def health_url(environ: Mapping[str, str] = os.environ) -> str:
    host = environ.get("STT_HOST", "").strip() or "127.0.0.1"
    if host == "0.0.0.0":  # listening everywhere: loopback reaches it
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host:
        host = f"[{host}]"
    port = environ.get("STT_PORT", "").strip() or "8000"
    tls = bool(environ.get("STT_CERTFILE", "").strip()) or (
        environ.get("STT_SELF_SIGNED", "").strip().lower() in ("1", "true", "yes", "on"))
    return f"{'https' if tls else 'http'}://{host}:{port}/health"


def probe(url: str, timeout_s: float = TIMEOUT_S) -> str | None:
    """None when healthy, else why not."""
    # The probe asks whether the server answers, not whether its certificate names 127.0.0.1;
    # and it never goes through an HTTP proxy that the environment may name.
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}),
                                         urllib.request.HTTPSHandler(context=context))
    try:
        with opener.open(url, timeout=timeout_s) as response:
            body = json.loads(response.read())
    except (OSError, ValueError) as e:  # refused, timed out, HTTP error status, not JSON
        return f"{url}: {e}"
    if not isinstance(body, dict) or body.get("status") != "ok":
        return f"{url}: answered {body!r}"
    return None


def main() -> int:
    url = health_url()
    problem = probe(url)
    if problem:
        print(f"unhealthy: {problem}", file=sys.stderr)
        return 1
    print(f"healthy: {url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
