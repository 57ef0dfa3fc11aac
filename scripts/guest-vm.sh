#!/usr/bin/env bash
# Boot a throw-away Linux guest under QEMU (TCG), run one shell command in it as root, print the
# serial console and exit with the command's status. Used to test vireo's PCI transport
# (vfio-pci / uio_pci_generic) against QEMU's virtio-scsi/blk and vhost-user devices.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: scripts/guest-vm.sh [OPTIONS] [-- COMMAND...]
Boots a Debian kernel + busybox initramfs under qemu-system-x86_64 (TCG, q35, qboot), runs
COMMAND with /bin/sh, prints its output between "=== guest-cmd begin ===" and
"=== guest-cmd end rc=N ===" and exits with N (125: no end marker, e.g. timeout or crash).
Without COMMAND: an interactive shell on the console.
  --add SRC[:DST]         copy a file/dir into the guest (DST default /extra/NAME; relative DST is
                          under /extra); ELF executables bring their shared libraries (ldd)
  --scsi-img FILE         raw image as a scsi-hd LUN on virtio-scsi-pci "scsi0" (repeat: lun=1,2..)
  --scsi2-img FILE        same on a second controller "scsi1"
  --blk-img FILE          raw image on virtio-blk-pci "blk0", "blk1", ...
  --vhost-user-blk SOCK   vhost-user-blk-pci "vublk0", ... (repeatable)
  --vhost-user-scsi SOCK  vhost-user-scsi-pci "vuscsi0", ... (repeatable)
  --mem SIZE              guest RAM, memfd-backed with share=on (default 512M)
  --smp N                 vCPUs (default 1)
  --modern                modern-only virtio devices (disable-legacy=on); default: transitional
  --viommu                intel-iommu (intremap, caching-mode); emulated devices get
                          iommu_platform=on; implies --modern; vfio-pci then works in type1 mode
  --append STR            extra kernel command line, e.g. hugepages=64
  --qemu-arg ARG          extra QEMU argument (repeatable)
  --timeout SEC           kill QEMU after SEC seconds (default 300)
  --monitor SOCK          HMP monitor on unix socket SOCK (e.g. "device_del blk0" to hot-remove)
  --print-qemu            print the QEMU command line on stderr
Each device sits behind its own pcie-root-port (so device_del works). In the guest:
  vbind DRIVER BDF...     rebind PCI functions (vfio-pci, uio_pci_generic, virtio-pci; "none" unbinds)
  vdevs                   list PCI functions: BDF vendor device class driver
Environment: VIREO_GUEST_CACHE (default ~/.cache/vireo-guest), VIREO_GUEST_KVER (Debian kernel
ABI, default the newest linux-image-6.1.*-amd64 apt knows), VIREO_GUEST_KERNEL (own bzImage with
all drivers built in; no modules are loaded).
EOF
}

die() { echo "guest-vm.sh: $*" >&2; exit 2; }
SELF=$(realpath "$0")
CACHE=${VIREO_GUEST_CACHE:-$HOME/.cache/vireo-guest}
MEM=512M SMP=1 TIMEOUT=300 APPEND="" MODERN="" VIOMMU="" MONITOR="" PRINT=""
adds=() scsi=() scsi2=() blk=() vublk=() vuscsi=() qextra=()
while [ $# -gt 0 ]; do
  opt=$1
  shift
  case $opt in
    --modern) MODERN=1; continue ;;
    --viommu) VIOMMU=1 MODERN=1; continue ;;
    --print-qemu) PRINT=1; continue ;;
    -h | --help) usage; exit 0 ;;
    --) break ;;
  esac
  [ $# -ge 1 ] || die "$opt needs an argument (see --help)"
  arg=$1
  shift
  case $opt in
    --add) adds+=("$arg") ;;
    --scsi-img) scsi+=("$(realpath "$arg")") ;;
    --scsi2-img) scsi2+=("$(realpath "$arg")") ;;
    --blk-img) blk+=("$(realpath "$arg")") ;;
    --vhost-user-blk) vublk+=("$arg") ;;
    --vhost-user-scsi) vuscsi+=("$arg") ;;
    --mem) MEM=$arg ;;
    --smp) SMP=$arg ;;
    --append) APPEND=$arg ;;
    --qemu-arg) qextra+=("$arg") ;;
    --timeout) TIMEOUT=$arg ;;
    --monitor) MONITOR=$arg ;;
    *) die "unknown option: $opt (see --help)" ;;
  esac
