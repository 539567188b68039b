#!/usr/bin/env bash
# Builds the vmrun microVM guest kernel (vmlinux for the PVH entry, bzImage for
# the Linux boot protocol) from Debian's linux-source-6.1 with
# kernels/microvm.config on top of tinyconfig, and caches both under a
# directory keyed by sha256(fragment + source package version).
#
#   kernels/build.sh            build (or reuse) and print the cache directory
#
# Environment:
#   VMRUN_KERNEL_CACHE   cache root (default /var/cache/vmrun/kernels)
#   VMRUN_KERNEL_WORK    where the source is unpacked and built (default /var/tmp/vmrun-kernel)
#   VMRUN_KERNEL_SOURCE  Debian source package (default linux-source-6.1)
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
fragment="$here/microvm.config"
package="${VMRUN_KERNEL_SOURCE:-linux-source-6.1}"
cache_root="${VMRUN_KERNEL_CACHE:-/var/cache/vmrun/kernels}"
work_root="${VMRUN_KERNEL_WORK:-/var/tmp/vmrun-kernel}"
started=$SECONDS

stage() { printf '==> [%4ds] %s\n' "$((SECONDS - started))" "$*"; }
die() { printf 'kernels/build.sh: %s\n' "$*" >&2; exit 1; }

version="$(dpkg-query -W -f '${Version}' "$package" 2>/dev/null || true)"
[[ -n "$version" ]] || die "$package is not installed (apt-get install -y $package)"
tarball="/usr/src/$package.tar.xz"
[[ -f "$tarball" ]] || die "$tarball is missing (reinstall $package)"

key="$( { cat "$fragment"; printf '%s %s\n' "$package" "$version"; } | sha256sum | cut -c1-16)"
cache_dir="$cache_root/$key"
if [[ -f "$cache_dir/vmlinux" && -f "$cache_dir/bzImage" ]]; then
    stage "already built: $package $version, fragment key $key"
    echo "$cache_dir"
    exit 0
fi

for tool in make gcc flex bison bc; do
    command -v "$tool" >/dev/null || die "$tool is missing (apt-get install -y build-essential flex bison bc libelf-dev libssl-dev)"
done

# Unpack the source once per package version; a marker file says it completed.
src_dir="$work_root/$package-$version"
if [[ ! -f "$src_dir/.unpacked" ]]; then
    stage "unpacking $tarball"
    rm -rf "$src_dir"
    mkdir -p "$src_dir"
    tar -xf "$tarball" -C "$src_dir" --strip-components=1
    touch "$src_dir/.unpacked"
fi

build_dir="$work_root/build-$key"
log="$work_root/build-$key.log"
mkdir -p "$build_dir"
: >"$log"
kmake() { make -C "$src_dir" O="$build_dir" ARCH=x86_64 "$@" >>"$log" 2>&1; }
fail() {
    echo "kernels/build.sh: $1 failed; last lines of $log:" >&2
    tail -n 40 "$log" >&2
    exit 1
}

stage "configuring: tinyconfig + $(basename "$fragment")"
kmake tinyconfig || fail "make tinyconfig"
(cd "$src_dir" && ARCH=x86_64 scripts/kconfig/merge_config.sh -m -O "$build_dir" \
    "$build_dir/.config" "$fragment") >>"$log" 2>&1 || fail "merge_config.sh"
kmake olddefconfig || fail "make olddefconfig"

# Kconfig drops an option whose dependency is missing without an error: every
# option the fragment sets must be in the final .config with the same value.
missing=()
while IFS= read -r line; do
    if [[ "$line" =~ ^#\ (CONFIG_[A-Za-z0-9_]+)\ is\ not\ set$ ]]; then
        # Something else may select an option the fragment turns off.
        option="${BASH_REMATCH[1]}"
        if got="$(grep -E "^$option=" "$build_dir/.config")"; then
            missing+=("$line (got: $got)")
        fi
        continue
    fi
    [[ "$line" =~ ^CONFIG_[A-Za-z0-9_]+= ]] || continue
    grep -qxF -- "$line" "$build_dir/.config" || missing+=("$line (got: $(grep -E "^(# )?${line%%=*}[= ]" "$build_dir/.config" || echo unset))")
done <"$fragment"
if ((${#missing[@]})); then
    echo "kernels/build.sh: the final .config lacks options of $(basename "$fragment"):" >&2
    printf '  %s\n' "${missing[@]}" >&2
    exit 1
fi

stage "building vmlinux and bzImage with make -j$(nproc) (log: $log)"
kmake -j"$(nproc)" vmlinux bzImage || fail "make vmlinux bzImage"

# Publish atomically: a half-copied cache entry is never seen as built.
mkdir -p "$cache_root"
staging="$(mktemp -d "$cache_root/.staging-$key.XXXXXX")"
chmod 755 "$staging"
cp "$build_dir/vmlinux" "$staging/vmlinux"
cp "$build_dir/arch/x86/boot/bzImage" "$staging/bzImage"
cp "$build_dir/.config" "$staging/config"
printf '%s %s\n' "$package" "$version" >"$staging/source"
rm -rf "$cache_dir"
mv "$staging" "$cache_dir"

size() { numfmt --to=iec --suffix=B "$(stat -c %s "$1")"; }
stage "done: vmlinux $(size "$cache_dir/vmlinux"), bzImage $(size "$cache_dir/bzImage")"
echo "$cache_dir"
