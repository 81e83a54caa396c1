#!/usr/bin/env bash
# Runs pagepool's VFIO backend against a real Linux kernel: boots a QEMU
# guest (TCG, emulated Intel IOMMU, one e1000e), binds the NIC to vfio-pci
# and runs the guest test binary (vmtest/guest) inside. Exits 0 only if the
# guest printed the PASS verdict and its kernel log has no warning, BUG,
# Oops or IOMMU fault.
#
#   bash vmtest/run.sh            the backend and pool tests (mode "basic")
#   bash vmtest/run.sh e1000e     the e1000e example driver (examples/e1000e):
#                                 two e1000e on one QEMU hub, NIC A (00:02.0)
#                                 driven by the guest kernel, NIC B (00:03.0)
#                                 by the example over vfio-pci; traffic both
#                                 ways, unbind mid-traffic, then the unplug
#                                 experiment, whose DMAR write faults for
#                                 00:03.0 are required (and the only ones
#                                 allowed). Two driver runs in one boot: pools
#                                 mapped page by page, then region-mapped
#                                 pools (--regions). Work dir
#                                 vmtest/work/e1000e/.
#   bash vmtest/run.sh e1000e-removal
#                                 the kernel takes the device: NIC B on a
#                                 hot-pluggable PCIe root port (01:00.0),
#                                 driven by the example with
#                                 --await-removal; one driver-initiated
#                                 unbind, then three removals mid-traffic:
#                                 sysfs remove, unbind from vfio-pci, QMP
#                                 device_del (pciehp). Work dir
#                                 vmtest/work/e1000e-removal/.
#
# Environment knobs (all optional):
#   VMTEST_TIMEOUT       seconds before QEMU is killed (default 600)
#   VMTEST_KERNEL_SERIES newest kernel of this series instead (e.g. 6.1,
#                        Debian 12's, whose read-only pins predate the
#                        zero-page fix of 6.2)
#   VMTEST_KERNEL_PKG    Debian kernel package to boot (default: newest
#                        linux-image-6.*-amd64 apt knows)
#   VMTEST_ACCEL         QEMU accelerator (default tcg)
#   VMTEST_TARGET_DIR    cargo target dir for the guest build
#                        (default vmtest/work/target)
#   VMTEST_ARGS          extra arguments for the guest test binary (in
#                        mode e1000e: for the example)
#   VMTEST_E1000E_SECONDS  mode e1000e: seconds of traffic before the
#                        unbind, per driver run (default 8)
#   VMTEST_E1000E_RUNS   mode e1000e: the driver runs, in order (default
#                        "per-page regions"; either one alone works too;
#                        "regions-thp": regions from transparent huge
#                        pages only, no reserved ones)
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(dirname "$here")
cache=$here/cache
timeout_s=${VMTEST_TIMEOUT:-600}
accel=${VMTEST_ACCEL:-tcg}
target_dir=${VMTEST_TARGET_DIR:-$here/work/target}
started=$(date +%s)

say() { printf 'vmtest: %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

mode=${1:-basic}
case "$mode" in
    basic) work=$here/work; tag=PAGEPOOL-VMTEST ;;
    e1000e) work=$here/work/e1000e; tag=PAGEPOOL-E1000E ;;
    e1000e-removal) work=$here/work/e1000e-removal; tag=PAGEPOOL-REMOVAL ;;
    *) die "unknown mode '$mode' (basic, e1000e or e1000e-removal)" ;;
esac
log=$work/console.log

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
if [ "$mode" = e1000e-removal ]; then
    # The QMP client that sends device_del and times DEVICE_DELETED.
    command -v python3 >/dev/null || missing+=(python3)