done
CMD="$*"

command -v qemu-system-x86_64 >/dev/null ||
  die "qemu-system-x86_64 not found: install qemu-system-x86 from bookworm-backports, see .ci/run"
command -v cpio >/dev/null || die "cpio not found: apt-get install cpio"

# ---- kernel and base initramfs, built once per kernel and cached ----
fetch_deb() { # PACKAGE -> path of its .deb in $CACHE/debs
  local d=$CACHE/debs f
  f=$(ls "$d/$1"_*.deb 2>/dev/null | head -1 || true)
  if [ -z "$f" ]; then
    mkdir -p "$d"
    (cd "$d" && apt-get -q -o APT::Sandbox::User=root download "$1" >&2) || die "apt-get download $1 failed"
    f=$(ls "$d/$1"_*.deb | head -1)
  fi
  echo "$f"
}

if [ -n "${VIREO_GUEST_KERNEL:-}" ]; then
  KERNEL=$(realpath "$VIREO_GUEST_KERNEL")
  G=$CACHE/custom-$(echo "$KERNEL $(stat -c %Y "$KERNEL")" | md5sum | cut -c1-12)
else
  KVER=${VIREO_GUEST_KVER:-}
  if [ -z "$KVER" ]; then # choose once, then stick to it (delete $CACHE/default-kver to re-pick)
    mkdir -p "$CACHE"
    [ -s "$CACHE/default-kver" ] || apt-cache search --names-only '^linux-image-6\.1\.[0-9.-]*-amd64$' |
      sed 's/^linux-image-\([^ ]*\) .*/\1/' | sort -V | tail -1 >"$CACHE/default-kver"
    KVER=$(cat "$CACHE/default-kver")
    KVER=${KVER:-6.1.0-56-amd64}
  fi
  G=$CACHE/$KVER
fi

build_base() {
  local T R MD m f
  echo "guest-vm.sh: building the base initramfs in $G" >&2
  T=$(mktemp -d /tmp/guest-vm-base.XXXXXX)
  R=$T/root
  mkdir -p "$R"/{bin,sbin,proc,sys,dev,tmp,extra,mods} "$G"
  if ldd /bin/busybox >/dev/null 2>&1 || [ ! -x /bin/busybox ]; then # need a static busybox
    dpkg-deb --fsys-tarfile "$(fetch_deb busybox-static)" | tar -xO ./bin/busybox >"$R/bin/busybox"
  else
    cp /bin/busybox "$R/bin/busybox"
  fi
  chmod 755 "$R/bin/busybox"
  if [ -n "${KERNEL:-}" ]; then
    cp "$KERNEL" "$T/vmlinuz"
  else
    mkdir "$T/k"
    dpkg-deb --fsys-tarfile "$(fetch_deb "linux-image-$KVER")" |
      tar -x -C "$T/k" --wildcards "./boot/vmlinuz-$KVER" "*/modules/$KVER/kernel/*" "*/modules/$KVER/modules.builtin"
    cp "$T/k/boot/vmlinuz-$KVER" "$T/vmlinuz"
    MD=$(dirname "$(find "$T/k" -type d -path "*/modules/$KVER/kernel" | head -1)")
    # name -> file; dependencies come from each module's .modinfo "depends=" (no kmod needed)
    declare -A ko=() seen=()
    while IFS= read -r f; do m=${f##*/}; m=${m%%.ko*}; ko[${m//-/_}]=$f; done < <(find "$MD/kernel" -name '*.ko*')
    add_mod() {
      local m=${1//-/_} f d
      [ -z "${seen[$m]:-}" ] || return 0
      seen[$m]=1
      f=${ko[$m]:-}
      if [ -z "$f" ]; then # built in, or missing
        grep -q "/${1//[-_]/[-_]}\.ko" "$MD/modules.builtin" || die "module $m not in linux-image-$KVER"
        return 0
      fi
      case $f in
        *.xz) xz -dc "$f" ;; *.zst) zstd -qdc "$f" ;; *.gz) gzip -dc "$f" ;; *) cat "$f" ;;
      esac >"$R/mods/$m.ko"
      for d in $(tr '\0' '\n' <"$R/mods/$m.ko" | sed -n 's/^depends=//p' | tr , ' '); do add_mod "$d"; done
      echo "$m" >>"$R/mods/order" # dependencies first
    }
    for m in virtio_pci virtio_blk virtio_scsi sd_mod vfio vfio_iommu_type1 vfio_pci uio uio_pci_generic; do
      add_mod "$m"
    done
  fi
  cat >"$R/init" <<'EOF'
