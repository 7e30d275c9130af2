#!/usr/bin/env bash
# Build a minimal Debian bookworm base image for `make test-deploy`, where no image registry can
# be reached: debootstrap (minbase) with python3, python3-venv and ca-certificates, imported into
# podman under a tag. A tag that already exists is reused, so a second run costs nothing.
#
#   deploy/base-image.sh TAG [WORKDIR]
#
# Needs root, debootstrap and podman; the Debian mirror is DEBIAN_MIRROR (deb.debian.org).
set -euo pipefail

tag=${1:?usage: base-image.sh TAG [WORKDIR]}
workdir=${2:-$(mktemp -d)}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
podman=(podman --runtime "${PODMAN_RUNTIME:-/usr/sbin/runc}" --cgroup-manager cgroupfs)

if "${podman[@]}" image exists "$tag"; then
    echo "base image $tag: cached"
    exit 0
fi

rootfs="$workdir/rootfs"
rm -rf "$rootfs"
mkdir -p "$rootfs"
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    bookworm "$rootfs" "$mirror" >"$workdir/debootstrap.log" 2>&1 || {
    tail -n 20 "$workdir/debootstrap.log" >&2
    exit 1
}
# Trust what the host trusts: a host that reaches PyPI and Debian through a TLS-inspecting proxy
# has its CA in /usr/local/share/ca-certificates, and the image build must reach them too.
if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
    cp /usr/local/share/ca-certificates/*.crt "$rootfs/usr/local/share/ca-certificates/"
    chroot "$rootfs" update-ca-certificates >/dev/null
fi
# What an image does not need: package caches and lists (apt-get update refetches them), docs.
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* \
    "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/*
tar -C "$rootfs" -c . | "${podman[@]}" import --quiet \
    --change 'CMD ["/bin/bash"]' --change 'ENV LANG=C.UTF-8' - "$tag" >/dev/null
rm -rf "$rootfs"
echo "base image $tag: built"
