#!/usr/bin/env bash
# The main job, as it stands: a fresh SoftHSM2 dev token, a key generated
# inside it, a digest signed by it, and the signature verified by openssl,
# which knows nothing of the HSM.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

deploy/install-deps.sh

dev="$PWD/.dev"
rm -rf "$dev/softhsm" "$dev/demo"
mkdir -p "$dev/softhsm/tokens" "$dev/demo"
chmod 700 "$dev"
cat > "$dev/softhsm/softhsm2.conf" <<CONF
directories.tokendir = $dev/softhsm/tokens
objectstore.backend = file
log.level = ERROR
CONF
export SOFTHSM2_CONF="$dev/softhsm/softhsm2.conf"

# Random PINs, kept in files only the owner reads: never on a command line of
# the daemon, never in its config.
umask 077
head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$dev/user.pin"
head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$dev/so.pin"
softhsm2-util --init-token --free --label custody-dev \
  --so-pin "$(cat "$dev/so.pin")" --pin "$(cat "$dev/user.pin")" >/dev/null
echo "== fresh SoftHSM2 token 'custody-dev' in $dev/softhsm"

cargo run -q --locked -p hsm-shim --example hsm-demo -- \
  --module /usr/lib/softhsm/libsofthsm2.so \
  --token-label custody-dev \
  --pin-file "$dev/user.pin" \
  --out "$dev/demo"

echo "== openssl verifies the signature with the exported public key"
openssl dgst -sha256 -verify "$dev/demo/public.pem" \
  -signature "$dev/demo/signature.der" "$dev/demo/message.txt"