fi
if [ ${#missing[@]} -gt 0 ]; then
    apt_install "${missing[@]}"
fi
busybox=/bin/busybox
[ -x "$busybox" ] || die "busybox-static did not install $busybox"

# --- 2. Guest kernel: a Debian linux-image package, cached. ----------------
# A pinned package gets a cache of its own, so pinning one never reuses
# another's kernel.
series=${VMTEST_KERNEL_SERIES:-}
kernel_dir=$cache/kernel${VMTEST_KERNEL_PKG:+-$VMTEST_KERNEL_PKG}${series:+-series-$series}
if ! ls "$kernel_dir"/boot/vmlinuz-* >/dev/null 2>&1; then
    pkg=${VMTEST_KERNEL_PKG:-}
    pick_kernel() {
        apt-cache search --names-only '^linux-image-6\.[0-9]' 2>/dev/null \
            | awk '{print $1}' \
            | grep -E '^linux-image-6\.[0-9.]+[-.+a-z0-9]*-amd64$' \
            | grep -F "linux-image-${series:-6}." \
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
    echo "$pkg" > "$kernel_dir.pkg"
fi
vmlinuz=$(ls "$kernel_dir"/boot/vmlinuz-* | head -n 1)
kver=${vmlinuz##*/vmlinuz-}
moddir=$kernel_dir/lib/modules/$kver
if [ ! -f "$moddir/modules.dep" ]; then
    # The package leaves modules.dep to its postinst; make it here.
    depmod -b "$kernel_dir" "$kver"
fi
[ -f "$moddir/modules.dep" ] || die "$moddir/modules.dep missing"
say "kernel $kver ($(cat "$kernel_dir.pkg" 2>/dev/null || echo cached))"

# --- 3. Guest test binary, static if the toolchain allows. ------------------
host_target=x86_64-unknown-linux-gnu
if [ "$mode" != basic ]; then
    say "building the e1000e example"
    (
        cd "$root"
        CARGO_TARGET_DIR=$target_dir RUSTFLAGS="-C target-feature=+crt-static" \
            cargo build --release --quiet --target "$host_target" \
            --example e1000e --features vfio,bytes
    )
    guest_bin=$target_dir/$host_target/release/examples/e1000e
else
    say "building the guest test binary"
    (
        cd "$here/guest"
        CARGO_TARGET_DIR=$target_dir RUSTFLAGS="-C target-feature=+crt-static" \
            cargo build --release --quiet --target "$host_target"
    )
    guest_bin=$target_dir/$host_target/release/pagepool-vmtest
fi
[ -x "$guest_bin" ] || die "guest binary $guest_bin missing"

# --- 4. initramfs: busybox, VFIO modules, the binary, /init. ----------------
rootfs=$work/rootfs
rm -rf "$rootfs"
mkdir -p "$rootfs"/{bin,dev,proc,sys,tmp,etc,lib/modules}
cp "$busybox" "$rootfs/bin/busybox"
ln -s busybox "$rootfs/bin/sh"
cp "$guest_bin" "$rootfs/bin/$(basename "$guest_bin")"

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
# Mode e1000e: the kernel's own e1000e driver for NIC A, loaded by /init
# only after NIC B is bound to vfio-pci, so that it cannot claim both.
early=${#order[@]}
if [ "$mode" != basic ] && [ -n "${mod_path[e1000e]:-}" ]; then
    add_module e1000e
fi
for name in "${order[@]}"; do
    src=$moddir/${mod_path[$name]}
    case "$src" in
        *.ko.xz) xz -dc "$src" > "$rootfs/lib/modules/$name.ko" ;;
        *.ko.zst) zstd -qdc "$src" > "$rootfs/lib/modules/$name.ko" ;;
        *.ko.gz) gzip -dc "$src" > "$rootfs/lib/modules/$name.ko" ;;
        *) cp "$src" "$rootfs/lib/modules/$name.ko" ;;
    esac
done
printf '%s\n' "${order[@]:0:$early}" > "$rootfs/etc/modules.order"
printf '%s\n' "${order[@]:$early}" > "$rootfs/etc/modules.late"
say "modules: ${order[*]}"

if [ "$mode" = e1000e ]; then
e1000e_seconds=${VMTEST_E1000E_SECONDS:-8}
e1000e_runs=${VMTEST_E1000E_RUNS:-per-page regions}
for run in $e1000e_runs; do
    case "$run" in
        per-page | regions | regions-thp) ;;
        *) die "VMTEST_E1000E_RUNS: unknown run '$run' (per-page, regions or regions-thp)" ;;
    esac
done
cat > "$rootfs/init" <<EOF
#!/bin/sh
export PATH=/bin
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
echo "PAGEPOOL-E1000E: guest up, kernel \$(uname -r)"
for m in \$(cat /etc/modules.order); do
    insmod /lib/modules/\$m.ko || echo "PAGEPOOL-E1000E: insmod \$m failed"
done
nic_a=0000:00:02.0
nic_b=0000:00:03.0
rc=1
# NIC B goes to vfio-pci first; then the kernel's driver takes NIC A. (Were
# e1000e built in, it would hold NIC B already: let go of it first.)
if [ -e /sys/bus/pci/devices/\$nic_b/driver ]; then
    echo \$nic_b > /sys/bus/pci/devices/\$nic_b/driver/unbind
