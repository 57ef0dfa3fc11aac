#!/usr/bin/env bash
# usage: scripts/guest-vm.sh [OPTIONS] [-- COMMAND...]
# Boots a throw-away guest (Debian kernel + busybox initramfs; qemu-system-x86_64, TCG, q35, qboot)
# to test vireo's PCI transport, runs COMMAND as root with /bin/sh, prints the serial console with
# the command's output between "=== guest-cmd begin ===" and "=== guest-cmd end rc=N ===" and
# exits with N (125: no end marker, e.g. timeout). Without COMMAND: a shell on the console.
# Devices (QEMU ids in quotes; every option is repeatable):
#   --scsi-img FILE         raw image as scsi-hd LUN 0, 1, ... of virtio-scsi-pci "scsi0"
#   --scsi2-img FILE        the same on a second virtio-scsi-pci "scsi1"
#   --blk-img FILE          raw image on virtio-blk-pci "blk0", "blk1", ...
#   --vhost-user-blk SOCK   vhost-user-blk-pci "vublk0", ...
#   --vhost-user-scsi SOCK  vhost-user-scsi-pci "vuscsi0", ...
#   Each has its own pcie-root-port (hot-removable); in the guest the n-th one above is 0n:00.0.
# Options:
#   --add SRC[:DST]         copy a file or directory into the guest (DST default /extra/NAME; a
#                           relative DST is under /extra, DST/ a dir); ELF files bring their libraries
#   --mem SIZE              guest RAM, memfd-backed with share=on for vhost-user (default 512M)
#   --smp N                 QEMU's -smp value (default 1,maxcpus=2: one vCPU, but TCG then
#                           makes the guest's locked instructions atomic and ordering; with a
#                           plain 1 it does not, and Linux's virtio drivers, whose barriers are
#                           locked instructions, can lose a notification while probing disks)
#   --modern                modern-only virtio devices (disable-legacy=on); default: transitional
#   --packed                the emulated virtio-scsi-pci and virtio-blk-pci devices offer packed
#                           virtqueues (packed=on); vhost-user devices are not changed
#   --viommu                intel-iommu (intremap, caching-mode, QEMU's default aw-bits: 48 in QEMU
#                           10; for 39 add --qemu-arg -global --qemu-arg intel-iommu.aw-bits=39);
#                           emulated devices get iommu_platform=on; implies --modern
#   --kver VER              Debian kernel ABI for this run (e.g. 6.12.95+deb12-amd64 from
#                           bookworm-backports: ublk_drv, vduse, vhost_vdpa); default below
#   --mod NAME              also load kernel module NAME and its dependencies at boot (.ko.xz,
#                           .ko.zst decompressed into the initramfs); repeatable
#   --append STR            extra kernel command line, e.g. hugepages=64
#   --qemu-arg ARG          extra QEMU argument (repeatable)
#   --timeout SEC           kill QEMU after SEC seconds (default 300)
#   --monitor SOCK          HMP monitor on unix socket SOCK (e.g. "device_del blk0" hot-removes)
#   --print-qemu            print the QEMU command line on stderr
# In the guest (files added with --add are on PATH and win over busybox applets of that name):
#   vbind DRIVER BDF...     rebind PCI functions (vfio-pci, uio_pci_generic, virtio-pci; none: unbind)
#   vdevs                   list PCI functions: BDF vendor device class driver
# Environment: VIREO_GUEST_CACHE (default ~/.cache/vireo-guest); VIREO_GUEST_KVER (Debian kernel
# ABI; default: the newest linux-image-6.1.*-amd64 apt knows, chosen once); VIREO_GUEST_KERNEL
# (own bzImage with the drivers built in: no modules are loaded).
set -euo pipefail

