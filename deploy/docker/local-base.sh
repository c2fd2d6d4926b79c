#!/usr/bin/env bash
# A stand-in for python:3.11-slim where no image registry is reachable: Debian bookworm's minimal system
# (which ships Python 3.11) built with debootstrap from Debian's mirror, imported as a local image.
# The machine's CA bundle goes in too, and PIP_CERT points at it, so that pip inside a build trusts the
# same TLS as the host does. The serving image built FROM this base keeps both: use it where the build host's
# trust is the cluster's (a sandbox), and python:3.11-slim elsewhere, which carries no host CA. (A build secret
# would keep the bundle out of every layer, but `RUN --mount` needs BuildKit, and docker's classic builder,
# used where no buildx plugin is installed, refuses the Dockerfile then.)
#
#   deploy/docker/local-base.sh [ENGINE] [TAG]      # ENGINE: podman (default) or docker
#   podman build --network host --build-arg BASE=localhost/clinc-intent-base:bookworm -t clinc-intent .
set -euo pipefail
engine=${1:-podman}
tag=${2:-localhost/clinc-intent-base:bookworm}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
ca=${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
rootfs=$(mktemp -d)
trap 'rm -rf "$rootfs"' EXIT
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$rootfs" "$mirror" >/dev/null
ln -sf /usr/bin/python3 "$rootfs/usr/local/bin/python"
cp "$ca" "$rootfs/etc/ssl/certs/build-ca.crt"
rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/apt/archives/*.deb
tar -C "$rootfs" -c . | "$engine" import \
  --change 'ENV PATH=/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'ENV PIP_CERT=/etc/ssl/certs/build-ca.crt' \
  --change 'CMD ["python"]' - "$tag" >/dev/null
echo "$tag"