fi
echo vfio-pci > /sys/bus/pci/devices/\$nic_b/driver_override
echo \$nic_b > /sys/bus/pci/drivers_probe
for m in \$(cat /etc/modules.late); do
    insmod /lib/modules/\$m.ko || echo "PAGEPOOL-E1000E: insmod \$m failed"
done
i=0
while ! ls /sys/bus/pci/devices/\$nic_a/net >/dev/null 2>&1 && [ \$i -lt 100 ]; do
    sleep 0.1; i=\$((i + 1))
done
ifname=\$(ls /sys/bus/pci/devices/\$nic_a/net 2>/dev/null | head -n 1)
if [ -z "\$ifname" ]; then
    echo "PAGEPOOL-E1000E: the kernel's e1000e made no netdev for \$nic_a"
else
    # No duplicate address detection: the link-local address, and so the
    # pings below, work at once.
    echo 0 > /proc/sys/net/ipv6/conf/\$ifname/accept_dad
    ip link set \$ifname up
    i=0
    while [ "\$(cat /sys/class/net/\$ifname/carrier 2>/dev/null)" != 1 ] && [ \$i -lt 100 ]; do
        sleep 0.1; i=\$((i + 1))
    done
    echo "PAGEPOOL-E1000E: NIC A \$nic_a is \$ifname (\$(cat /sys/class/net/\$ifname/address), carrier \$(cat /sys/class/net/\$ifname/carrier), driver \$(basename \$(readlink /sys/bus/pci/devices/\$nic_a/driver))); NIC B \$nic_b bound to \$(basename \$(readlink /sys/bus/pci/devices/\$nic_b/driver)), group \$(basename \$(readlink /sys/bus/pci/devices/\$nic_b/iommu_group))"
    # Traffic from the kernel's NIC: pings to all-nodes (dst MAC
    # 33:33:00:00:00:01), payload 0xa5, two sizes.
    ping -6 -q -I \$ifname -i 0.01 -s 1000 -p a5 ff02::1 >/tmp/ping-big.log 2>&1 &
    ping_big=\$!
    ping -6 -q -I \$ifname -i 0.02 -s 56 -p a5 ff02::1 >/tmp/ping-small.log 2>&1 &
    ping_small=\$!
    # One driver run per pool mode, one after the other on the same NIC:
    # pools mapped page by page, then region-mapped pools (--regions).
    # Each must pass, and each must provoke its own DMAR write faults.
    rc=0
    for run in $e1000e_runs; do
        flag=
        if [ \$run = regions ]; then flag=--regions; fi
        # Regions from transparent huge pages, no reserved ones: a read
        # fault there can map the huge zero page.
        if [ \$run = regions-thp ]; then flag=--no-huge-tlb; fi
        before=\$(dmesg | grep -c 'DMAR: \[DMA Write NO_PASID\] Request device \[00:03.0\]')
        echo "PAGEPOOL-E1000E: run \$run: starting"
        /bin/e1000e \$nic_b --peer \$ifname --echo-pattern a5 --seconds $e1000e_seconds \
            --tx-frames 1000 --min-rx 200 --unplug-test \$flag ${VMTEST_ARGS:-}
        run_rc=\$?
        after=\$(dmesg | grep -c 'DMAR: \[DMA Write NO_PASID\] Request device \[00:03.0\]')
        echo "PAGEPOOL-E1000E: run \$run: driver exit \$run_rc, \$((after - before)) DMAR write faults for 00:03.0 in dmesg"
        if [ \$run_rc -ne 0 ] || [ \$after -le \$before ]; then rc=1; fi
    done
    kill \$ping_big \$ping_small 2>/dev/null
    cat /tmp/ping-big.log /tmp/ping-small.log
fi
echo "----- guest dmesg -----"
dmesg
echo "----- end of guest dmesg -----"
faults=\$(dmesg | grep -c 'DMAR: \[DMA Write NO_PASID\] Request device \[00:03.0\]')
if [ \$rc -eq 0 ] && [ \$faults -gt 0 ]; then
    echo "PAGEPOOL-E1000E: PASS"
else
    echo "PAGEPOOL-E1000E: FAIL (a driver run failed or provoked no DMAR write fault; \$faults for 00:03.0 in dmesg in all)"
