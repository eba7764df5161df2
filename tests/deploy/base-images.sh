#!/bin/sh
# Makes the images that the Dockerfile and compose.yaml start from, out of Debian's own packages, and tags
# them with the names those files use, unless podman has them already (they stay cached between runs): no
# container registry is reachable here, and the Dockerfile and compose.yaml stay as users get them.
# Debian bookworm's Python 3.11 and coturn stand in for the official images' builds of them.
set -eu
cd "$(dirname "$0")/../.."
export CONTAINERS_CONF="${CONTAINERS_CONF:-$PWD/tests/deploy/containers.conf}"
mirror=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
mirror=${mirror:-http://deb.debian.org/debian}

qualified() {  # the name podman gives an image pulled by that reference
    case "$1" in */*/*) echo "$1" ;; */*) echo "docker.io/$1" ;; *) echo "docker.io/library/$1" ;; esac
}

# make_image NAME PACKAGES CMD
make_image() {
    name=$(qualified "$1")
    podman image exists "$name" && return 0
    echo "making $name from Debian bookworm ($2)" >&2
    mmdebstrap --quiet --variant=minbase --include="$2" \
        --customize-hook='rm -f "$1"/usr/lib/python3*/EXTERNALLY-MANAGED' bookworm - "$mirror" \
      | podman import --quiet --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
            --change "CMD $3" - "$name" >/dev/null
}

make_image "$(awk 'toupper($1) == "FROM" {print $2; exit}' Dockerfile)" \
    python3,python3-pip,python-is-python3,ca-certificates '["python3"]'
make_image "$(awk '$1 == "image:" && $2 ~ /^coturn\// {print $2; exit}' compose.yaml)" coturn '["turnserver"]'
