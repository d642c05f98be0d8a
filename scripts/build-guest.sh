#!/usr/bin/env bash
# Builds the lab's guest environment from Debian's own packages, cached outside the repo, and
# prints its path. Idempotent: a second run only checks the host packages and the cache.
#
#   $CACHE/guest-<kernel abi>-<hash of this script>/
#     vmlinuz          Debian's kernel (linux-image-amd64's dependency)
#     vmlinux          the same, decompressed: qemu boots it through its PVH entry, sparing
#                      each guest ~3 s of xz under TCG
#     initrd.cpio.gz   busybox initramfs: 9p host root (ro) + 9p layer + overlay (tmpfs upper)
#     layer/           guest-only packages (open-iscsi, rtslib-fb, thin-provisioning-tools, ...)
#                      and the kernel's modules, including dm-clone built out of tree
#     kernel-abi       e.g. 6.1.0-56-amd64
#   $CACHE/guest -> the above
#
# Also installs what the host needs (qemu, debootstrap, ...), since CI starts from a fresh machine.
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
CACHE=${VMT_CACHE:-$HOME/.cache/vmthunder}
log() { echo "build-guest: $*" >&2; }

# --- host packages -------------------------------------------------------------------------
host_pkgs=(qemu-system-x86 qemu-utils debootstrap cpio mtools syslinux syslinux-common dosfstools
  fdisk kmod e2fsprogs iproute2 dmsetup xz-utils gcc make python3)
missing=()
for p in "${host_pkgs[@]}"; do
  [ "$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null)" = "install ok installed" ] || missing+=("$p")