usage() { sed -n '2,/^set -e/s/^# \{0,1\}//p' "$0"; }
die() { echo "guest-vm.sh: $*" >&2; exit 2; }
SELF=$(realpath "$0")
CACHE=${VIREO_GUEST_CACHE:-$HOME/.cache/vireo-guest}
MEM=512M SMP=1,maxcpus=2 TIMEOUT=300 APPEND="" MODERN="" VIOMMU="" MONITOR="" PRINT="" PACKED=""
adds=() scsi=() scsi2=() blk=() vublk=() vuscsi=() qextra=() xmods=() OPT_KVER=""
while [ $# -gt 0 ]; do
  opt=$1 && shift
  case $opt in
    --modern) MODERN=1 && continue ;;
    --packed) PACKED=1 && continue ;;
    --viommu) VIOMMU=1 MODERN=1 && continue ;;
    --print-qemu) PRINT=1 && continue ;;
    -h | --help) usage && exit 0 ;;
    --) break ;;
    [!-]*) set -- "$opt" "$@" && break ;;
  esac
  arg=${1-}
  case $opt in
    --add) adds+=("$arg") ;;
    --scsi-img) scsi+=("$arg") ;;
    --scsi2-img) scsi2+=("$arg") ;;
    --blk-img) blk+=("$arg") ;;
    --vhost-user-blk) vublk+=("$arg") ;;
    --vhost-user-scsi) vuscsi+=("$arg") ;;
    --mem) MEM=$arg ;;
    --smp) SMP=$arg ;;
    --append) APPEND=$arg ;;
    --kver) OPT_KVER=$arg ;;
    --mod) xmods+=("$arg") ;;
    --qemu-arg) qextra+=("$arg") ;;
    --timeout) TIMEOUT=$arg ;;
    --monitor) MONITOR=$arg ;;
    *) die "unknown option: $opt (see --help)" ;;
  esac
  [ $# -ge 1 ] && shift || die "$opt needs an argument (see --help)"
done
CMD="$*"
command -v qemu-system-x86_64 >/dev/null ||
  die "qemu-system-x86_64 not found: install qemu-system-x86 from bookworm-backports, see .ci/run"
command -v cpio >/dev/null || die "cpio not found: apt-get install cpio"

# ---- kernel and base initramfs: built once per kernel, cached ----
fetch_deb() { # PACKAGE: print the path of its .deb in $CACHE/debs, downloading it if needed
  mkdir -p "$CACHE/debs"
  ls "$CACHE/debs/$1"_*.deb >/dev/null 2>&1 || (cd "$CACHE/debs" &&
    apt-get -q -o APT::Sandbox::User=root download "$1" >&2) || die "apt-get download $1 failed"
  ls "$CACHE/debs/$1"_*.deb | head -1
}
if [ -n "${VIREO_GUEST_KERNEL:-}" ]; then
  KERNEL=$(realpath "$VIREO_GUEST_KERNEL")
  G=$CACHE/custom-$(echo "$KERNEL $(stat -c %Y "$KERNEL")" | md5sum | cut -c1-12)
else
  mkdir -p "$CACHE" # the default kernel is chosen once (delete $CACHE/default-kver to choose again)
  [ -n "${VIREO_GUEST_KVER:-}" ] || [ -s "$CACHE/default-kver" ] || apt-cache search --names-only \
    '^linux-image-6\.1\.[0-9.-]*-amd64$' | sed 's/^linux-image-\([^ ]*\) .*/\1/' | sort -V | tail -1 >"$CACHE/default-kver"
  KVER=${OPT_KVER:-${VIREO_GUEST_KVER:-$(cat "$CACHE/default-kver")}}
  KVER=${KVER:-6.1.0-56-amd64}
  G=$CACHE/$KVER
  # extra modules make their own base initramfs
  [ ${#xmods[@]} -eq 0 ] || G=$G-$(echo "${xmods[*]}" | md5sum | cut -c1-8)
fi
W=$(mktemp -d /tmp/guest-vm.XXXXXX)
trap 'rm -rf "$W"' EXIT

build_base() {
  local T=$W/base R=$W/base/root MD m f
  echo "guest-vm.sh: building the base initramfs in $G" >&2
  mkdir -p "$R"/{bin,proc,sys,dev,tmp,extra,mods} "$G"
  { [ -x /bin/busybox ] && ! ldd /bin/busybox >/dev/null 2>&1 && cp /bin/busybox "$R/bin/"; } || # static one
    dpkg-deb --fsys-tarfile "$(fetch_deb busybox-static)" | tar -xO ./bin/busybox >"$R/bin/busybox"
  chmod 755 "$R/bin/busybox"
  if [ -n "${KERNEL:-}" ]; then
    cp "$KERNEL" "$T/vmlinuz"
  else
    mkdir "$T/k"
    dpkg-deb --fsys-tarfile "$(fetch_deb "linux-image-$KVER")" | tar -x -C "$T/k" --wildcards \
      "./boot/vmlinuz-$KVER" "*/modules/$KVER/kernel/*" "*/modules/$KVER/modules.builtin"
    cp "$T/k/boot/vmlinuz-$KVER" "$T/vmlinuz"
    MD=$(dirname "$(find "$T/k" -type d -path "*/modules/$KVER/kernel" | head -1)")
    # module name -> file; dependencies come from the "depends=" in each module's .modinfo
    declare -A ko=() seen=()
    while IFS= read -r f; do m=${f##*/} && m=${m%%.ko*} && ko[${m//-/_}]=$f; done < <(find "$MD/kernel" -name '*.ko*')
    add_mod() {
      local m=${1//-/_} f d
      [ -z "${seen[$m]:-}" ] || return 0
      seen[$m]=1 f=${ko[$m]:-}
      if [ -z "$f" ]; then
        grep -q "/${1//[-_]/[-_]}\.ko" "$MD/modules.builtin" || die "module $m not in linux-image-$KVER"
        return 0
      fi
      case $f in # busybox insmod may not read compressed modules
        *.xz) xz -dc "$f" ;; *.zst) zstd -qdc "$f" ;; *.gz) gzip -dc "$f" ;; *) cat "$f" ;;
      esac >"$R/mods/$m.ko"
      for d in $(tr '\0' '\n' <"$R/mods/$m.ko" | sed -n 's/^depends=//p' | tr , ' '); do add_mod "$d"; done
      echo "$m" >>"$R/mods/order" # after its dependencies
    }
    for m in virtio_pci virtio_blk virtio_scsi sd_mod vfio vfio_iommu_type1 vfio_pci uio uio_pci_generic \
      ${xmods[@]+"${xmods[@]}"}; do add_mod "$m"; done
  fi
  cat >"$R/init" <<'EOF'
#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/extra/bin:/extra:/bin HOME=/tmp
mount -t proc proc /proc; mount -t sysfs sysfs /sys; mount -t devtmpfs devtmpfs /dev; mount -t tmpfs tmpfs /tmp
mkdir -p /dev/hugepages && mount -t hugetlbfs hugetlbfs /dev/hugepages
echo >/proc/sys/kernel/modprobe # no module autoloading: what is needed is loaded here
for m in $(cat /mods/order 2>/dev/null); do
  case $m in vfio) p=enable_unsafe_noiommu_mode=1 ;; vfio_iommu_type1) p=allow_unsafe_interrupts=1 ;; *) p= ;; esac
  insmod /mods/$m.ko $p || echo "guest-vm: insmod $m failed"