#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/extra/bin:/extra:/bin:/sbin HOME=/tmp
mount -t proc proc /proc; mount -t sysfs sysfs /sys; mount -t devtmpfs devtmpfs /dev; mount -t tmpfs tmpfs /tmp
mkdir -p /dev/hugepages && mount -t hugetlbfs hugetlbfs /dev/hugepages
echo >/proc/sys/kernel/modprobe # no module autoloading: everything needed is loaded below
for m in $(cat /mods/order 2>/dev/null); do
  case $m in vfio) p=enable_unsafe_noiommu_mode=1 ;; vfio_iommu_type1) p=allow_unsafe_interrupts=1 ;; *) p= ;; esac
  insmod /mods/$m.ko $p || echo "guest-vm: insmod $m failed"
done
. /guest-env
n=0 # wait (at most 5 s) for the virtio disks
while [ $(ls /sys/block | grep -c '^[sv]d') -lt $NDISKS ] && [ $n -lt 50 ]; do sleep 0.1; n=$((n + 1)); done
echo "guest-vm: up after $(cut -d' ' -f1 /proc/uptime)s, disks: $(ls /sys/block | grep '^[sv]d' | tr '\n' ' ')"
# busybox runs its applets before searching PATH: functions let added programs (e.g. stat) win
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
# vbind DRIVER BDF...: bind PCI functions to DRIVER via driver_override ("none": just unbind)
[ $# -ge 2 ] || { echo "usage: vbind DRIVER BDF..." >&2; exit 2; }
drv=$1; shift; rc=0
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
  drv=-; [ -e $d/driver ] && drv=$(basename "$(readlink $d/driver)")
  echo "${d##*/} $(cat $d/vendor) $(cat $d/device) $(cat $d/class) $drv"
done
EOF
  chmod 755 "$R/init" "$R/bin/vbind" "$R/bin/vdevs"
  (cd "$R" && find . | cpio -o -H newc --quiet) >"$T/base.cpio"
  mv "$T/vmlinuz" "$T/base.cpio" "$G/"
  rm -rf "$T"
}
if [ ! -s "$G/base.cpio" ] || [ ! -s "$G/vmlinuz" ] || [ "$SELF" -nt "$G/base.cpio" ]; then build_base; fi

