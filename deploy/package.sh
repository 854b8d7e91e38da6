#!/usr/bin/env bash
# Builds custody's Debian package with cargo-deb (installed if missing, at a
# pinned version), installs it with dpkg -i, and checks what it installed:
# `custodyd --version` and the unit, verified by systemd-analyze; then
# deploy/systemd-check.sh runs the package under a real systemd (a Debian 12
# container booted with systemd-nspawn) from install to a clean stop. CI runs
# it as root on a fresh Debian machine; elsewhere it uses sudo.
# See docs/runbook.md, "Installing the package".
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

CARGO_DEB_VERSION=3.8.0
sudo=""
[ "$(id -u)" -eq 0 ] || sudo=sudo

deploy/install-deps.sh
# The package's own dependencies (Depends: adduser, libc), for dpkg -i.
command -v adduser >/dev/null 2>&1 || {
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends adduser >/dev/null
}
if [ "$(cargo deb --version 2>/dev/null | awk '{print $2}')" != "$CARGO_DEB_VERSION" ]; then
  echo "installing cargo-deb $CARGO_DEB_VERSION"
  cargo install cargo-deb --locked --version "$CARGO_DEB_VERSION" --quiet
fi

start=$SECONDS
# A release build of custodyd and custodyctl alone (no test features).
deb=$(cargo deb -p custody-daemon --locked | tail -n 1)
echo "built $deb in $((SECONDS - start)) s"
$sudo dpkg -i "$deb" >/dev/null

want=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n 1)
got=$(/usr/bin/custodyd --version)
[ "$got" = "custodyd $want" ] || { echo "custodyd --version says '$got', not 'custodyd $want'" >&2; exit 1; }
/usr/bin/custodyctl --version >/dev/null
unit=/lib/systemd/system/custodyd.service
[ -f "$unit" ] || { echo "the package installed no $unit" >&2; exit 1; }
systemd-analyze verify "$unit"
getent passwd custody >/dev/null || { echo "the package made no custody user" >&2; exit 1; }
[ "$(stat -c %U /var/lib/custody)" = custody ] || { echo "/var/lib/custody is not custody's" >&2; exit 1; }
echo "installed: $got; $unit verified; user custody; state directory /var/lib/custody"

# From the .deb to a running, ready custodyd under systemd, the runbook's
# steps, in a container whose PID 1 is systemd.
deploy/systemd-check.sh "$deb"
