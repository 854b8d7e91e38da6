#!/usr/bin/env bash
# Installs what custody's demo and test suite need on a Debian machine, if it is
# missing: SoftHSM2 (the HSM we test on), OpenSC's pkcs11-tool (a second
# PKCS#11 client, used by tests as "another process" and to drive custody's
# own PKCS#11 module), openssl (the independent verifier), systemd's
# systemd-analyze (checks the unit), gdb (stacks of a test that hangs) and libp11's
# OpenSSL engine (OpenSSL signing certificates through custody's module), etcd (the replicated store backend's tests run a
# real cluster) and curl (they reach etcd's JSON gateway with it). No system protoc is needed: .proto files compile with
# protox.
set -euo pipefail

need=()
[ -e /usr/lib/softhsm/libsofthsm2.so ] || need+=(softhsm2)
command -v pkcs11-tool >/dev/null 2>&1 || need+=(opensc)
command -v openssl >/dev/null 2>&1 || need+=(openssl)
compgen -G '/usr/lib/*/engines-3/pkcs11.so' >/dev/null || need+=(libengine-pkcs11-openssl)
command -v etcd >/dev/null 2>&1 || need+=(etcd-server)
command -v curl >/dev/null 2>&1 || need+=(curl)
# systemd-analyze: the tests verify the unit in deploy/systemd/ offline (no
# running systemd needed).
command -v systemd-analyze >/dev/null 2>&1 || need+=(systemd)
# gdb: a test still running at its deadline is killed after every thread's
# stack is printed (softhsm-tests/src/lib.rs).
command -v gdb >/dev/null 2>&1 || need+=(gdb)
# Python venvs for the tests' external clients and linters (grpcio, pkilint,
# installed from PyPI into a venv under the target directory).
command -v python3 >/dev/null 2>&1 || need+=(python3)
python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || need+=(python3-venv)

if ((${#need[@]})); then
  echo "installing: ${need[*]}"
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo=sudo
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  # Debian's etcd-server enables a system etcd on port 2379; the tests start
  # their own clusters, so a machine running systemd is not left serving one.
  if [[ " ${need[*]} " == *" etcd-server "* ]] && command -v systemctl >/dev/null 2>&1; then
    $sudo systemctl disable --now etcd.service >/dev/null 2>&1 || true
  fi
fi

if ! command -v cargo >/dev/null 2>&1; then
  echo "custody needs a Rust toolchain (cargo 1.85 or newer); install it with rustup" >&2
  exit 1
fi
