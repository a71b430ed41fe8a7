#!/usr/bin/env bash
# Build Horde's job images: horde/base:latest, then every deploy/images/<name>/Dockerfile on top of it
# as horde/<name>:latest.
#
# The Debian root comes from a registry image when one can be pulled; otherwise a bookworm rootfs is
# bootstrapped locally with mmdebstrap and imported, so the images build on hosts with no registry.
#
# Environment:
#   HORDE_REBUILD=1        rebuild the horde/* images even when they exist
#   HORDE_REBUILD_ROOTFS=1 also bootstrap the local Debian rootfs again (slow)
#   HORDE_DEBIAN_BASE=ref  use this (local) image as the Debian root and skip the detection below
#   HORDE_DEBIAN_MIRROR=u  Debian mirror URL for mmdebstrap (default: mmdebstrap's own choice)
#   HORDE_PULL_TIMEOUT=s   seconds to wait for the registry pull (default 20)
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REBUILD="${HORDE_REBUILD:-0}"
REBUILD_ROOTFS="${HORDE_REBUILD_ROOTFS:-0}"
PULL_TIMEOUT="${HORDE_PULL_TIMEOUT:-20}"
REGISTRY_BASE="debian:bookworm-slim"
LOCAL_BASE="horde/debian-local:bookworm"
BASE_IMAGE="horde/base:latest"

say() { printf '[build.sh] %s\n' "$*" >&2; }

image_exists() { docker image inspect "$1" >/dev/null 2>&1; }

# A digest of a build context (every file's path and content) plus extra inputs ($2...), so an
# image is rebuilt exactly when what it is built from changed.
context_hash() {
    local dir="$1"
    shift
    {
        (cd "$dir" && find . -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum)
        printf '%s\n' "$@"
    } | sha256sum | cut -d' ' -f1
}

built_hash() {
    docker image inspect --format '{{ index .Config.Labels "io.horde.context-hash" }}' "$1" \
        2>/dev/null || true
}

# True when image $1 should be (re)built for context hash $2.
needs_build() {
    if [[ "$REBUILD" == "1" ]] || ! image_exists "$1"; then
        return 0
    fi
    if [[ "$(built_hash "$1")" != "$2" ]]; then
        say "$1 is out of date with its build context, rebuilding"
        return 0
    fi
    say "$1 is up to date (HORDE_REBUILD=1 to rebuild anyway)"
    return 1
}

build_local_rootfs() {
    if image_exists "$LOCAL_BASE" && [[ "$REBUILD_ROOTFS" != "1" ]]; then
        say "$LOCAL_BASE exists, reusing it"
        return 0
    fi
    command -v mmdebstrap >/dev/null 2>&1 || {
        say "error: no registry base and mmdebstrap is not installed (apt-get install mmdebstrap)"
        return 1
    }
    local tarball
    tarball="$(mktemp "${TMPDIR:-/tmp}/horde-rootfs.XXXXXX.tar")"
    # Stage through a file: piping straight into `docker import` would import a truncated rootfs
    # if mmdebstrap failed half-way.
    say "bootstrapping a Debian bookworm rootfs with mmdebstrap (a few minutes)"
    local mirror=()
    if [[ -n "${HORDE_DEBIAN_MIRROR:-}" ]]; then
        mirror=("$HORDE_DEBIAN_MIRROR")
    fi
    local rc=0
    mmdebstrap --quiet --variant=apt --include=python3-minimal,python3 \
        --aptopt='Acquire::Retries "3"' \
        bookworm "$tarball" "${mirror[@]}" || rc=$?
    if [[ $rc -eq 0 ]]; then
        say "importing rootfs as $LOCAL_BASE"
        docker import \
            --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
            --change 'CMD ["/bin/bash"]' \
            "$tarball" "$LOCAL_BASE" >/dev/null || rc=$?
    fi
    rm -f "$tarball"
    return "$rc"
}

# Prints the Debian root image to build horde/base on.
pick_debian_base() {
    if [[ -n "${HORDE_DEBIAN_BASE:-}" ]]; then
        echo "$HORDE_DEBIAN_BASE"
        return 0
    fi
    if image_exists "$LOCAL_BASE" && [[ "$REBUILD_ROOTFS" != "1" ]]; then
        echo "$LOCAL_BASE"
        return 0
    fi
    if image_exists "$REGISTRY_BASE" && [[ "$REBUILD_ROOTFS" != "1" ]]; then
        echo "$REGISTRY_BASE"
        return 0
    fi
    say "trying to pull $REGISTRY_BASE (timeout ${PULL_TIMEOUT}s)"
    if timeout "$PULL_TIMEOUT" docker pull --quiet "$REGISTRY_BASE" >/dev/null 2>&1; then
        echo "$REGISTRY_BASE"
        return 0
    fi
    say "pull failed; falling back to a locally bootstrapped rootfs"
    build_local_rootfs >&2
    echo "$LOCAL_BASE"
}

docker_build() {
    local tag="$1" context="$2"
    shift 2
    say "building $tag from $context"
    # --pull=false: never contact a registry for a FROM image that is already local.
    # Output is kept for failures only (the CLI also prints a builder deprecation notice).
    local output
    if ! output="$(docker build --pull=false --tag "$tag" "$@" "$context" 2>&1)"; then
        printf '%s\n' "$output" >&2
        say "error: building $tag failed"
        return 1
    fi
}

command -v docker >/dev/null 2>&1 || { say "error: docker CLI not found"; exit 1; }

base_hash="$(context_hash "$HERE/base")"
if needs_build "$BASE_IMAGE" "$base_hash"; then
    debian_base="$(pick_debian_base)"
    docker_build "$BASE_IMAGE" "$HERE/base" --build-arg "DEBIAN_BASE=$debian_base" \
        --label "io.horde.context-hash=$base_hash"
fi
base_id="$(docker image inspect --format '{{.Id}}' "$BASE_IMAGE")"

# Images built on horde/base first, then those built on another Horde image (their Dockerfile
# names it, e.g. `ARG LLM=horde/demo-llm:latest`), so every parent exists and is current.
ordered=()
for pass in first second; do
    for dockerfile in "$HERE"/*/Dockerfile; do
        name="$(basename "$(dirname "$dockerfile")")"
        [[ "$name" == "base" ]] && continue
        if grep -Eq 'horde/[a-z0-9-]+:' "$dockerfile" && ! grep -q 'horde/base:' "$dockerfile"; then
            [[ "$pass" == "second" ]] && ordered+=("$dockerfile")
        else
            [[ "$pass" == "first" ]] && ordered+=("$dockerfile")
        fi
    done
done

for dockerfile in "${ordered[@]}"; do
    dir="$(dirname "$dockerfile")"
    name="$(basename "$dir")"
    tag="horde/$name:latest"
    # Derived images also depend on the exact images they are built on.
    parents=("$base_id")
    for parent in $(grep -Eo 'horde/[a-z0-9-]+:[a-z0-9.-]+' "$dockerfile" | sort -u); do
        parents+=("$(docker image inspect --format '{{.Id}}' "$parent" 2>/dev/null || echo "$parent")")
    done
    hash="$(context_hash "$dir" "${parents[@]}")"
    if needs_build "$tag" "$hash"; then
        docker_build "$tag" "$dir" --build-arg "BASE=$BASE_IMAGE" --label "io.horde.context-hash=$hash"
    fi
done

say "done"