done
apt_install() {
  DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=900 install -y \
    --no-install-recommends "$@" >&2
}
if [ ${#missing[@]} -gt 0 ]; then
  log "installing host packages: ${missing[*]}"
  apt_install "${missing[@]}" || { apt-get -o DPkg::Lock::Timeout=900 update >&2; apt_install "${missing[@]}"; }
fi

# --- which kernel --------------------------------------------------------------------------
pkg=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/{print $2; exit}')
abi=${pkg#linux-image-}                      # 6.1.0-56-amd64
kver=$(apt-cache show --no-all-versions "$pkg" | awk '/^Version:/{print $2; exit}')
headers=linux-headers-$abi
if [ "$(dpkg-query -W -f='${Status}' "$headers" 2>/dev/null)" != "install ok installed" ]; then
  log "installing $headers (for the out-of-tree dm-clone build)"
  apt_install "$headers"
fi

# Guest-only userspace: its dependency closure minus what the host has (the guest sees the host's
# root). Some dependencies must not shadow the host's files or make no sense without udev.
guest_pkgs=(open-iscsi kmod dmsetup thin-provisioning-tools python3-rtslib-fb targetcli-fb
  busybox-static)
deny='^(udev|usrmerge|libelogind0|cdebconf|libdebian-installer4|install-info|libnewt0\.52|libtextwrap1|mailcap|mime-support|lsb-base|lib.*-perl|systemd.*|dbus.*)$'

key=$(cat "$0" "$top/lab/vmthunder/lab/guest/init" | sha256sum | cut -c1-10)
out=$CACHE/guest-$abi-$key
if [ -f "$out/.complete" ]; then
  ln -sfn "$out" "$CACHE/guest"
  echo "$out"
  exit 0
fi
log "building $out (kernel $pkg $kver)"
rm -rf "$out"
mkdir -p "$out/debs" "$out/raw"
chmod 777 "$out/debs"   # apt-get download runs as _apt where it can
cd "$out/debs"

closure=$(apt-cache depends --recurse --no-recommends --no-suggests --no-conflicts --no-breaks \
  --no-replaces --no-enhances "${guest_pkgs[@]}" | grep -v '^[ <]' | sort -u)
want=()
for p in $closure; do
  [[ $p =~ $deny ]] && continue
  if [ "$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null)" != "install ok installed" ] ||
     [ "$p" = busybox-static ]; then
    want+=("$p")
  fi
done
log "guest packages: ${want[*]}"
apt-get download "$pkg" "${want[@]}" >&2 2>/dev/null || apt-get download "$pkg" "${want[@]}" >&2
for d in *.deb; do dpkg-deb -x "$d" "$out/raw"; done

# --- layer: everything under usr/ and etc/, or the overlay would hide the host's /lib -> usr/lib
layer=$out/layer
mkdir -p "$layer/usr"
for d in bin sbin lib lib64; do
  if [ -d "$out/raw/$d" ] && [ ! -L "$out/raw/$d" ]; then
    mkdir -p "$out/raw/usr/$d"
    cp -a "$out/raw/$d/." "$out/raw/usr/$d/"
    rm -rf "${out:?}/raw/$d"
  fi
done
cp -a "$out/raw/usr" "$layer/"
[ -d "$out/raw/etc" ] && cp -a "$out/raw/etc" "$layer/"
cp "$out/raw/boot/vmlinuz-$abi" "$out/vmlinuz"
# The bzImage's payload is an xz stream (Debian's CONFIG_KERNEL_XZ); the ELF kernel is its content.
python3 - "$out/vmlinuz" "$out/vmlinux" <<'EOF'
import lzma, sys
raw = open(sys.argv[1], "rb").read()
with open(sys.argv[2], "wb") as f:
    f.write(lzma.LZMADecompressor().decompress(raw[raw.index(b"\xfd7zXZ\x00"):]))
EOF
[[ $(readelf -n "$out/vmlinux") == *"Unknown note type: (0x00000012)"* ]] ||  # XEN_ELFNOTE_PHYS32_ENTRY
  { log "no PVH entry in $out/vmlinux"; exit 1; }
mods=$layer/usr/lib/modules/$abi

# --- dm-clone, out of tree, from Debian's linux-source against the matching headers ----------
src_deb=$(ls "$CACHE"/dl/linux-source-6.1_*.deb 2>/dev/null | head -1 || true)
srcver=$(apt-cache show --no-all-versions linux-source-6.1 | awk '/^Version:/{print $2; exit}')
[ "$srcver" = "$kver" ] || log "WARNING: linux-source-6.1 $srcver != $pkg $kver"
if [ -z "$src_deb" ] || [[ $src_deb != *"_${srcver}_"* ]]; then
  mkdir -p "$CACHE/dl" && chmod 777 "$CACHE/dl"
  (cd "$CACHE/dl" && rm -f linux-source-6.1_*.deb && apt-get download linux-source-6.1 >&2 2>/dev/null)
  src_deb=$(ls "$CACHE"/dl/linux-source-6.1_*.deb | head -1)
fi
b=$out/dm-clone-build
mkdir -p "$b"
dpkg-deb --fsys-tarfile "$src_deb" | tar -xO ./usr/src/linux-source-6.1.tar.xz |
  tar -xJ -C "$b" --strip-components=2 linux-source-6.1/drivers/md
cat > "$b/Kbuild" <<'EOF'
obj-m := dm-clone.o
dm-clone-y := dm-clone-target.o dm-clone-metadata.o
EOF
cp "$b"/md/dm-clone-*.c "$b"/md/*.h "$b/"
cp -r "$b/md/persistent-data" "$b/"
make -s -C "/usr/src/linux-headers-$abi" M="$b" modules >&2
install -D -m 644 "$b/dm-clone.ko" "$mods/updates/dm-clone.ko"
rm -rf "$b"
depmod -b "$layer/usr" "$abi"

# --- busybox initramfs -----------------------------------------------------------------------
ird=$out/initrd
mkdir -p "$ird"/{bin,dev,proc,sys,mnt,newroot,lib/modules}
cp "$layer/usr/bin/busybox" "$ird/bin/busybox"
# modules the initramfs loads, in dependency order (modules.dep lists deps of each module)
want_mods=(virtio_pci 9pnet_virtio 9p overlay)
order=()
add_mod() {
  local name=$1 path deps d
  path=$(awk -F: -v n="/$name.ko" '{ if (substr($1, length($1)-length(n)+1) == n) { print $1; exit } }' "$mods/modules.dep")
  [ -n "$path" ] || { log "module $name not found"; exit 1; }
  for o in "${order[@]}"; do [ "$o" = "$path" ] && return 0; done
  deps=$(awk -F: -v p="$path" '$1 == p { print $2 }' "$mods/modules.dep")
  for d in $deps; do add_mod "$(basename "$d" .ko)"; done
  order+=("$path")
}
for m in "${want_mods[@]}"; do add_mod "$m"; done
: > "$ird/lib/modules/order"
for p in "${order[@]}"; do
  cp "$mods/$p" "$ird/lib/modules/"
  basename "$p" >> "$ird/lib/modules/order"
done
install -m 755 "$top/lab/vmthunder/lab/guest/init" "$ird/init"
(cd "$ird" && find . | cpio -o -H newc --quiet | gzip -1 > "$out/initrd.cpio.gz")
rm -rf "$ird" "$out/raw" "$out/debs"

# --- layer /etc: busybox init runs the checkout's rc script (path from the kernel command line)
mkdir -p "$layer/etc" "$layer/usr/lib/vmthunder"
cat > "$layer/etc/inittab" <<'EOF'
::sysinit:/usr/lib/vmthunder/rc
::respawn:/usr/lib/vmthunder/rc agent
::shutdown:/usr/lib/vmthunder/rc stop
EOF
cat > "$layer/usr/lib/vmthunder/rc" <<'EOF'
#!/bin/sh
# Delegates to the project checkout's guest rc (vmt.repo= on the kernel command line).
for w in $(cat /proc/cmdline); do case $w in vmt.repo=*) repo=${w#vmt.repo=};; esac; done
exec /bin/sh "$repo/lab/vmthunder/lab/guest/rc" "$@"
EOF
chmod 755 "$layer/usr/lib/vmthunder/rc"
echo "$abi" > "$out/kernel-abi"
echo "$kver" > "$out/kernel-version"
touch "$out/.complete"
ln -sfn "$out" "$CACHE/guest"
log "done"
echo "$out"
