#!/usr/bin/env bash
# The project's test command: unit tests, and integration tests against real peers
# (qemu-storage-daemon; vhost-device-scsi when installed) and the in-tree target; then
# the README's quick start, run as written (scripts/readme-quickstart.sh).
# With arguments, they go to `cargo test` and only those tests run (no quick start).
set -euo pipefail
cd "$(dirname "$0")/.."

# Tests against SPDK's vhost target (crates/vireo/tests/spdk.rs) need an SPDK build that
# CI cannot install; without SPDK_DIR / VIREO_SPDK_DIR they pass as skipped. Say so.
spdk_notice() {
  if [ -z "${VIREO_SPDK_DIR:-${SPDK_DIR:-}}" ]; then
    echo "********************************************************************" >&2
    echo "SKIPPED: SPDK vhost tests (crates/vireo/tests/spdk.rs) and SPDK's rpc.py on the" >&2
    echo "  ublk methods (ublk_guest::spdk_rpc_py_drives_the_ublk_methods): no SPDK build." >&2
    echo "  Set SPDK_DIR to an SPDK v25.09 build (vhost, virtio, bdevperf) to run them." >&2
    echo "********************************************************************" >&2
  else
    echo "SPDK tests use the build at ${VIREO_SPDK_DIR:-$SPDK_DIR}" >&2
  fi
  if [ -z "${VIREO_SPDK_VFU_DIR:-${SPDK_VFU_DIR:-}}" ]; then
    echo "SKIPPED: SPDK vfio-user tests (crates/vireo/tests/spdk_vfu.rs): set SPDK_VFU_DIR to" >&2
    echo "  an SPDK v25.09 build with vfio-user (../shared/peers/spdk-vhost.sh build-vfu)." >&2
  fi
  if [ -z "${VIREO_FIO:-}" ]; then
    echo "SKIPPED: fio on the C library (crates/capi/tests/fio.rs): set VIREO_FIO to a fio" >&2
    echo "  binary built with the libblkio engine against this library (docs/capi.md)." >&2
  fi
  if [ -z "${VIREO_UBLK_FIGURES:-}" ]; then
    echo "SKIPPED: ublk figures in a guest (ublk_guest::ublk_figures_in_guest, ~4 min):" >&2
    echo "  set VIREO_UBLK_FIGURES=1 (README, Kernel block devices) to run them." >&2
  fi
  if [ -z "${VIREO_GUEST_NOIOMMU_KERNEL:-}" ]; then
    echo "SKIPPED: VFIO no-IOMMU guest test (pci_guest::vfio_noiommu_with_a_custom_kernel):" >&2
    echo "  set VIREO_GUEST_NOIOMMU_KERNEL to a bzImage with CONFIG_VFIO_NOIOMMU=y to run it" >&2
    echo "  (uio_pci_generic covers physical addressing in every run)." >&2
  fi
}
spdk_notice
trap spdk_notice EXIT
# The C library (libblkio.so) and the vireo binary: the C programs
# (crates/capi/tests/c_programs.rs, fio.rs) and the guest test load them from target/.
cargo build --locked -p vireo-capi -p vireo
cargo test --workspace --locked --exclude vireo-bench "$@"
if [ $# -eq 0 ]; then
  ./scripts/readme-quickstart.sh
fi
