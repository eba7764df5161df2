#!/bin/sh
# Runs a command inside a private network namespace, so that test traffic never leaves it:
# loopback up with 127.0.0.2 (aioice never gathers 127.0.0.1) and a veth pair with a private
# address (Chromium ignores loopback candidates). Needs root or user namespaces.
set -e
exec unshare -n sh -c '
  ip link set lo up &&
  ip addr add 127.0.0.2/8 dev lo &&
  ip link add v0 type veth peer name v1 &&
  ip addr add 10.77.0.1/24 dev v0 &&
  ip link set v0 up && ip link set v1 up &&
  export STT_TEST_NETNS=1 &&
  exec "$@"' netns "$@"
