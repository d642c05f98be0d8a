#!/usr/bin/env bash
# Builds the lab's golden image: a real, bootable minimal Debian (debootstrap) as a raw disk,
# cached outside the repo; prints its path. Idempotent.
#
#   scripts/build-golden.sh [small|large]
#     small  768 MiB disk, minbase + systemd + kernel            (~450 MB used)
#     large  2 GiB disk, plus a typical server's userland        (~1.1 GB used)
#   Next to disk.img: disk.sha256, disk.size, boot.profile (see vmthunder.lab.profile).
#
# Disk layout (MBR, built without mounting anything): partition 1 FAT16 "VMTBOOT" holding
# syslinux, the kernel and the initrd; partition 2 ext4 "vmtroot" (made with mkfs.ext4 -d).
# SeaBIOS -> syslinux -> Debian's kernel + initramfs-tools initrd -> systemd, which prints
# VMT-GOLDEN-BOOTED on ttyS0 when multi-user.target is reached: every byte the VM boots from
# is the image's own.
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
CACHE=${VMT_CACHE:-$HOME/.cache/vmthunder}
variant=${1:-small}
log() { echo "build-golden: $*" >&2; }
"$top/scripts/build-guest.sh" >/dev/null   # host packages (debootstrap, mtools, syslinux...)

case $variant in
  small) size_mib=768; extra="" ;;
  large) size_mib=2048
         extra="python3,perl,openssh-server,curl,vim,less,iproute2,iputils-ping,procps,locales,man-db,rsyslog,cron,sudo,ca-certificates,gnupg,git" ;;
  *) echo "usage: $0 [small|large]" >&2; exit 2 ;;
esac
key=$( (cat "$0"; echo "$variant") | sha256sum | cut -c1-10)
out=$CACHE/golden-$variant-$key
img=$out/disk.img
if [ -f "$out/.complete" ]; then echo "$img"; exit 0; fi
rm -rf "$out"; mkdir -p "$out"
root=$out/root
mirror=${VMT_DEBIAN_MIRROR:-http://deb.debian.org/debian}
include=systemd-sysv,udev,kmod,e2fsprogs,initramfs-tools,zstd${extra:+,$extra}
log "debootstrap $variant ($include)"
debootstrap --variant=minbase --include="$include" bookworm "$root" "$mirror" >&2

# A small initrd: only what a virtio VM needs (MODULES=most would pull every driver).
mkdir -p "$root/etc/initramfs-tools/conf.d"
echo "MODULES=list" > "$root/etc/initramfs-tools/conf.d/vmthunder"
echo "COMPRESS=zstd" >> "$root/etc/initramfs-tools/conf.d/vmthunder"
printf '%s\n' virtio_pci virtio_blk virtio_net ext4 >> "$root/etc/initramfs-tools/modules"
cat > "$root/etc/fstab" <<'EOF'
LABEL=vmtroot / ext4 ro,errors=remount-ro 0 1
EOF
echo golden > "$root/etc/hostname"
cat > "$root/etc/systemd/system/vmt-booted.service" <<'EOF'
[Unit]
Description=Tell the lab the boot is complete
After=multi-user.target
[Service]
Type=oneshot
ExecStart=/bin/sh -c 'echo VMT-GOLDEN-BOOTED > /dev/ttyS0'
[Install]
WantedBy=multi-user.target
EOF
ln -sf /etc/systemd/system/vmt-booted.service \
  "$root/etc/systemd/system/multi-user.target.wants/vmt-booted.service"
chroot "$root" passwd -d root >/dev/null
log "installing the kernel in the image"
mount -t proc proc "$root/proc"
trap 'umount "$root/proc" 2>/dev/null || true' EXIT
DEBIAN_FRONTEND=noninteractive chroot "$root" apt-get install -y --no-install-recommends \
  linux-image-amd64 >&2
umount "$root/proc"; trap - EXIT
chroot "$root" apt-get clean
kernel=$(ls "$root"/boot/vmlinuz-* | head -1)
initrd=$(ls "$root"/boot/initrd.img-* | head -1)

# --- the disk ----------------------------------------------------------------------------------
boot_mib=64
sect=512
p1=$((1 * 1024 * 1024 / sect))                  # 1 MiB aligned
p1len=$((boot_mib * 1024 * 1024 / sect))
p2=$((p1 + p1len))
p2len=$(( size_mib * 1024 * 1024 / sect - p2 ))
truncate -s "${size_mib}M" "$img"
printf 'label: dos\n%s,%s,6,*\n%s,%s,83\n' "$p1" "$p1len" "$p2" "$p2len" | sfdisk -q "$img"
dd if=/usr/lib/syslinux/mbr/mbr.bin of="$img" conv=notrunc bs=440 count=1 status=none
mkfs.fat -F 16 -n VMTBOOT --offset "$p1" "$img" $((p1len / 2)) >/dev/null
fat="$img@@$((p1 * sect))"
cat > "$out/syslinux.cfg" <<'EOF'
DEFAULT debian
PROMPT 0
TIMEOUT 0
LABEL debian
  KERNEL vmlinuz
  INITRD initrd.img
  APPEND root=LABEL=vmtroot ro console=ttyS0 quiet
EOF
mcopy -i "$fat" "$kernel" ::vmlinuz
mcopy -i "$fat" "$initrd" ::initrd.img
mcopy -i "$fat" "$out/syslinux.cfg" ::syslinux.cfg
syslinux --install --offset $((p1 * sect)) "$img"
mkfs.ext4 -q -F -L vmtroot -E offset=$((p2 * sect)) -d "$root" "$img" "$((p2len / 2))k"
rm -rf "$root"
sha256sum "$img" | cut -d' ' -f1 > "$out/disk.sha256"
stat -c %s "$img" > "$out/disk.size"
log "recording the boot profile (a real boot under qemu TCG)"
PYTHONPATH=$top/lab python3 -m vmthunder.lab.profile record "$img" "$out/boot.profile" >&2
touch "$out/.complete"
ln -sfn "$out" "$CACHE/golden-$variant"
log "done: $img ($(du -h "$img" | cut -f1) allocated)"
echo "$img"