done
. /guest-env
n=0 # wait (at most 5 s) for the virtio disks
while [ $(ls /sys/block | grep -c '^[sv]d') -lt $NDISKS ] && [ $n -lt 50 ]; do sleep 0.1; n=$((n + 1)); done
echo "guest-vm: up after $(cut -d' ' -f1 /proc/uptime)s, disks: $(ls /sys/block | grep '^[sv]d' | tr '\n' ' ')"
# busybox's sh runs its applets before searching PATH: functions let added programs win
for f in /extra/* /extra/bin/*; do
  [ -f $f ] && [ -x $f ] && busybox --list | grep -qx "${f##*/}" && echo "${f##*/}() { $f \"\$@\"; }"
done >/tmp/.shadow
export ENV=/tmp/.shadow
cd /tmp
if [ -f /guest-cmd ]; then
  echo "=== guest-cmd begin ==="
  sh -c '. /tmp/.shadow; . /guest-cmd' </dev/null
  echo "=== guest-cmd end rc=$? ==="
else
  setsid cttyhack sh
fi
poweroff -f
EOF
  cat >"$R/bin/vbind" <<'EOF'
#!/bin/sh
# vbind DRIVER BDF...: bind PCI functions to DRIVER with driver_override ("none": only unbind)
[ $# -ge 2 ] || { echo "usage: vbind DRIVER BDF..." >&2; exit 2; }
drv=$1 rc=0; shift
for b in "$@"; do
  case $b in *:*:*) ;; *) b=0000:$b ;; esac
  d=/sys/bus/pci/devices/$b
  [ -d $d ] || { echo "vbind: no PCI function $b" >&2; rc=1; continue; }
  [ $drv = none ] && echo >$d/driver_override || echo $drv >$d/driver_override
  [ -e $d/driver ] && echo $b >$d/driver/unbind
  [ $drv = none ] || echo $b >/sys/bus/pci/drivers_probe
  now=$(basename "$(readlink $d/driver)" 2>/dev/null); echo "$b ${now:--}"
  [ $drv = none ] || [ "$now" = $drv ] || rc=1
