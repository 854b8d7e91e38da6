#!/usr/bin/env bash
# Runs the installed package under a real systemd: boots Debian 12 (a
# minimal rootfs made by debootstrap, in target/systemd-check/) with
# systemd-nspawn, systemd as its PID 1 and only a loopback network, and in
# it goes from the .deb to a running, ready custodyd in the words of
# docs/runbook.md, "Installing the package". Then it checks what systemd
# saw: READY=1, WATCHDOG=1, a reload (RELOADING=1, then READY=1, same
# process), the hardening in force, gRPC health over mTLS on loopback, no
# secret in the journal, and a clean stop (STOPPING=1, exit status 0).
# deploy/package.sh runs it after installing the package; CI runs that. On
# exit it powers the container off and removes its rootfs.
#
#   deploy/systemd-check.sh target/debian/custody_0.1.0-1_amd64.deb
#
# Needs root (sudo is used otherwise) and Debian's debootstrap and
# systemd-container, installed if missing. The debootstrapped base is kept
# as target/systemd-check/bookworm.tar for the next run (remove it to
# rebuild it).
set -euo pipefail
cd "$(dirname "$0")/.."

deb=${1:?usage: deploy/systemd-check.sh CUSTODY_DEB}
[ -f "$deb" ] || { echo "no package at $deb" >&2; exit 1; }
if [ "$(id -u)" -ne 0 ]; then
  exec sudo "$0" "$@"
fi

need=()
command -v debootstrap >/dev/null 2>&1 || need+=(debootstrap)
command -v systemd-nspawn >/dev/null 2>&1 || need+=(systemd-container)
command -v pgrep >/dev/null 2>&1 || need+=(procps)
if ((${#need[@]})); then
  echo "installing: ${need[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

work=$PWD/target/systemd-check
base=$work/bookworm.tar
rootfs=$work/rootfs
machine=custody-check
log=$work/console.log
mkdir -p "$work"
start=$SECONDS

nspawn_pid=""
cleanup() {
  local status=$?
  if [ -n "$nspawn_pid" ] && kill -0 "$nspawn_pid" 2>/dev/null; then
    # SIGTERM makes systemd-nspawn power the container off; SIGKILL if that
    # has not ended it within 30 s.
    kill -TERM "$nspawn_pid" 2>/dev/null || true
    for _ in $(seq 30); do kill -0 "$nspawn_pid" 2>/dev/null || break; sleep 1; done
    kill -KILL "$nspawn_pid" 2>/dev/null || true
    wait "$nspawn_pid" 2>/dev/null || true
  fi
  # systemd-nspawn's mounts live in its own mount namespace and end with it;
  # an interrupted debootstrap leaves /proc and /sys mounted in its target.
  # Unmount whatever is left under $work (deepest first), then remove the
  # trees.
  local left
  left=$(findmnt -rno TARGET | grep "^$work/" | sort -r || true)
  if [ -n "$left" ]; then
    echo "unmounting what was left under $work:" $left >&2
    for target in $left; do umount -l "$target" || status=1; done
  fi
  if findmnt -rno TARGET | grep -q "^$work/"; then
    echo "still mounted under $work; $rootfs left in place" >&2
    status=1
  else
    rm -rf "$rootfs" "$work/base" "$base.part"
  fi
  if [ "$status" -ne 0 ] && [ -f "$log" ]; then
    echo "--- the container's console (last 40 lines of $log)" >&2
    tail -n 40 "$log" >&2
  fi
  exit "$status"
}
trap cleanup EXIT
trap "exit 130" INT TERM HUP

# A minimal Debian 12 with systemd as init, SoftHSM2 and the package's
# dependency adduser, made once.
if [ ! -s "$base" ]; then
  echo "debootstrap: a minimal Debian bookworm with systemd and SoftHSM2 (once; kept as $base)"
  rm -rf "$work/base"
  debootstrap --variant=minbase --include=systemd,systemd-sysv,dbus,softhsm2,adduser \
    bookworm "$work/base" http://deb.debian.org/debian >"$work/debootstrap.log" 2>&1 ||
    { tail -n 20 "$work/debootstrap.log" >&2; exit 1; }
  tar -C "$work/base" -cf "$base.part" . && mv "$base.part" "$base"
  rm -rf "$work/base"
fi
rm -rf "$rootfs"
mkdir -p "$rootfs"
tar -C "$rootfs" -xf "$base"
# What Debian's installer writes and debootstrap does not: the host name,
# and localhost in /etc/hosts (custodyctl reaches https://localhost:7443).
echo "$machine" >"$rootfs/etc/hostname"
printf '127.0.0.1\tlocalhost\n::1\t\tlocalhost ip6-localhost ip6-loopback\n127.0.1.1\t%s\n' "$machine" >"$rootfs/etc/hosts"
cp "$deb" "$rootfs/root/custody.deb"
cp deploy/systemd-check-inside.sh "$rootfs/root/check.sh"
echo "rootfs ready in $((SECONDS - start)) s"

# Boot it: systemd as PID 1 in its own PID, mount, UTS and network
# namespaces (loopback only), not registered with a machined (the host's
# PID 1 need not be systemd).
systemd-nspawn --quiet --directory="$rootfs" --machine="$machine" --register=no --keep-unit \
  --private-network --boot </dev/null >"$log" 2>&1 &
nspawn_pid=$!

# The container's PID 1: the child of systemd-nspawn that runs systemd
# (systemd-nspawn first forks a helper, which does not).
leader=""
find_leader() {
  local child
  leader=""
  for child in $(pgrep -P "$nspawn_pid" || true); do
    if [ "$(cat "/proc/$child/comm" 2>/dev/null)" = systemd ]; then leader=$child; fi
  done
  [ -n "$leader" ]
}
inside() { nsenter --target "$leader" --all env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 "$@"; }

state=""
for _ in $(seq 90); do
  kill -0 "$nspawn_pid" 2>/dev/null || { echo "systemd-nspawn ended" >&2; exit 1; }
  if find_leader; then
    state=$(inside systemctl is-system-running 2>/dev/null || true)
    case "$state" in running | degraded) break ;; esac
  fi
  sleep 1
done
case "$state" in
  running) ;;
  degraded) inside systemctl --failed --no-pager >&2 ;;
  *) echo "the container's systemd did not finish booting within 90 s (state '$state')" >&2; exit 1 ;;
esac
echo "systemd $(inside systemctl show -p Version --value) booted as PID 1 in $((SECONDS - start)) s"

inside bash /root/check.sh
echo "custodyd under systemd: checked in $((SECONDS - start)) s"
