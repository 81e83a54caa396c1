#!/usr/bin/env bash
# Runs pagepool's VFIO backend against a real Linux kernel: boots a QEMU
# guest (TCG, emulated Intel IOMMU, one e1000e), binds the NIC to vfio-pci
# and runs the guest test binary (vmtest/guest) inside. Exits 0 only if the
# guest printed the PASS verdict and its kernel log has no warning, BUG,
# Oops or IOMMU fault.
#
# Environment knobs (all optional):
#   VMTEST_TIMEOUT       seconds before QEMU is killed (default 600)
#   VMTEST_KERNEL_PKG    Debian kernel package to boot (default: newest
#                        linux-image-6.*-amd64 apt knows)
#   VMTEST_ACCEL         QEMU accelerator (default tcg)
#   VMTEST_TARGET_DIR    cargo target dir for the guest build
#                        (default vmtest/work/target)
#   VMTEST_ARGS          extra arguments for the guest test binary
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(dirname "$here")
cache=$here/cache
work=$here/work
log=$work/console.log
timeout_s=${VMTEST_TIMEOUT:-600}
accel=${VMTEST_ACCEL:-tcg}
target_dir=${VMTEST_TARGET_DIR:-$work/target}
started=$(date +%s)

say() { printf 'vmtest: %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

mkdir -p "$cache" "$work"

# --- 1. Host tools (Debian packages), installed only when missing. --------
apt_updated=
apt_update_once() {
    if [ -z "$apt_updated" ]; then
        say "apt-get update"
        DEBIAN_FRONTEND=noninteractive apt-get update -qq
        apt_updated=1
    fi
}
apt_install() {
    say "installing $*"
    if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null; then
        apt_update_once
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
    fi
}
missing=()
command -v qemu-system-x86_64 >/dev/null || missing+=(qemu-system-x86)
dpkg -s busybox-static >/dev/null 2>&1 || missing+=(busybox-static)
command -v cpio >/dev/null || missing+=(cpio)
command -v depmod >/dev/null || missing+=(kmod)
command -v xz >/dev/null || missing+=(xz-utils)
command -v zstd >/dev/null || missing+=(zstd)
if [ ${#missing[@]} -gt 0 ]; then
    apt_install "${missing[@]}"
fi
busybox=/bin/busybox
[ -x "$busybox" ] || die "busybox-static did not install $busybox"

# --- 2. Guest kernel: a Debian linux-image package, cached. ----------------
kernel_dir=$cache/kernel
if ! ls "$kernel_dir"/boot/vmlinuz-* >/dev/null 2>&1; then
    pkg=${VMTEST_KERNEL_PKG:-}
    pick_kernel() {
        apt-cache search --names-only '^linux-image-6\.[0-9]' 2>/dev/null \
            | awk '{print $1}' \
            | grep -E '^linux-image-6\.[0-9.]+[-.+a-z0-9]*-amd64$' \
            | grep -v -E 'unsigned|dbg|-rt-|cloud' \
            | sort -V | tail -n 1 || true
    }
    if [ -z "$pkg" ]; then
        pkg=$(pick_kernel)
        if [ -z "$pkg" ]; then
            apt_update_once
            pkg=$(pick_kernel)
        fi
    fi
    [ -n "$pkg" ] || die "no linux-image-6.*-amd64 package found by apt-cache"
    say "downloading kernel package $pkg"
    rm -rf "$cache/deb" "$kernel_dir.tmp"
    mkdir -p "$cache/deb"
    if ! (cd "$cache/deb" && apt-get download -q "$pkg" >/dev/null); then
        apt_update_once
        (cd "$cache/deb" && apt-get download -q "$pkg" >/dev/null)
    fi
    dpkg -x "$cache"/deb/*.deb "$kernel_dir.tmp"
    rm -rf "$cache/deb"
    mv "$kernel_dir.tmp" "$kernel_dir"
    echo "$pkg" > "$cache/kernel.pkg"
fi
vmlinuz=$(ls "$kernel_dir"/boot/vmlinuz-* | head -n 1)
kver=${vmlinuz##*/vmlinuz-}
moddir=$kernel_dir/lib/modules/$kver
if [ ! -f "$moddir/modules.dep" ]; then
    # The package leaves modules.dep to its postinst; make it here.
    depmod -b "$kernel_dir" "$kver"
fi
[ -f "$moddir/modules.dep" ] || die "$moddir/modules.dep missing"
say "kernel $kver ($(cat "$cache/kernel.pkg" 2>/dev/null || echo cached))"

# --- 3. Guest test binary, static if the toolchain allows. ------------------
say "building the guest test binary"
host_target=x86_64-unknown-linux-gnu
(
    cd "$here/guest"
    CARGO_TARGET_DIR=$target_dir RUSTFLAGS="-C target-feature=+crt-static" \
        cargo build --release --quiet --target "$host_target"
)
guest_bin=$target_dir/$host_target/release/pagepool-vmtest
[ -x "$guest_bin" ] || die "guest binary $guest_bin missing"

# --- 4. initramfs: busybox, VFIO modules, the binary, /init. ----------------
rootfs=$work/rootfs
rm -rf "$rootfs"
mkdir -p "$rootfs"/{bin,dev,proc,sys,tmp,etc,lib/modules}
cp "$busybox" "$rootfs/bin/busybox"
ln -s busybox "$rootfs/bin/sh"
cp "$guest_bin" "$rootfs/bin/pagepool-vmtest"

# Shared libraries, should the binary be dynamic after all.
libs=$(ldd "$guest_bin" 2>/dev/null | grep -o '/[^ ]*' || true)
if [ -n "$libs" ]; then
    say "guest binary is dynamic; copying its libraries"
    for lib in $libs; do
        mkdir -p "$rootfs$(dirname "$lib")"
        cp -L "$lib" "$rootfs$lib"
    done
fi

# The VFIO modules and their dependencies, in load order, from modules.dep.
norm() { local b=${1##*/}; b=${b%%.ko*}; echo "${b//-/_}"; }
declare -A mod_path=() mod_deps=() loaded=()
while IFS= read -r line; do
    path=${line%%:*}
    name=$(norm "$path")
    mod_path[$name]=$path
    mod_deps[$name]=${line#*:}
done < "$moddir/modules.dep"
order=()
add_module() {
    local name=$1 dep
    [ -n "${loaded[$name]:-}" ] && return 0
    loaded[$name]=1
    [ -n "${mod_path[$name]:-}" ] || die "module $name not in $kver's modules.dep"
    for dep in ${mod_deps[$name]}; do
        add_module "$(norm "$dep")"
    done
    order+=("$name")
}
for want in irqbypass vfio vfio_iommu_type1 vfio_pci_core vfio_pci; do
    # Built-in modules (no .ko) are fine: skip them.
    if [ -n "${mod_path[$want]:-}" ]; then add_module "$want"; fi
done
for name in "${order[@]}"; do
    src=$moddir/${mod_path[$name]}
    case "$src" in
        *.ko.xz) xz -dc "$src" > "$rootfs/lib/modules/$name.ko" ;;
        *.ko.zst) zstd -qdc "$src" > "$rootfs/lib/modules/$name.ko" ;;
        *.ko.gz) gzip -dc "$src" > "$rootfs/lib/modules/$name.ko" ;;
        *) cp "$src" "$rootfs/lib/modules/$name.ko" ;;
    esac
done
printf '%s\n' "${order[@]}" > "$rootfs/etc/modules.order"
say "modules: ${order[*]}"

cat > "$rootfs/init" <<EOF
#!/bin/sh
export PATH=/bin
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
echo "PAGEPOOL-VMTEST: guest up, kernel \$(uname -r)"
for m in \$(cat /etc/modules.order); do
    insmod /lib/modules/\$m.ko || echo "PAGEPOOL-VMTEST: insmod \$m failed"
done
bdf=
for d in /sys/bus/pci/devices/*; do
    if [ "\$(cat \$d/vendor)" = 0x8086 ] && [ "\$(cat \$d/device)" = 0x10d3 ]; then
        bdf=\${d##*/}
    fi
