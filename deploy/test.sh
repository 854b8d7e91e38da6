#!/usr/bin/env bash
# The whole test suite: formatting, lints, unit tests, and every SoftHSM2 test
# (each on a fresh token of its own; see softhsm-tests/src/lib.rs).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

deploy/install-deps.sh

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --locked --no-fail-fast
else
  cargo test --workspace --locked --no-fail-fast
fi