fi
sync
poweroff -f
EOF
elif [ "$mode" = e1000e-removal ]; then
removal_seconds=${VMTEST_E1000E_SECONDS:-4}
removal_runs=${VMTEST_REMOVAL_RUNS:-driver remove unbind unplug}
for run in $removal_runs; do
    case "$run" in
        driver | remove | unbind | unplug) ;;
        *) die "VMTEST_REMOVAL_RUNS: unknown run '$run' (driver, remove, unbind or unplug)" ;;
    esac
done
cat > "$rootfs/init" <<EOF
#!/bin/sh
export PATH=/bin
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
echo "PAGEPOOL-REMOVAL: guest up, kernel \$(uname -r)"
for m in \$(cat /etc/modules.order); do
    insmod /lib/modules/\$m.ko || echo "PAGEPOOL-REMOVAL: insmod \$m failed"
done
nic_a=0000:00:02.0
# NIC B sits behind a hot-pluggable PCIe root port.
nic_b=0000:01:00.0
bind_b() {
    echo vfio-pci > /sys/bus/pci/devices/\$nic_b/driver_override
    # A rescan probes the new device at once, whatever drivers_autoprobe
    # says: the kernel's e1000e may hold it. Take it back.
    d=\$(basename \$(readlink /sys/bus/pci/devices/\$nic_b/driver 2>/dev/null) 2>/dev/null)
    if [ -n "\$d" ] && [ "\$d" != vfio-pci ]; then
        echo "PAGEPOOL-REMOVAL: \$nic_b came back bound to \$d: unbinding it"
        echo \$nic_b > /sys/bus/pci/devices/\$nic_b/driver/unbind
    fi
    echo \$nic_b > /sys/bus/pci/drivers_probe
    # The group's node must be there before the driver opens it.
    g=\$(basename \$(readlink /sys/bus/pci/devices/\$nic_b/iommu_group))
    i=0
    while [ ! -e /dev/vfio/\$g ] && [ \$i -lt 30 ]; do
        sleep 0.1; i=\$((i + 1))
    done
    echo "PAGEPOOL-REMOVAL: \$nic_b bound to \$(basename \$(readlink /sys/bus/pci/devices/\$nic_b/driver 2>/dev/null) 2>/dev/null), group \$g, /dev/vfio: \$(ls /dev/vfio | tr '\\n' ' ')"
}
if [ -e /sys/bus/pci/devices/\$nic_b/driver ]; then
    echo \$nic_b > /sys/bus/pci/devices/\$nic_b/driver/unbind
fi
bind_b
for m in \$(cat /etc/modules.late); do
    insmod /lib/modules/\$m.ko || echo "PAGEPOOL-REMOVAL: insmod \$m failed"
done
i=0
while ! ls /sys/bus/pci/devices/\$nic_a/net >/dev/null 2>&1 && [ \$i -lt 100 ]; do
    sleep 0.1; i=\$((i + 1))
done
ifname=\$(ls /sys/bus/pci/devices/\$nic_a/net 2>/dev/null | head -n 1)
rc=1
if [ -z "\$ifname" ]; then
    echo "PAGEPOOL-REMOVAL: the kernel's e1000e made no netdev for \$nic_a"