# ---- per-run overlay: extra files, the command, the number of disks to wait for ----
W=$(mktemp -d /tmp/guest-vm.XXXXXX)
trap 'rm -rf "$W"' EXIT
O=$W/root
mkdir -p "$O/extra"
put() { # SRC GUEST-PATH: copy; ELF executables bring their shared libraries and loader
  mkdir -p "$O$(dirname "$2")"
  cp -a "$1" "$O$2"
  local f lib
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
  [ "$dst" != "$a" ] || dst=$(basename "$src")
  case $dst in /*) ;; *) dst=/extra/$dst ;; esac
  put "$src" "$dst"
done
[ -z "$CMD" ] || printf '%s\n' "$CMD" >"$O/guest-cmd"
echo "NDISKS=$((${#scsi[@]} + ${#scsi2[@]} + ${#blk[@]} + ${#vublk[@]} + ${#vuscsi[@]}))" >"$O/guest-env"
(cd "$O" && find . | cpio -o -H newc --quiet) | cat "$G/base.cpio" - >"$W/initrd"

# ---- QEMU ----
cmdline="console=ttyS0 panic=-1 quiet vfio.enable_unsafe_noiommu_mode=1"
machine=q35,memory-backend=mem0
vio=",disable-legacy=off" # behind a PCIe root port QEMU would otherwise drop the legacy interface
[ -z "$MODERN" ] || vio=",disable-legacy=on"
vu=$vio
q=(qemu-system-x86_64 -nodefaults -no-user-config -display none -no-reboot -serial stdio
  -accel tcg -cpu max -bios qboot.rom -m "$MEM" -smp "$SMP"
  -object "memory-backend-memfd,id=mem0,size=$MEM,share=on")
if [ -n "$VIOMMU" ]; then
  machine+=,kernel-irqchip=split
  cmdline+=" intel_iommu=on iommu=pt"
  q+=(-device intel-iommu,intremap=on,caching-mode=on)
  vio+=",iommu_platform=on"
fi
[ -z "$MONITOR" ] || q+=(-monitor "unix:$MONITOR,server,nowait")
port=0
dev() { # DEVICE-ARGS: plug behind a fresh pcie-root-port. qboot numbers the buses from the highest
  port=$((port + 1)) # slot down, so the n-th device (scsi0, scsi1, blk*, vublk*, vuscsi*) is 0n:00.0
  q+=(-device "pcie-root-port,id=rp$port,chassis=$port,addr=$(printf %x $((0x18 - port)))" -device "$1,bus=rp$port")
}
for i in ${!scsi[@]}; do
  [ "$i" != 0 ] || dev "virtio-scsi-pci,id=scsi0$vio"
  q+=(-drive "if=none,id=scsi0-$i,file=${scsi[i]},format=raw,cache=unsafe" -device "scsi-hd,drive=scsi0-$i,bus=scsi0.0,lun=$i")
done
for i in ${!scsi2[@]}; do
  [ "$i" != 0 ] || dev "virtio-scsi-pci,id=scsi1$vio"
  q+=(-drive "if=none,id=scsi1-$i,file=${scsi2[i]},format=raw,cache=unsafe" -device "scsi-hd,drive=scsi1-$i,bus=scsi1.0,lun=$i")
done
for i in ${!blk[@]}; do
  q+=(-drive "if=none,id=blk$i-drive,file=${blk[i]},format=raw,cache=unsafe")
  dev "virtio-blk-pci,id=blk$i,drive=blk$i-drive$vio"
done
for i in ${!vublk[@]}; do
  q+=(-chardev "socket,id=vublk$i-sock,path=${vublk[i]}")
  dev "vhost-user-blk-pci,id=vublk$i,chardev=vublk$i-sock,num-queues=1$vu"
done
for i in ${!vuscsi[@]}; do
  q+=(-chardev "socket,id=vuscsi$i-sock,path=${vuscsi[i]}")
  dev "vhost-user-scsi-pci,id=vuscsi$i,chardev=vuscsi$i-sock,num_queues=1$vu"
done
q+=(-machine "$machine" -kernel "$G/vmlinuz" -initrd "$W/initrd" -append "$cmdline${APPEND:+ $APPEND}")
q+=(${qextra[@]+"${qextra[@]}"})
[ -z "$PRINT" ] || echo "${q[*]}" >&2
[ -n "$CMD" ] || exec "${q[@]}" # interactive

set +e
timeout --foreground -k 5 "$TIMEOUT" "${q[@]}" </dev/null 2>&1 | sed -u 's/\r//g' | tee "$W/console"
qrc=${PIPESTATUS[0]}
set -e
rc=$(sed -n 's/.*=== guest-cmd end rc=\([0-9]*\) ===.*/\1/p' "$W/console" | tail -1)
[ -n "$rc" ] || { echo "guest-vm.sh: no end marker (qemu exit status $qrc; 124 = timeout after ${TIMEOUT}s)" >&2; exit 125; }
exit "$rc"
