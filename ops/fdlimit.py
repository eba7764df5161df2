"""The process's open-file limit: raised to its hard limit at startup, and checked against what the
configured connections and sessions need (docs/operations.md, "Limits a deployment relies on")."""

from __future__ import annotations

import logging

from aioice.ice import get_host_addresses

from config import Config

log = logging.getLogger(__name__)

# The process itself: listening sockets, the event loop's, model and log files, quick requests
# (/health, /metrics), with room to spare.
BASE_FDS = 64


def session_fds(config: Config) -> int:
    """Descriptors one session may hold: a UDP socket per local address that ICE gathers on, one
    for a TURN relay, its transcript file (and audio file), its WebSocket or signaling request,
    and one SSE watcher."""
    addresses = len(get_host_addresses(use_ipv4=True, use_ipv6=True))
    urls = [u for server in config.ice_servers
            for u in ([server["urls"]] if isinstance(server["urls"], str) else server["urls"])]
    turn = any(u.startswith("turn") for u in urls)
    return max(addresses, 1) + turn + 1 + config.record_audio + 2


def needed(config: Config) -> int:
    return BASE_FDS + config.max_pending_connections + config.max_sessions * session_fds(config)


def raise_limit(config: Config) -> None:
    """The soft limit goes up to the hard one (a process may do so unprivileged); a warning says
    when that is still short of what the settings need, since then a full server fails accepts."""
    try:
        import resource
    except ImportError:  # not a Unix: no such limit to manage
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            log.info("open-file limit raised from %d to %d", soft, hard)
            soft = hard
        except (ValueError, OSError) as e:  # an unlimited hard limit that the kernel caps lower
            log.info("open-file limit stays at %d: %s", soft, e)
    need = needed(config)
    if soft != resource.RLIM_INFINITY and soft < need:
        log.warning("the open-file limit is %d, below the %d that --max-pending-connections %d and "
                    "--max-sessions %d need (%d per session): raise it (ulimit -n, systemd LimitNOFILE=, "
                    "docker --ulimit nofile=)", soft, need, config.max_pending_connections,
                    config.max_sessions, session_fds(config))