else
    echo 0 > /proc/sys/net/ipv6/conf/\$ifname/accept_dad
    ip link set \$ifname up
    i=0
    while [ "\$(cat /sys/class/net/\$ifname/carrier 2>/dev/null)" != 1 ] && [ \$i -lt 100 ]; do
        sleep 0.1; i=\$((i + 1))
    done
    echo "PAGEPOOL-REMOVAL: NIC A \$nic_a is \$ifname; NIC B \$nic_b bound to \$(basename \$(readlink /sys/bus/pci/devices/\$nic_b/driver)), group \$(basename \$(readlink /sys/bus/pci/devices/\$nic_b/iommu_group)), slot \$(cat /sys/bus/pci/slots/*/address 2>/dev/null | tr '\n' ' ')"
    ping -6 -q -I \$ifname -i 0.01 -s 1000 -p a5 ff02::1 >/tmp/ping-big.log 2>&1 &
    ping_big=\$!
    ping -6 -q -I \$ifname -i 0.02 -s 56 -p a5 ff02::1 >/tmp/ping-small.log 2>&1 &
    ping_small=\$!
    # More flows for RSS to spread over the two receive queues: the IPv6
    # hash covers source and destination, so each multicast group is a
    # flow of its own.
    flows=
    for g in 2 3 4 5 6 7 8 9; do
        ping -6 -q -I \$ifname -i 0.05 -s 200 -p a5 ff02::\$g >/dev/null 2>&1 &
        flows="\$flows \$!"
    done
    requests() { dmesg | grep -c 'Relaying device request to user'; }
    rc=0
    for run in $removal_runs; do
        echo "PAGEPOOL-REMOVAL: run \$run: starting"
        if [ ! -e /sys/bus/pci/devices/\$nic_b/driver ]; then
            echo "PAGEPOOL-REMOVAL: run \$run: \$nic_b is not bound"; rc=1; break
        fi
        before=\$(requests)
        if [ \$run = driver ]; then
            /bin/e1000e \$nic_b --peer \$ifname --echo-pattern a5 --seconds $removal_seconds \
                --tx-frames 500 --min-rx 100 --queues 2 ${VMTEST_ARGS:-}
            run_rc=\$?
        else
            rm -f /tmp/ready
            /bin/e1000e \$nic_b --peer \$ifname --echo-pattern a5 --seconds $removal_seconds \
                --tx-frames 500 --min-rx 100 --queues 2 --await-removal \$run --ready-file /tmp/ready \
                ${VMTEST_ARGS:-} &
            drv=\$!
            i=0
            while [ ! -e /tmp/ready ] && kill -0 \$drv 2>/dev/null && [ \$i -lt 1200 ]; do
                sleep 0.1; i=\$((i + 1))
            done
            trigger=
            case \$run in
                remove)
                    echo "PAGEPOOL-REMOVAL: run remove: echo 1 > /sys/bus/pci/devices/\$nic_b/remove"
                    echo 1 > /sys/bus/pci/devices/\$nic_b/remove &
                    trigger=\$! ;;
                unbind)
                    echo "PAGEPOOL-REMOVAL: run unbind: echo \$nic_b > /sys/bus/pci/drivers/vfio-pci/unbind"
                    echo \$nic_b > /sys/bus/pci/drivers/vfio-pci/unbind &
                    trigger=\$! ;;
                unplug)
                    # The host answers this line with QMP device_del.
                    echo "PAGEPOOL-REMOVAL: hot-unplug: ready for device_del" ;;
            esac
            wait \$drv
            run_rc=\$?
            if [ -n "\$trigger" ]; then wait \$trigger; fi
            if [ \$run = unplug ]; then
                i=0
                while [ -e /sys/bus/pci/devices/\$nic_b ] && [ \$i -lt 100 ]; do
                    sleep 0.1; i=\$((i + 1))
                done
            fi
        fi
        n=\$((\$(requests) - before))
        echo "PAGEPOOL-REMOVAL: run \$run: driver exit \$run_rc, the kernel logged the device request \$n time(s)"
        if [ \$run_rc -ne 0 ]; then rc=1; fi
        if [ \$run != driver ] && [ \$n -ne 1 ]; then
            echo "PAGEPOOL-REMOVAL: run \$run: FAIL: the request must be logged exactly once"; rc=1
        fi
        if [ \$run = driver ] && [ \$n -ne 0 ]; then rc=1; fi
        # Give the device back to vfio-pci for the next run.
        case \$run in
            remove)
                echo 1 > /sys/bus/pci/rescan
                i=0
                while [ ! -e /sys/bus/pci/devices/\$nic_b ] && [ \$i -lt 100 ]; do
                    sleep 0.1; i=\$((i + 1))
                done
                bind_b ;;
            unbind)
                bind_b ;;
            unplug)
                if [ -e /sys/bus/pci/devices/\$nic_b ]; then
                    echo "PAGEPOOL-REMOVAL: run unplug: FAIL: \$nic_b still present"; rc=1
                else
                    echo "PAGEPOOL-REMOVAL: run unplug: \$nic_b gone from sysfs"
                fi ;;
        esac
    done
    kill \$ping_big \$ping_small \$flows 2>/dev/null
    cat /tmp/ping-big.log /tmp/ping-small.log
fi
echo "----- guest dmesg -----"
dmesg
echo "----- end of guest dmesg -----"
if [ \$rc -eq 0 ]; then
    echo "PAGEPOOL-REMOVAL: PASS"
else
    echo "PAGEPOOL-REMOVAL: FAIL (a driver run or a removal check failed)"
