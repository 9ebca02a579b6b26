#!/usr/bin/env bash
# Fetches the real components that Debian bookworm does not ship, from Debian's own trixie/sid
# archives, and unpacks them (without installing) under one cache directory:
#   $CACHE/containerd-1.7/usr/bin/{containerd,ctr,containerd-shim-runc-v2}   (trixie 1.7.x)
#   $CACHE/containerd-2.1/usr/bin/...                                          (sid 2.1.x)
#   $CACHE/cosign/usr/bin/cosign                                               (trixie 2.5.x)
#   $CACHE/imgcrypt/usr/bin/{ctr-imgcrypt,ctd-decoder}                         (trixie 1.1.x)
#   $CACHE/kubectl/usr/bin/kubectl                                             (trixie 1.32.x)
# (Debian's `kubernetes-client` is an empty package depending on `kubectl`, which holds the binary.)
# The system's apt configuration is left untouched: a private sources list and state dir are used.
# Idempotent: components already unpacked are kept.
set -euo pipefail
CACHE=${GUESTPULL_LAB_CACHE:-/var/cache/guestpull-lab}
mkdir -p "$CACHE"

# QEMU, the guest kernel and vhost-device-vsock for the VM test (its own idempotent script).
"$(dirname "$0")/fetch-vm-components.sh"

want() { # name dir binary
    [ -x "$CACHE/$2/usr/bin/$3" ] && return 1 || return 0
}
need=0
want containerd containerd-1.7 containerd && need=1
want containerd containerd-2.1 containerd && need=1
want cosign cosign cosign && need=1
want imgcrypt imgcrypt ctr-imgcrypt && need=1
want kubectl kubectl kubectl && need=1
[ "$need" = 1 ] || { echo "fetch-components: all present in $CACHE"; exit 0; }

MIRROR=$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
if [ -z "$MIRROR" ]; then
    MIRROR=$(awk '/^deb /{print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
fi
[ -n "$MIRROR" ] || { echo "fetch-components: cannot find the Debian mirror in /etc/apt" >&2; exit 1; }

APT=$CACHE/apt
mkdir -p "$APT/lists/partial" "$APT/cache/archives/partial"
cat > "$APT/sources.list" <<SRC
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $MIRROR trixie main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $MIRROR sid main
SRC
APTO=(-o Dir::Etc::SourceList="$APT/sources.list" -o Dir::Etc::SourceParts=/dev/null
      -o Dir::State::Lists="$APT/lists" -o Dir::Cache="$APT/cache" -o Debug::NoLocking=1)
apt-get "${APTO[@]}" -qq update

# Picks the newest archive version of $1 whose upstream version starts with $2.
pick() {
    apt-cache "${APTO[@]}" madison "$1" | awk '{print $3}' | grep "^$2" | sort -V | tail -n 1
}
fetch() { # package version-prefix dir
    local v
    v=$(pick "$1" "$2")
    [ -n "$v" ] || { echo "fetch-components: no $1 $2* in trixie/sid" >&2; exit 1; }
    local tmp
    tmp=$(mktemp -d)
    (cd "$tmp" && apt-get "${APTO[@]}" -qq download "$1=$v" 2>/dev/null)
    rm -rf "$CACHE/$3.new" && mkdir -p "$CACHE/$3.new"
    dpkg -x "$tmp"/*.deb "$CACHE/$3.new"
    rm -rf "$tmp" "$CACHE/$3"
    mv "$CACHE/$3.new" "$CACHE/$3"
    echo "fetch-components: $1 $v -> $CACHE/$3"
}
want containerd containerd-1.7 containerd && fetch containerd 1.7. containerd-1.7
want containerd containerd-2.1 containerd && fetch containerd 2.1. containerd-2.1
want cosign cosign cosign && fetch cosign 2. cosign
want imgcrypt imgcrypt ctr-imgcrypt && fetch imgcrypt 1.1. imgcrypt
want kubectl kubectl kubectl && fetch kubectl 1.32. kubectl
rm -rf "$APT/cache/archives"/*.deb