done
exit $rc
EOF
  cat >"$R/bin/vdevs" <<'EOF'
#!/bin/sh
# vdevs: list PCI functions as "BDF vendor device class driver"
for d in /sys/bus/pci/devices/*; do
  [ -r $d/vendor ] || continue # being hot-removed
  drv=-; [ -e $d/driver ] && drv=$(basename "$(readlink $d/driver)")
  echo "${d##*/} $(cat $d/vendor) $(cat $d/device) $(cat $d/class) $drv"
done
EOF
  chmod 755 "$R/init" "$R/bin/vbind" "$R/bin/vdevs"
  (cd "$R" && find . | cpio -o -H newc --quiet) >"$T/base.cpio"
  mv "$T/vmlinuz" "$T/base.cpio" "$G/" && rm -rf "$T"
}
if [ ! -s "$G/base.cpio" ] || [ ! -s "$G/vmlinuz" ] || [ "$SELF" -nt "$G/base.cpio" ]; then build_base; fi

# ---- per-run overlay: added files, the command, how many disks to wait for ----
O=$W/root
mkdir -p "$O/extra"
put() { # SRC GUEST-PATH; ELF files bring their shared libraries and the loader (ldd)
  local f lib
  mkdir -p "$O$(dirname "$2")" && cp -a "$1" "$O$2"
  while IFS= read -r f; do
    [ "$(head -c4 "$f" | tail -c3)" = ELF ] || continue
    for lib in $(ldd "$f" 2>/dev/null | grep -o '/[^ ]*' || true); do
      [ -e "$O$lib" ] || { mkdir -p "$O$(dirname "$lib")" && cp -L "$lib" "$O$lib"; }
    done
  done < <(find -L "$1" -type f -perm -u+x)
}
for a in ${adds[@]+"${adds[@]}"}; do
  src=${a%%:*} dst=${a#*:}
  [ -e "$src" ] || die "--add: $src does not exist"
  [ "$dst" != "$a" ] || dst=""
  case $dst in "" | */) dst=$dst$(basename "$src") ;; esac # DST/ is a directory
  case $dst in /*) ;; *) dst=/extra/$dst ;; esac
  put "$src" "$dst"
done
[ -z "$CMD" ] || printf '%s\n' "$CMD" >"$O/guest-cmd"
echo "NDISKS=$((${#scsi[@]} + ${#scsi2[@]} + ${#blk[@]} + ${#vublk[@]} + ${#vuscsi[@]}))" >"$O/guest-env"
(cd "$O" && find . | cpio -o -H newc --quiet) | cat "$G/base.cpio" - >"$W/initrd"

# ---- QEMU ----
# quiet, but a task stuck for 30 s (a driver waiting on a device) is still reported, by name.
# no_timer_check: Linux times the IO-APIC timer against the TSC over ~60 ms at boot; under
# TCG on a loaded host QEMU's main loop may deliver too few PIT ticks in that window, and
# with interrupt remapping (--viommu) Linux then panics ("timer doesn't work through
# Interrupt-remapped IO-APIC") instead of trying another route. Linux skips the check itself
# on hypervisors it recognises (KVM, VMware, Hyper-V); it cannot recognise TCG.
cmdline="console=ttyS0 panic=-1 quiet no_timer_check sysctl.kernel.hung_task_timeout_secs=30"
cmdline+=" vfio.enable_unsafe_noiommu_mode=1 vfio_iommu_type1.allow_unsafe_interrupts=1"
machine=q35,memory-backend=mem0
leg=,disable-legacy=off # explicit: behind a PCIe root port QEMU would drop the legacy interface
[ -z "$MODERN" ] || leg=,disable-legacy=on
iop=""
q=(qemu-system-x86_64 -nodefaults -no-user-config -display none -no-reboot -serial stdio
  -accel tcg -cpu max -bios qboot.rom -m "$MEM" -smp "$SMP"
  -object "memory-backend-memfd,id=mem0,size=$MEM,share=on")
if [ -n "$VIOMMU" ]; then
  machine+=,kernel-irqchip=split
  cmdline+=" intel_iommu=on iommu=pt"
  q+=(-device intel-iommu,intremap=on,caching-mode=on)
  iop=,iommu_platform=on # emulated devices only: vhost-user backends would need IOTLB support
fi
[ -z "$PACKED" ] || iop+=,packed=on # emulated devices only (QEMU's own ring code)
[ -z "$MONITOR" ] || q+=(-monitor "unix:$MONITOR,server,nowait")
port=0
dev() { # DEVICE-ARGS: plug behind a new pcie-root-port. qboot numbers the buses from the highest
  port=$((port + 1)) # slot down, so the port at slot 0x18-n gets bus n
  q+=(-device "pcie-root-port,id=rp$port,chassis=$port,addr=$(printf %x $((0x18 - port)))" -device "$1,bus=rp$port")
}
scsi_ctrl() { # ID IMAGE...: a virtio-scsi-pci controller with one scsi-hd LUN per image
  local id=$1 i=-1 f
  shift && [ $# = 0 ] || dev "virtio-scsi-pci,id=$id$leg$iop"
  for f in "$@"; do
    i=$((i + 1)) && q+=(-drive "if=none,id=$id-$i,file=$f,format=raw,cache=unsafe")
    q+=(-device "scsi-hd,drive=$id-$i,bus=$id.0,lun=$i")
  done
}
scsi_ctrl scsi0 ${scsi[@]+"${scsi[@]}"}
scsi_ctrl scsi1 ${scsi2[@]+"${scsi2[@]}"}
for i in ${!blk[@]}; do
  q+=(-drive "if=none,id=blk$i-drive,file=${blk[i]},format=raw,cache=unsafe")
  dev "virtio-blk-pci,id=blk$i,drive=blk$i-drive$leg$iop"
done
for i in ${!vublk[@]}; do
  q+=(-chardev "socket,id=vublk$i-sock,path=${vublk[i]}")
  dev "vhost-user-blk-pci,id=vublk$i,chardev=vublk$i-sock,num-queues=1$leg"
done
for i in ${!vuscsi[@]}; do # param_change=off: vhost-device-scsi rejects a feature it did not offer
  q+=(-chardev "socket,id=vuscsi$i-sock,path=${vuscsi[i]}")
  dev "vhost-user-scsi-pci,id=vuscsi$i,chardev=vuscsi$i-sock,num_queues=1,param_change=off$leg"
done
q+=(-machine "$machine" -kernel "$G/vmlinuz" -initrd "$W/initrd" -append "$cmdline${APPEND:+ $APPEND}")
q+=(${qextra[@]+"${qextra[@]}"})
[ -z "$PRINT" ] || echo "${q[*]}" >&2
if [ -z "$CMD" ]; then "${q[@]}"; exit; fi # interactive

set +e
timeout --foreground -k 5 "$TIMEOUT" "${q[@]}" </dev/null 2>&1 | sed -u 's/\r//g' | tee "$W/console"
qrc=${PIPESTATUS[0]}
set -e
rc=$(sed -n 's/.*=== guest-cmd end rc=\([0-9]*\) ===.*/\1/p' "$W/console" | tail -1)
[ "$qrc" != 124 ] || qrc="124: timed out after ${TIMEOUT}s"
[ -n "$rc" ] || { echo "guest-vm.sh: no end marker (qemu exit status $qrc)" >&2; exit 125; }
exit "$rc"
