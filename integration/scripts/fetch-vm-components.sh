#!/usr/bin/env bash
# Fetches what the VM test (integration/tests/vm.rs) needs to boot a guest under QEMU TCG:
#   qemu-system-x86_64                     bookworm-backports build, installed with apt (bookworm's own
#                                          qemu-system-x86 7.2 would remove the preinstalled qemu-utils 10.x)
#   $CACHE/vm/kernel/vmlinuz               a Debian bookworm linux-image-6.1.0-*-amd64 (not installed:
#   $CACHE/vm/kernel/modules/*.ko          extracted with dpkg -x, only the modules the guest init loads)
#   $CACHE/vm/kernel/version               the kernel release
#   $CACHE/vm/bin/vhost-device-vsock       `cargo install --locked vhost-device-vsock` (crates.io); the host
#                                          has no /dev/vhost-vsock, so vsock is carried by vhost-user
# The system's apt configuration is left untouched: a private sources list and state dir are used.
# Idempotent: what is already present is kept.
set -euo pipefail
CACHE=${GUESTPULL_LAB_CACHE:-/var/cache/guestpull-lab}
VM=$CACHE/vm
mkdir -p "$VM"

# Guest modules, in the order the guest init loads them (dependencies first). Keep in sync with
# integration/src/vm.rs (GUEST_MODULES).
MODULES="virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk virtio_console \
failover net_failover virtio_net vsock vmw_vsock_virtio_transport_common vmw_vsock_virtio_transport overlay \
dm-mod dm-bufio dm-crypt xor async_tx async_xor dm-integrity ecb xts authenc af_alg algif_skcipher algif_hash \
crc16 mbcache jbd2 crc32c_generic ext4"

have_qemu() { command -v qemu-system-x86_64 >/dev/null 2>&1; }
have_kernel() {
    [ -f "$VM/kernel/vmlinuz" ] || return 1
    for m in $MODULES; do [ -f "$VM/kernel/modules/$m.ko" ] || return 1; done
}
have_vdv() { [ -x "$VM/bin/vhost-device-vsock" ]; }

if have_qemu && have_kernel && have_vdv; then
    echo "fetch-vm-components: all present ($(command -v qemu-system-x86_64), $VM)"
    exit 0
fi

if ! have_qemu || ! have_kernel; then
    SOURCES=/etc/apt/sources.list.d/debian.sources
    MIRROR=$(awk '/^URIs:/{print $2; exit}' "$SOURCES" 2>/dev/null || true)
    SEC=$(awk '/^URIs:/{print $2}' "$SOURCES" 2>/dev/null | grep -m1 security || true)
    [ -n "$MIRROR" ] || MIRROR=$(awk '/^deb /{print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
    [ -n "$MIRROR" ] || { echo "fetch-vm-components: cannot find the Debian mirror in /etc/apt" >&2; exit 1; }
    [ -n "$SEC" ] || SEC=http://security.debian.org/debian-security
    APT=$VM/apt
    mkdir -p "$APT/lists/partial" "$APT/cache/archives/partial"
    KR="signed-by=/usr/share/keyrings/debian-archive-keyring.gpg"
    cat > "$APT/sources.list" <<SRC
deb [$KR] $MIRROR bookworm main
deb [$KR] $MIRROR bookworm-updates main
deb [$KR] $SEC bookworm-security main
deb [$KR] $MIRROR bookworm-backports main
SRC
    APTO=(-o Dir::Etc::SourceList="$APT/sources.list" -o Dir::Etc::SourceParts=/dev/null
          -o Dir::State::Lists="$APT/lists" -o Dir::Cache="$APT/cache")
    apt-get "${APTO[@]}" -qq update
fi

if ! have_qemu; then
    DEBIAN_FRONTEND=noninteractive apt-get "${APTO[@]}" -qq install -y --no-install-recommends \
        -t bookworm-backports qemu-system-x86 >/dev/null
    echo "fetch-vm-components: installed $(qemu-system-x86_64 --version | head -n 1)"
fi

if ! have_kernel; then
    # The newest bookworm 6.1 ABI the archive offers right now (old ABIs vanish from the mirrors).
    PKG=$(apt-cache "${APTO[@]}" pkgnames linux-image-6.1.0- \
        | grep -E '^linux-image-6\.1\.0-[0-9]+-amd64$' | sort -V | tail -n 1)
    [ -n "$PKG" ] || { echo "fetch-vm-components: no linux-image-6.1.0-*-amd64 in bookworm" >&2; exit 1; }
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    (cd "$tmp" && apt-get "${APTO[@]}" -qq download "$PKG" 2>/dev/null)
    dpkg -x "$tmp"/*.deb "$tmp/x"
    REL=${PKG#linux-image-}
    rm -rf "$VM/kernel.new" && mkdir -p "$VM/kernel.new/modules"
    cp "$tmp/x/boot/vmlinuz-$REL" "$VM/kernel.new/vmlinuz"
    for m in $MODULES; do
        f=$(find "$tmp/x/lib/modules/$REL/kernel" -name "$m.ko*" | head -n 1)
        [ -n "$f" ] || { echo "fetch-vm-components: module $m missing from $PKG" >&2; exit 1; }
        case "$f" in
            *.ko.xz) xz -dc "$f" > "$VM/kernel.new/modules/$m.ko" ;;
            *.ko.zst) zstd -qdc "$f" > "$VM/kernel.new/modules/$m.ko" ;;
            *) cp "$f" "$VM/kernel.new/modules/$m.ko" ;;
        esac
    done
    echo "$REL" > "$VM/kernel.new/version"
    rm -rf "$VM/kernel" && mv "$VM/kernel.new" "$VM/kernel"
    rm -rf "$tmp"
    trap - EXIT
    echo "fetch-vm-components: $PKG -> $VM/kernel"
fi
rm -rf "$VM/apt/cache/archives"/*.deb

if ! have_vdv; then
    command -v cargo >/dev/null || { echo "fetch-vm-components: cargo is needed to build vhost-device-vsock" >&2; exit 1; }
    # Its own target dir: the workspace's CARGO_TARGET_DIR must not receive an unrelated build.
    CARGO_TARGET_DIR=$VM/vdv-target cargo install --locked --quiet --root "$VM" vhost-device-vsock
    rm -rf "$VM/vdv-target"
    echo "fetch-vm-components: $("$VM/bin/vhost-device-vsock" --version 2>/dev/null || echo vhost-device-vsock) -> $VM/bin"
fi
