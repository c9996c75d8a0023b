#!/usr/bin/env bash
# A local Python base image made from Debian's packages, for machines that cannot pull
# python:3.11-slim (no image registry reachable). It trusts the certificates this host trusts, so
# pip and uv inside a build reach the package registry the way the host does (a company proxy's
# CA included). Usage: tools/make_base_image.sh ENGINE TAG   (ENGINE: docker or podman)
set -euo pipefail
ENGINE=${1:-podman}
TAG=${2:-localhost/extendserve-base:bookworm}
SUITE=${SUITE:-bookworm}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
if $ENGINE image inspect "$TAG" >/dev/null 2>&1; then
    echo "base image $TAG: present"
    exit 0
fi
command -v debootstrap >/dev/null || { echo "debootstrap is needed to make $TAG: apt-get install debootstrap" >&2; exit 2; }
ROOT=$(mktemp -d "${TMPDIR:-/var/tmp}/extendserve-rootfs.XXXXXX")
trap 'rm -rf "$ROOT"' EXIT
echo "making base image $TAG from Debian $SUITE packages (debootstrap, a few minutes)"
debootstrap --variant=minbase --include=python3,python3-pip,python3-venv,ca-certificates \
    "$SUITE" "$ROOT" "$MIRROR" >/dev/null
# The host's trusted certificates (Debian's plus any company CA the host adds).
for f in /etc/ssl/certs/ca-certificates.crt; do
    [ -f "$f" ] && cp "$f" "$ROOT/etc/ssl/certs/ca-certificates.crt"
done
ln -sf python3 "$ROOT/usr/bin/python"
rm -rf "$ROOT"/var/cache/apt/archives/*.deb "$ROOT"/var/lib/apt/lists/*
# Python 3.11's own pip refuses to install into the system Python (PEP 668) except where told; the
# bento's Dockerfile installs uv with it.
printf '[global]\nbreak-system-packages = true\ncert = /etc/ssl/certs/ca-certificates.crt\n' > "$ROOT/etc/pip.conf"
tar -C "$ROOT" -c . | $ENGINE import \
    --change 'ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt' \
    --change 'ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt' \
    --change 'ENV UV_NATIVE_TLS=1' \
    --change 'ENV UV_PYTHON_DOWNLOADS=never' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["python3"]' - "$TAG" >/dev/null
echo "base image $TAG: made"