done
rc=1
if [ -z "\$bdf" ]; then
    echo "PAGEPOOL-VMTEST: no e1000e (8086:10d3) found"
else
    echo vfio-pci > /sys/bus/pci/devices/\$bdf/driver_override
    echo \$bdf > /sys/bus/pci/drivers_probe
    echo "PAGEPOOL-VMTEST: \$bdf bound to \$(basename \$(readlink /sys/bus/pci/devices/\$bdf/driver)), group \$(basename \$(readlink /sys/bus/pci/devices/\$bdf/iommu_group))"
    ls /dev/vfio
    /bin/pagepool-vmtest \$bdf ${VMTEST_ARGS:-}
    rc=\$?
fi
echo "----- guest dmesg -----"
dmesg
echo "----- end of guest dmesg -----"
if [ \$rc -eq 0 ]; then
    echo "PAGEPOOL-VMTEST: PASS"
else
    echo "PAGEPOOL-VMTEST: FAIL (test binary exit \$rc)"
fi
sync
poweroff -f
EOF
chmod +x "$rootfs/init"
initrd=$work/initramfs.cpio.gz
(cd "$rootfs" && find . -print0 | cpio --null -o -H newc --quiet | gzip -1) > "$initrd"

# --- 5. Boot. ----------------------------------------------------------------
say "booting QEMU ($accel, timeout ${timeout_s}s), console log: $log"
boot_started=$(date +%s)
qemu_rc=0
timeout "$timeout_s" qemu-system-x86_64 \
    -machine q35,kernel-irqchip=split -accel "$accel" -cpu max -m 1024 -smp 2 \
    -nographic -no-reboot \
    -device intel-iommu,intremap=on,caching-mode=on \
    -device e1000e,netdev=n0 -netdev user,id=n0,restrict=on \
    -kernel "$vmlinuz" -initrd "$initrd" \
    -append "console=ttyS0 intel_iommu=on iommu=strict panic=-1" \
    </dev/null 2>&1 | tee "$log" || qemu_rc=$?