fi
sync
poweroff -f
EOF
else
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
# Two e1000e, each in its own IOMMU group: the tests use the first, and the
# second only to try a second group in the first one's container.
bdf=
bdf2=
for d in /sys/bus/pci/devices/*; do
    if [ "\$(cat \$d/vendor)" = 0x8086 ] && [ "\$(cat \$d/device)" = 0x10d3 ]; then
        if [ -z "\$bdf" ]; then bdf=\${d##*/}; else bdf2=\${d##*/}; fi
    fi
done
rc=1
if [ -z "\$bdf" ]; then
    echo "PAGEPOOL-VMTEST: no e1000e (8086:10d3) found"
else
    for b in \$bdf \$bdf2; do
        echo vfio-pci > /sys/bus/pci/devices/\$b/driver_override
        echo \$b > /sys/bus/pci/drivers_probe
        echo "PAGEPOOL-VMTEST: \$b bound to \$(basename \$(readlink /sys/bus/pci/devices/\$b/driver)), group \$(basename \$(readlink /sys/bus/pci/devices/\$b/iommu_group))"
    done
    ls /dev/vfio
    PAGEPOOL_VMTEST_SECOND_BDF=\$bdf2 /bin/pagepool-vmtest \$bdf ${VMTEST_ARGS:-}
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
fi
chmod +x "$rootfs/init"
initrd=$work/initramfs.cpio.gz
(cd "$rootfs" && find . -print0 | cpio --null -o -H newc --quiet | gzip -1) > "$initrd"

# --- 5. Boot. ----------------------------------------------------------------
# Huge pages reserved at boot (2 MiB each) for the region-mapped pools,
# which take their regions from them: the basic mode's region tests map 64
# regions at once (and a 65th that the entry limit refuses), the e1000e
# mode's region run a few. The basic mode's memory leaves room for them
# (160 MiB) and for the same regions again without huge pages.
if [ "$mode" = e1000e ]; then
    # Two e1000e on one hub: what one sends, the other receives.
    nics=(-netdev hubport,id=a,hubid=0 -netdev hubport,id=b,hubid=0
          -device e1000e,netdev=a,addr=02.0 -device e1000e,netdev=b,addr=03.0)
    mem_mib=1024
    hugepages=16
elif [ "$mode" = e1000e-removal ]; then
    # NIC A on the root bus; NIC B behind a hot-pluggable PCIe root port
    # (01:00.0), unplugged by the guest's pciehp on QMP device_del (QEMU's
    # ACPI hotplug for q35 is turned off, so the native path runs).
    nics=(-netdev hubport,id=a,hubid=0 -netdev hubport,id=b,hubid=0
          -device e1000e,netdev=a,addr=02.0
          -device pcie-root-port,id=rp1,bus=pcie.0,chassis=1,slot=1,addr=04.0
          -device e1000e,netdev=b,bus=rp1,id=nicb
          -global ICH9-LPC.acpi-pci-hotplug-with-bridge-support=off
          -qmp "unix:$work/qmp.sock,server=on,wait=off")
    mem_mib=1024
    hugepages=16
else
    nics=(-device e1000e,netdev=n0 -netdev user,id=n0,restrict=on
          -device e1000e,netdev=n1 -netdev user,id=n1,restrict=on)
    mem_mib=1536
    hugepages=80
fi
qmp_pid=
qmp_result=$work/qmp.result
if [ "$mode" = e1000e-removal ]; then
    rm -f "$work/qmp.sock" "$qmp_result"
    : > "$log"
    # The QMP side of the hot-unplug: waits for the guest's "ready for
    # device_del" line on the console, sends device_del, and times, on the
    # host clock, the device request reaching the driver (its console line)
    # and DEVICE_DELETED.
    cat > "$work/qmp.py" <<'EOF'
import json, os, select, socket, sys, time

sock_path, console, result = sys.argv[1:4]
READY = b"PAGEPOOL-REMOVAL: hot-unplug: ready for device_del"
REQUEST = b"e1000e: removal: device request received"
END = b"----- guest dmesg -----"

def out(line):
    with open(result, "a") as f:
        f.write(line + "\n")
    print("vmtest: qmp: " + line, file=sys.stderr, flush=True)

deadline = time.monotonic() + 30
while True:
    try:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(sock_path)
        break
    except OSError:
        s.close()
        if time.monotonic() > deadline:
            out("FAIL no QMP socket")
            sys.exit(1)
        time.sleep(0.1)
buf = b""
def messages(timeout):
    global buf
    r, _, _ = select.select([s], [], [], timeout)
    if r:
        data = s.recv(65536)
        if not data:
            raise EOFError
        buf += data
    while b"\n" in buf:
        line, buf = buf.split(b"\n", 1)
        if line.strip():
            yield json.loads(line)
def command(cmd):
    s.sendall(json.dumps(cmd).encode() + b"\n")
def console_has(text, pos):
    with open(console, "rb") as f:
        f.seek(pos)
        data = f.read()
    i = data.find(text)
    return (pos + i if i >= 0 else None), pos + max(0, len(data) - len(text))

command({"execute": "qmp_capabilities"})
pos = 0
try:
    while True:
        list(messages(0.05))
        at, pos = console_has(READY, pos)
        if at is not None:
            pos = at
            break
        _, end_pos = console_has(END, 0)
        if console_has(END, 0)[0] is not None:
            out("SKIP the guest never asked for device_del")
            sys.exit(0)
    t0 = time.monotonic()
    command({"execute": "device_del", "arguments": {"id": "nicb"}})
    t_req = t_del = None
    while t_del is None or t_req is None:
        for m in messages(0.002):
            if m.get("event") == "DEVICE_DELETED" and m.get("data", {}).get("device") == "nicb":
                t_del = time.monotonic()
            if "error" in m:
                out("FAIL device_del: " + json.dumps(m["error"]))
                sys.exit(1)
        if t_req is None:
            at, _ = console_has(REQUEST, pos)
            if at is not None:
                t_req = time.monotonic()
        if time.monotonic() - t0 > 60:
            break
except EOFError:
    pass
if t_req is None or t_del is None:
    out("FAIL device_del: request seen %s, DEVICE_DELETED seen %s" % (t_req is not None, t_del is not None))
    sys.exit(1)
out("UNPLUG device_del_to_request_ms=%.0f request_to_device_deleted_ms=%.0f device_del_to_device_deleted_ms=%.0f"
    % ((t_req - t0) * 1e3, (t_del - t_req) * 1e3, (t_del - t0) * 1e3))
EOF
    python3 "$work/qmp.py" "$work/qmp.sock" "$log" "$qmp_result" &
    qmp_pid=$!
fi
say "booting QEMU ($accel, timeout ${timeout_s}s), console log: $log"
boot_started=$(date +%s)
qemu_rc=0
timeout "$timeout_s" qemu-system-x86_64 \
    -machine q35,kernel-irqchip=split -accel "$accel" -cpu max -m "$mem_mib" -smp 1 \
    -nographic -no-reboot \
    -device intel-iommu,intremap=on,caching-mode=on \
    "${nics[@]}" \
    -kernel "$vmlinuz" -initrd "$initrd" \
    -append "console=ttyS0 intel_iommu=on iommu=strict panic=-1 hugepages=$hugepages" \
    </dev/null 2>&1 | tee "$log" || qemu_rc=$?
finished=$(date +%s)
if [ -n "$qmp_pid" ]; then
    kill "$qmp_pid" 2>/dev/null || true
    wait "$qmp_pid" 2>/dev/null || true
fi

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
if ! grep -qx "$tag: PASS" "$clean"; then
    say "FAIL: no '$tag: PASS' line in the console log"
    status=1
fi
bad='WARNING:|BUG:|Oops|Kernel panic|general protection fault|Call Trace:|DMAR: \[DMA (Read|Write)|DMAR: DRHD: handling fault|^\[ *[0-9]+\.[0-9]+\] .*vfio.*(WARN|[Ee]rror|[Ff]ail)'
checked=$clean
if [ "$mode" = e1000e-removal ]; then
    n_runs=$(wc -w <<< "$removal_runs")
    started_runs=$(grep -cE "^$tag: run [a-z]+: starting\$" "$clean" || true)
    if [ "$started_runs" -ne "$n_runs" ]; then
        say "FAIL: $n_runs driver runs wanted, $started_runs started"
        status=1
    fi
    # The figures, one line per removal, for scripts and for people.
    grep -E '^e1000e: REMOVAL |^PAGEPOOL-REMOVAL: run [a-z]+: driver exit|^e1000e: DMA_AVAIL ' "$clean" >&2 || true
    if grep -qw unplug <<< "$removal_runs"; then
        unplug_line=$(grep '^UNPLUG ' "$qmp_result" 2>/dev/null || true)
        if [ -z "$unplug_line" ]; then
            say "FAIL: no QMP hot-unplug figures ($(cat "$qmp_result" 2>/dev/null || echo 'no result file'))"
            status=1
        else
            ms=$(sed -E 's/.*request_to_device_deleted_ms=([0-9]+).*/\1/' <<< "$unplug_line")
            say "QMP $unplug_line"
            # After the device is gone, pciehp powers the slot off and
            # sleeps 1 s (remove_board: the PCIe spec's wait before relying
            # on power being off) before it turns the power indicator off,
            # which is when QEMU emits DEVICE_DELETED. That second is the
            # kernel's by design, like the 5 s attention-button wait before
            # the request: it is allowed on top of the 1 s bound, and
            # reported apart.
            pciehp_wait_ms=1000
            say "hot-unplug: request -> DEVICE_DELETED ${ms} ms, of which ${pciehp_wait_ms} ms is pciehp's wait after powering the slot off: $((ms - pciehp_wait_ms)) ms beyond it (bound 1000 ms)"
            if [ $((ms - pciehp_wait_ms)) -ge 1000 ]; then
                say "FAIL: DEVICE_DELETED came ${ms} ms after the request reached the driver (bound 1000 ms plus pciehp's ${pciehp_wait_ms} ms)"
                status=1
            fi
        fi
    fi
fi
if [ "$mode" = e1000e ]; then
    # Each driver run's unplug experiment makes NIC B (00:03.0) write to
    # IOVAs that are no longer mapped: those DMAR write faults are required
    # in every run, they must come after that run announced its re-arm, and
    # no other fault is allowed. Runs are delimited by the init's "run X:
    # starting" lines; the dmesg dump at the end repeats the kernel lines
    # and is left out of the ordering check. Every other line is checked as
    # in the basic mode.
    expected='DMAR: \[DMA Write NO_PASID\] Request device \[00:03\.0\] fault addr|DMAR: DRHD: handling fault status reg'
    fault_line='^\[ *[0-9]+\.[0-9]+\] DMAR: \[DMA Write NO_PASID\] Request device \[00:03\.0\]'
    marker='e1000e: unplug: re-arming the RX ring'
    live_end=$(grep -nxF -- '----- guest dmesg -----' "$clean" | head -n 1 | cut -d: -f1)
    [ -n "$live_end" ] || live_end=$(wc -l < "$clean")
    mapfile -t starts < <(head -n "$live_end" "$clean" | grep -nE "^$tag: run [a-z-]+: starting\$" | cut -d: -f1)
    mapfile -t faults < <(head -n "$live_end" "$clean" | grep -nE "$expected" | cut -d: -f1)
    n_runs=$(wc -w <<< "$e1000e_runs")
    if [ "${#starts[@]}" -ne "$n_runs" ]; then
        say "FAIL: $n_runs driver runs wanted, ${#starts[@]} started"
        status=1
    fi
    if [ "${#starts[@]}" -gt 0 ] && [ "${#faults[@]}" -gt 0 ] && [ "${faults[0]}" -lt "${starts[0]}" ]; then
        say "FAIL: a DMAR fault (line ${faults[0]}) came before the first driver run"
        status=1
    fi
    for i in "${!starts[@]}"; do
        from=${starts[$i]}
        to=$live_end
        if [ $((i + 1)) -lt ${#starts[@]} ]; then to=$((starts[i + 1] - 1)); fi
        run=$(sed -n "${from}p" "$clean" | sed -E "s/^$tag: run ([a-z-]+): starting\$/\1/")
        segment() { sed -n "${from},${to}p" "$clean"; }
        marker_at=$(segment | grep -nF "$marker" | head -n 1 | cut -d: -f1)
        first_at=$(segment | grep -nE "$expected" | head -n 1 | cut -d: -f1)
        n_faults=$(segment | grep -cE "$fault_line" || true)
        if [ "$n_faults" -eq 0 ]; then
            say "FAIL: run $run: no DMAR write fault for 00:03.0"
            status=1
        elif [ -z "$marker_at" ] || [ "$first_at" -lt "$marker_at" ]; then
            say "FAIL: run $run: a DMAR fault (line $((from + first_at - 1))) came before its re-arm (line $((from + ${marker_at:-1} - 1)))"
            status=1
        else
            say "run $run: $n_faults DMAR write-fault lines for 00:03.0 on the console, all after its re-arm"
        fi
    done
    checked=$work/console.checked.log
    grep -vE "$expected" "$clean" > "$checked" || true
fi
if grep -E "$bad" "$checked" >/dev/null; then
    say "FAIL: the guest kernel log has warnings or faults:"
    grep -E "$bad" "$checked" | sort -u | head -n 20 >&2
    status=1
fi
say "QEMU ran $((finished - boot_started))s; whole run $((finished - started))s"
if [ "$status" -eq 0 ]; then
    say "PASS"
fi
exit "$status"
