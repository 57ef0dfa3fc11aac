#!/usr/bin/env bash
# Install vireo's libblkio-compatible C library (crates/capi) into PREFIX:
#   PREFIX/lib/libblkio.so.1.5.0, libblkio.so.1 -> it, libblkio.so -> libblkio.so.1
#   PREFIX/lib/libblkio.a
#   PREFIX/include/blkio.h
#   PREFIX/lib/pkgconfig/blkio.pc (Version: 1.5.0)
# Programs then build with `pkg-config --cflags --libs blkio` (PKG_CONFIG_PATH=PREFIX/lib/pkgconfig)
# and run with the library on the loader's path (LD_LIBRARY_PATH=PREFIX/lib, or an rpath).
#
# usage: scripts/install-libblkio.sh PREFIX [--debug] [--no-build]
#   --debug     the debug build (target/debug) instead of the release build
#   --no-build  install what is already built (no cargo run; the tests use this)
# The build directory is $CARGO_TARGET_DIR, else target/ at the root of the repository.
# Running it again replaces the files: it is idempotent.
set -euo pipefail

usage() {
  echo "usage: $0 PREFIX [--debug] [--no-build]" >&2
  exit 2
}

repo="$(cd "$(dirname "$0")/.." && pwd)"
prefix=""
profile=release
build=yes
for arg in "$@"; do
  case "$arg" in
    --debug) profile=debug ;;
    --no-build) build=no ;;
    -h | --help) usage ;;
    -*) echo "unknown option: $arg" >&2; usage ;;
    *)
      [ -z "$prefix" ] || usage
      prefix="$arg"
      ;;
  esac
done
[ -n "$prefix" ] || usage

version=1.5.0
soname=libblkio.so.1
target_dir="${CARGO_TARGET_DIR:-$repo/target}"
built="$target_dir/$profile"

if [ "$build" = yes ]; then
  cargo_args=(build -p vireo-capi --manifest-path "$repo/Cargo.toml")
  if [ "$profile" = release ]; then
    cargo_args+=(--release)
  fi
  echo "== cargo ${cargo_args[*]}"
  cargo "${cargo_args[@]}"
fi

for f in libblkio.so libblkio.a; do
  if [ ! -f "$built/$f" ]; then
    echo "$built/$f is missing: build it with cargo build -p vireo-capi$([ "$profile" = release ] && echo ' --release')" >&2
    exit 1
  fi
done

# Programs record the SONAME as their NEEDED entry; libblkio's is libblkio.so.1.
if command -v readelf >/dev/null 2>&1; then
  got="$(readelf -d "$built/libblkio.so" | sed -n 's/.*Library soname: \[\(.*\)\].*/\1/p')"
  if [ "$got" != "$soname" ]; then
    echo "$built/libblkio.so has SONAME '${got:-none}', expected $soname (crates/capi/build.rs)" >&2
    exit 1
  fi
fi

mkdir -p "$prefix/lib/pkgconfig" "$prefix/include"
prefix="$(cd "$prefix" && pwd)"
lib="$prefix/lib"

install -m 0755 "$built/libblkio.so" "$lib/libblkio.so.$version"
ln -sfn "libblkio.so.$version" "$lib/$soname"
ln -sfn "$soname" "$lib/libblkio.so"
install -m 0644 "$built/libblkio.a" "$lib/libblkio.a"
install -m 0644 "$repo/crates/capi/include/blkio.h" "$prefix/include/blkio.h"

# Libs.private: what a Rust static library needs from the C library when a program
# links libblkio.a (pkg-config --static --libs blkio).
cat > "$lib/pkgconfig/blkio.pc" <<EOF
prefix=$prefix
libdir=\${prefix}/lib
includedir=\${prefix}/include

Name: blkio
Description: Block device I/O library (vireo's libblkio-compatible implementation)
Version: $version
Libs: -L\${libdir} -lblkio
Libs.private: -lgcc_s -lutil -lrt -lpthread -lm -ldl -lc
Cflags: -I\${includedir}
EOF

echo "installed ($profile build from $built):"
echo "  $lib/libblkio.so.$version"
echo "  $lib/$soname -> libblkio.so.$version"
echo "  $lib/libblkio.so -> $soname"
echo "  $lib/libblkio.a"
echo "  $prefix/include/blkio.h"
echo "  $lib/pkgconfig/blkio.pc (Version: $version)"
echo "build a program with: PKG_CONFIG_PATH=$lib/pkgconfig cc app.c \$(pkg-config --cflags --libs blkio)"
echo "run it with:          LD_LIBRARY_PATH=$lib ./a.out"