finished=$(date +%s)

# --- 6. Verdict. ---------------------------------------------------------------
# Serial output carries \r\n; strip the \r before matching.
clean=$work/console.clean.log
tr -d '\r' < "$log" > "$clean"
status=0
if [ "$qemu_rc" -eq 124 ]; then
    say "FAIL: QEMU timed out after ${timeout_s}s"
    status=1
elif [ "$qemu_rc" -ne 0 ]; then
    say "FAIL: QEMU exited with $qemu_rc"
    status=1
fi
if ! grep -qx 'PAGEPOOL-VMTEST: PASS' "$clean"; then
    say "FAIL: no 'PAGEPOOL-VMTEST: PASS' line in the console log"
    status=1
fi
bad='WARNING:|BUG:|Oops|Kernel panic|general protection fault|Call Trace:|DMAR: \[DMA (Read|Write)|DMAR: DRHD: handling fault|^\[ *[0-9]+\.[0-9]+\] .*vfio.*(WARN|[Ee]rror|[Ff]ail)'
if grep -E "$bad" "$clean" >/dev/null; then
    say "FAIL: the guest kernel log has warnings or faults:"
    grep -E "$bad" "$clean" | sort -u | head -n 20 >&2
    status=1
fi
say "QEMU ran $((finished - boot_started))s; whole run $((finished - started))s"
if [ "$status" -eq 0 ]; then
    say "PASS"
fi
exit "$status"
