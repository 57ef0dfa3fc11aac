#!/usr/bin/env bash
# The project's test command: unit tests, and integration tests against real peers
# (qemu-storage-daemon; vhost-device-scsi when installed) and the in-tree target.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --workspace --locked --exclude vireo-bench "$@"
