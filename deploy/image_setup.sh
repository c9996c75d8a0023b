#!/bin/sh
# Run as root while the image is built (bentofile docker.setup_script, added by tools/image.sh).
# BentoML makes these folders under BENTOML_HOME at every start; made here, they exist on a
# read-only root filesystem (--read-only, readOnlyRootFilesystem), where the start would fail.
# What the service writes at run time goes under /tmp (EXTENDSERVE_CACHE, BentoML's temporary files).
set -e
home=${BENTOML_HOME:-/home/bentoml}
mkdir -p "$home/bentos" "$home/models" "$home/envs" "$home/tmp"
chown -R bentoml:bentoml "$home" 2>/dev/null || true
