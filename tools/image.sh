#!/usr/bin/env bash
# `make image` / `make image-gpu`: the service as a container image, with BentoML's own
# `bentoml containerize`, holding one store model (MODEL, default the demo's).
#   tools/image.sh cpu|gpu
# docker where a Docker engine answers, else podman (with deploy/podman/containers.conf unless
# CONTAINERS_CONF names another). Where python:3.11-slim cannot be pulled (no registry reachable),
# the base is made locally from Debian's packages (tools/make_base_image.sh), trusting the
# certificates this host trusts, so the build reaches the package registry the way the host does.
set -euo pipefail
cd "$(dirname "$0")/.."
KIND=${1:-cpu}
BIN=${BIN:-.venv/bin}
MODEL=${MODEL:-extendserve-default:latest}
# MODEL goes into commands: a store tag only (NAME:VERSION), never a word a shell would read
if ! printf '%s' "$MODEL" | grep -Eq '^[a-z0-9]([a-z0-9._-]*[a-z0-9])?(:[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?)?$'; then
    printf 'MODEL=%q is not a model store tag such as extendserve-default:latest (bentoml models list)\n' "$MODEL" >&2
    exit 2
fi
TAG=${TAG:-extendserve:$KIND}
case "$KIND" in
    cpu) BENTOFILE=bentofile.cpu.yaml ;;
    gpu) BENTOFILE=bentofile.yaml ;;
    *) echo "usage: tools/image.sh cpu|gpu" >&2; exit 2 ;;
esac
if [ -n "${ENGINE:-}" ]; then :
elif command -v docker >/dev/null && docker info >/dev/null 2>&1; then ENGINE=docker
elif command -v podman >/dev/null; then ENGINE=podman
else
    echo "no container engine: install docker, or podman (apt-get install podman runc)" >&2; exit 2
fi
if [ "$ENGINE" = podman ]; then
    export CONTAINERS_CONF=${CONTAINERS_CONF:-$PWD/deploy/podman/containers.conf}
fi
BASE=${BASE_IMAGE:-}
if [ -z "$BASE" ]; then
    if $ENGINE image inspect python:3.11-slim >/dev/null 2>&1 || timeout 60 $ENGINE pull -q python:3.11-slim >/dev/null 2>&1; then
        BASE=""  # BentoML's own python:3.11-slim
    else
        echo "python:3.11-slim cannot be pulled here: using a local Debian base"
        tools/make_base_image.sh "$ENGINE" localhost/extendserve-base:bookworm
        BASE=localhost/extendserve-base:bookworm
    fi
fi
mkdir -p build
BUILD_FILE=build/bentofile.$KIND.yaml
{
    cat "$BENTOFILE"
    echo "envs:  # a read-only root filesystem: what the service writes goes under /tmp (a tmpfs)"
    echo "  - name: EXTENDSERVE_CACHE"
    echo "    value: /tmp/extendserve"
    echo "docker:"
    echo "  setup_script: deploy/image_setup.sh"
    echo "  dockerfile_template: deploy/Dockerfile.template"
    if [ -n "$BASE" ]; then
        echo "  base_image: $BASE"
    fi
} > "$BUILD_FILE"
echo "building the bento of $MODEL ($BENTOFILE)"
BENTO=$(EXTENDSERVE_MODEL="$MODEL" EXTENDSERVE_ENGINE=onnxruntime "$BIN/bentoml" build -f "$BUILD_FILE" -o tag . | tail -1)
BENTO=${BENTO#__tag__:}
echo "containerizing $BENTO as $TAG with $ENGINE"
# Run from the temporary folder: containerize reads the packed Dockerfile.template from its context
# there and refuses a file outside the working directory (BentoML 1.4's resolve_user_filepath).
BENTOML_BIN=$(cd "$BIN" && pwd)/bentoml
TMP=$("$BIN/python" -c 'import tempfile; print(tempfile.gettempdir())')
(cd "$TMP" && "$BENTOML_BIN" containerize "$BENTO" -t "$TAG" --backend "$ENGINE" --opt network=host)
$ENGINE image inspect "$TAG" --format '{{.Size}}' | awk -v t="$TAG" '{printf "%s: %.0f MB\n", t, $1 / 1e6}'
