#!/usr/bin/env bash
# Runs this Debian's own systemd as PID 1 of a container: a private root on a tmpfs with /usr,
# /dev and /sys from the host, /etc with only the units given, and the host directories given
# bound at the same paths (binaries, sockets, logs). Run it as
#   unshare --pid --fork --mount --cgroup --propagation private \
#       scripts/lib/systemd-container.sh ROOT UNIT_DIR DEFAULT_UNIT [HOST_DIR]...
# from a test: everything it mounts lives in the new mount namespace and goes with it; killing
# the container's systemd (its PID 1) ends every process inside. The units come from UNIT_DIR
# (copied into /etc/systemd/system); DEFAULT_UNIT is started at boot.
set -euo pipefail
root=$1 unit_dir=$2 default_unit=$3
shift 3
test "$$" = 1 || { echo "systemd-container.sh: run me as PID 1 of a new PID namespace" >&2; exit 1; }
test -x /lib/systemd/systemd || { echo "systemd-container.sh: /lib/systemd/systemd is missing (apt-get install systemd)" >&2; exit 1; }

mkdir -p "$root"
mount -t tmpfs -o mode=755 chv-systemd "$root"
mkdir -p "$root"/{usr,proc,sys,dev,run,tmp,root,var/lib,var/log,etc/systemd/system}
for link in bin lib lib64 sbin; do ln -s "usr/$link" "$root/$link"; done
mount --rbind /usr "$root/usr"
mount --rbind /dev "$root/dev"
mount --rbind /sys "$root/sys"
for dir in "$@"; do
    mkdir -p "$root$dir"
    mount --bind "$dir" "$root$dir"
done
cp /etc/passwd /etc/group "$root/etc/"
cp /usr/lib/os-release "$root/etc/os-release"
# A machine id of its own: the container must not look like the host.
printf '%s\n' 5eedc0ffee5eedc0ffee5eedc0ffee00 >"$root/etc/machine-id"
cp -r "$unit_dir"/. "$root/etc/systemd/system/"
mount -t proc proc "$root/proc"
exec chroot "$root" env container=chv-test /lib/systemd/systemd --system --unit="$default_unit" \
    --log-target=console --log-level=info
