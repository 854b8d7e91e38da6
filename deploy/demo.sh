#!/usr/bin/env bash
# The main job: custodyd on a fresh SoftHSM2 dev token with dev certificates,
# and a CA-style round trip through it: create a key, sign a digest, verify
# the signature with openssl (which knows nothing of the HSM), two officers
# approve a quorum-gated signature, a data key is wrapped, the key encryption
# key rotated and the data key rewrapped, drift is checked, a root key
# ceremony (the root key then signs only with 2 officers approving), an
# intermediate ceremony (the root certifies the issuing key; a leaf the
# issuing key signs verifies under root -> intermediate), a CRL ceremony
# (the root signs a CRL that `openssl crl -verify` accepts) and a
# KEK ceremony with 2-of-3 backup shares run, a backup approved by two
# officers (a CREATE_BACKUP operation), a DR drill
# restores the backup into a scratch token from two shares, and the audit log
# and the ceremony transcript are verified offline.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

deploy/install-deps.sh
cargo build -q --locked -p custody-daemon --bins
bin="$PWD/target/debug"

dev="$PWD/.dev"
rm -rf "$dev"
mkdir -p "$dev/softhsm/tokens" "$dev/pki" "$dev/data" "$dev/demo"
chmod 700 "$dev"
cat > "$dev/softhsm/softhsm2.conf" <<CONF
directories.tokendir = $dev/softhsm/tokens
objectstore.backend = file
log.level = ERROR
CONF
export SOFTHSM2_CONF="$dev/softhsm/softhsm2.conf"

# Random PINs in files only the owner reads: never in the config.
umask 077
head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$dev/user.pin"
head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$dev/so.pin"
softhsm2-util --init-token --free --label custody-dev \
  --so-pin "$(cat "$dev/so.pin")" --pin "$(cat "$dev/user.pin")" >/dev/null
# The scratch token DR drills restore into (and leave empty again).
softhsm2-util --init-token --free --label custody-scratch \
  --so-pin "$(cat "$dev/so.pin")" --pin "$(cat "$dev/user.pin")" >/dev/null
echo "== fresh SoftHSM2 tokens 'custody-dev' and 'custody-scratch' in $dev/softhsm"

"$bin/custodyctl" dev-pki --out "$dev/pki" >/dev/null
echo "== dev CA and certificates in $dev/pki (operator, ca-issuing, auditor; officers alice, bob, carol)"

# Each officer makes an Ed25519 key of their own, sealed with a passphrase;
# the genesis file enrolls them, with 2 of 3 needed for officer-set changes.
mkdir -p "$dev/officers"
echo "required = 2" > "$dev/officers.toml"
for officer in alice bob carol; do
  public_key=$(CUSTODY_OFFICER_PASSPHRASE="demo passphrase of $officer" \
    "$bin/custodyctl" officer keygen --officer-id "$officer" --out "$dev/officers/$officer.key" | awk '/public key/ {print $NF}')
  printf '[[officers]]\nid = "%s"\nprincipal = "%s"\npublic_key = "%s"\n' "$officer" "$officer" "$public_key" >> "$dev/officers.toml"
done
echo "== officers alice, bob and carol made their own keys; genesis: $dev/officers.toml"

port=$(( 20000 + RANDOM % 20000 ))
metrics_port=$(( port + 1 ))
cat > "$dev/custodyd.toml" <<CONF
listen = "127.0.0.1:$port"
data_dir = "$dev/data"
[hsm]
module = "/usr/lib/softhsm/libsofthsm2.so"
token_label = "custody-dev"
pin_file = "$dev/user.pin"
[tls]
cert = "$dev/pki/server.pem"
key = "$dev/pki/server.key"
client_ca = "$dev/pki/ca.pem"
crls = ["$dev/pki/crl.pem"]
[dual_control]
genesis_file = "$dev/officers.toml"
[ceremony]
so_pin_file = "$dev/so.pin"
scratch_token_label = "custody-scratch"
scratch_pin_file = "$dev/user.pin"
[metrics]
listen = "127.0.0.1:$metrics_port"
CONF

RUST_LOG=warn "$bin/custodyd" --config "$dev/custodyd.toml" > "$dev/custodyd.log" 2>&1 &
daemon=$!
trap 'kill $daemon 2>/dev/null; wait $daemon 2>/dev/null || true' EXIT

export CUSTODY_SERVER="https://localhost:$port" CUSTODY_CA="$dev/pki/ca.pem"
as() { CUSTODY_CERT="$dev/pki/$1.pem" CUSTODY_KEY="$dev/pki/$1.key" "$bin/custodyctl" "${@:2}"; }
officer() {
  CUSTODY_OFFICER_PASSPHRASE="demo passphrase of $1" CUSTODY_OFFICER_KEY="$dev/officers/$1.key" \
    as "$1" "${@:2}" --yes | awk '/^(APPROVED|DENIED) by/ {vote = $1 " by " $3} /^  state: / {state = $2} END {print "  " vote " -> operation " state}'
}
operation_of() { grep -o 'operations/[0-9a-f]*' | head -1; }
# An officer's ceremony step, with their own certificate and officer key.
step() {
  CUSTODY_OFFICER_PASSPHRASE="demo passphrase of $1" CUSTODY_OFFICER_KEY="$dev/officers/$1.key" \
    as "$1" ceremony "${@:2}"
}
for _ in $(seq 100); do
  as auditor audit verify-server >/dev/null 2>&1 && break
  kill -0 $daemon 2>/dev/null || { cat "$dev/custodyd.log"; exit 1; }
  sleep 0.1
done
echo "== custodyd is up on 127.0.0.1:$port (mTLS, TLS 1.3)"
echo "   Prometheus scrapes http://127.0.0.1:$metrics_port/metrics (loopback, plain HTTP); its readiness line (1: custodyd can sign now):"
curl -fsS "http://127.0.0.1:$metrics_port/metrics" | grep '^custody_serving ' | sed 's/^/   /'

echo "== the operator creates an issuing key; only principal ca-issuing may sign with it"
as operator keys create issuing-ca --algorithm EC_SIGN_P256_SHA256 --signer ca-issuing
as operator keys public-key issuing-ca --out "$dev/demo/issuing-ca.pem"

echo "== the CA signs the SHA-256 digest of a to-be-signed certificate"
printf 'tbsCertificate of www.example.test\n' > "$dev/demo/tbs.bin"
digest=$(openssl dgst -sha256 -binary "$dev/demo/tbs.bin" | od -An -tx1 | tr -d ' \n')
as ca-issuing sign issuing-ca --digest "$digest" --out "$dev/demo/tbs.sig"

echo "== openssl verifies the signature with the exported public key"
openssl dgst -sha256 -verify "$dev/demo/issuing-ca.pem" -signature "$dev/demo/tbs.sig" "$dev/demo/tbs.bin"

echo "== the operator may not sign (not on the allow-list), and says so"
if as operator sign issuing-ca --digest "$digest" 2>&1; then
  echo "unexpected: the operator could sign"; exit 1
fi

echo "== dual control: the issuing key's signatures now need 2 of the 3 officers"
op=$(as operator request set-policy issuing-ca --operation sign --officer alice --officer bob --officer carol --required 2 | operation_of)
officer alice approve "$op"
officer bob approve "$op"

echo "== the CA alone is refused now"
if as ca-issuing sign issuing-ca --digest "$digest" 2>&1; then
  echo "unexpected: the CA signed without approvals"; exit 1
fi

echo "== the CA requests the signature; carol and alice each sign the exact request with their own key"
op=$(as ca-issuing request sign issuing-ca --digest "$digest" | operation_of)
as ca-issuing show "$op" | sed -n '2p;4p'
officer carol approve "$op"
officer alice approve "$op"
as ca-issuing show "$op" --signature-out "$dev/demo/tbs-approved.sig" | tail -1
openssl dgst -sha256 -verify "$dev/demo/issuing-ca.pem" -signature "$dev/demo/tbs-approved.sig" "$dev/demo/tbs.bin"

echo "== envelope encryption: an AES-256-GCM key encryption key wraps a data key for an application"
as operator keys create payments-kek --algorithm AES_256_GCM --signer ca-issuing --cryptoperiod 90d | sed -n 1,2p
as ca-issuing data-key payments-kek --aad "tenant 42" --wrapped-out "$dev/demo/dek.wrapped" --key-out "$dev/demo/dek.key"
as ca-issuing decrypt payments-kek --in "$dev/demo/dek.wrapped" --aad "tenant 42" --out "$dev/demo/dek.unwrapped"
cmp "$dev/demo/dek.key" "$dev/demo/dek.unwrapped" && echo "   the unwrapped data key matches"
echo "   another tenant's associated data (\"tenant 43\") must not unwrap it; the INTEGRITY_FAILURE refusal below is the expected answer:"
if as ca-issuing decrypt payments-kek --in "$dev/demo/dek.wrapped" --aad "tenant 43" --out "$dev/demo/dek.wrong" 2>&1; then
  echo "unexpected: another tenant's associated data unwrapped the key"; exit 1
fi

echo "== rotation: the KEK gets version 2; the stored data key is rewrapped without its plaintext leaving custodyd"
as operator keys rotate payments-kek --request-id demo-rotation-1 | sed -n 1p
as ca-issuing rewrap payments-kek --in "$dev/demo/dek.wrapped" --aad "tenant 42"
as operator keys set-state payments-kek/versions/1 deactivated
as operator keys update payments-kek --min-version 2 | sed -n 1,3p

echo "== drift detection: the HSM holds exactly what the registry says"
as auditor drift

echo "== key ceremony: a root key, made in the HSM with 2 of the 3 officers present"
root=deploy/ceremonies/root-key.toml
as alice ceremony check "$root" | sed -n '/^policy/p;/^script digest/,+1p'
as alice ceremony start "$root" | sed -n 1p
step alice sign-in demo-root-2026 --script "$root" | sed -n 1p
step bob sign-in demo-root-2026 --script "$root" | sed -n 1p
fingerprint=$(as alice ceremony status demo-root-2026 | sed -n 's/^  fingerprint: //p')
as alice ceremony status demo-root-2026 | grep -E '^  (fingerprint|words):'
echo "   alice reads the fingerprint aloud; each officer checks it and signs it"
step alice confirm demo-root-2026 --script "$root" --expect-fingerprint "$fingerprint" | grep confirmed
step bob confirm demo-root-2026 --script "$root" --expect-fingerprint "$fingerprint" | grep -E 'confirmed|: COMPLETED'
as alice ceremony status demo-root-2026 --certificate-out "$dev/demo/root-ca.pem" | tail -1
openssl verify -CAfile "$dev/demo/root-ca.pem" "$dev/demo/root-ca.pem"

echo "== the root key is registered under its policy: SIGN as its script declares, the rest the administrative quorum (2 of 3)"
as operator keys show root-ca | grep -E '^  policy '
echo "   ca-issuing, on its allow-list, may not sign with it alone"
root_digest=$(openssl dgst -sha384 -binary "$dev/demo/tbs.bin" | od -An -tx1 | tr -d ' \n')
if as ca-issuing sign root-ca --digest "$root_digest" --hash sha384 2>&1; then
  echo "unexpected: the CA signed with the root key alone"; exit 1
fi
echo "   nor may the operator rotate it alone"
if as operator keys rotate root-ca 2>&1; then
  echo "unexpected: the operator rotated the root key alone"; exit 1
fi
echo "   ca-issuing requests the signature; bob and carol approve it"
op=$(as ca-issuing request sign root-ca --digest "$root_digest" --hash sha384 | operation_of)
officer bob approve "$op"
officer carol approve "$op"
as ca-issuing show "$op" --signature-out "$dev/demo/tbs-root.sig" | tail -1
openssl x509 -in "$dev/demo/root-ca.pem" -pubkey -noout > "$dev/demo/root-ca.pub.pem"
openssl dgst -sha384 -verify "$dev/demo/root-ca.pub.pem" -signature "$dev/demo/tbs-root.sig" "$dev/demo/tbs.bin"

echo "== key ceremony: the root certifies issuing-ca's key (an intermediate CA), 2 of the 3 officers present"
int=deploy/ceremonies/intermediate.toml
as alice ceremony start "$int" | sed -n 1p
step alice sign-in demo-intermediate-2026 --script "$int" | sed -n 1p
step bob sign-in demo-intermediate-2026 --script "$int" | sed -n 1p
echo "   custodyd built the to-be-signed certificate and linted it; nothing is signed yet"
tbs_fingerprint=$(as alice ceremony status demo-intermediate-2026 | sed -n 's/^  fingerprint: //p')
echo "   alice reads the TBS SHA-256 aloud; each officer reads the TBS summary, checks the digest and signs it"
step alice confirm demo-intermediate-2026 --script "$int" --expect-fingerprint "$tbs_fingerprint" \
  | grep -E '^  (subject:|issuer:|basicConstraints)|confirmed'
step bob confirm demo-intermediate-2026 --script "$int" --expect-fingerprint "$tbs_fingerprint" | grep -E 'confirmed|: COMPLETED'
echo "   only now did the root sign that TBS in the HSM; the chain is stored with issuing-ca"
as alice ceremony status demo-intermediate-2026 --certificate-out "$dev/demo/intermediate.pem" | tail -1
openssl verify -CAfile "$dev/demo/root-ca.pem" "$dev/demo/intermediate.pem"

echo "== the CA issues a leaf under the intermediate, its TBS signed by issuing-ca through custodyd"
# A throwaway stand-in for the issuer only lays out the leaf's TBS (issuer
# name and AKI those of the intermediate); its own signature is discarded.
openssl ecparam -name prime256v1 -genkey -noout -out "$dev/demo/stand-in.key"
openssl ecparam -name prime256v1 -genkey -noout -out "$dev/demo/leaf.key"
ski=$(openssl x509 -in "$dev/demo/intermediate.pem" -noout -ext subjectKeyIdentifier | tail -1 | tr -d ' :')
openssl req -x509 -new -key "$dev/demo/stand-in.key" -subj "/C=DE/O=Custody Demo/CN=Custody Demo Issuing CA" \
  -addext "subjectKeyIdentifier=$ski" -days 1 -out "$dev/demo/stand-in.pem"
openssl req -new -key "$dev/demo/leaf.key" -subj "/CN=www.example.test" -out "$dev/demo/leaf.csr"
printf 'subjectAltName=DNS:www.example.test\nextendedKeyUsage=serverAuth\nkeyUsage=critical,digitalSignature\nauthorityKeyIdentifier=keyid\n' \
  > "$dev/demo/leaf.ext"
openssl x509 -req -in "$dev/demo/leaf.csr" -CA "$dev/demo/stand-in.pem" -CAkey "$dev/demo/stand-in.key" \
  -set_serial "0x4$(openssl rand -hex 15)" -days 90 -extfile "$dev/demo/leaf.ext" -out "$dev/demo/leaf-laid-out.pem" 2>/dev/null
openssl asn1parse -in "$dev/demo/leaf-laid-out.pem" -strparse 4 -noout -out "$dev/demo/leaf-tbs.der"
leaf_digest=$(openssl dgst -sha256 -binary "$dev/demo/leaf-tbs.der" | od -An -tx1 | tr -d ' \n')
op=$(as ca-issuing request sign issuing-ca --digest "$leaf_digest" | operation_of)
officer bob approve "$op"
officer carol approve "$op"
as ca-issuing show "$op" --signature-out "$dev/demo/leaf.sig" | tail -1
# The certificate: SEQUENCE { the TBS, ecdsa-with-SHA256, BIT STRING { the signature } }.
der_len() { if [ "$1" -lt 128 ]; then printf '%02x' "$1"; elif [ "$1" -lt 256 ]; then printf '81%02x' "$1"; else printf '82%04x' "$1"; fi; }
hex_of() { od -An -tx1 -v "$1" | tr -d ' \n'; }
sig=$(hex_of "$dev/demo/leaf.sig")
body="$(hex_of "$dev/demo/leaf-tbs.der")300a06082a8648ce3d04030203$(der_len $(( ${#sig} / 2 + 1 )))00$sig"
printf '30%s%s' "$(der_len $(( ${#body} / 2 )))" "$body" | xxd -r -p | openssl x509 -inform DER -out "$dev/demo/leaf.pem"
openssl verify -CAfile "$dev/demo/root-ca.pem" -untrusted "$dev/demo/intermediate.pem" "$dev/demo/leaf.pem"

echo "== key ceremony: the root signs a CRL (revoked serial, reason, dates from the reviewed script), 2 of the 3 officers present"
crl=deploy/ceremonies/crl.toml
as alice ceremony start "$crl" | sed -n 1p
step alice sign-in demo-crl-2026 --script "$crl" | sed -n 1p
step carol sign-in demo-crl-2026 --script "$crl" | sed -n 1p
echo "   custodyd gave the CRL the root's next CRL number, built the to-be-signed CRL and linted it; nothing is signed yet"
crl_fingerprint=$(as alice ceremony status demo-crl-2026 | sed -n 's/^  fingerprint: //p')
step alice confirm demo-crl-2026 --script "$crl" --expect-fingerprint "$crl_fingerprint" \
  | grep -E '^  (CRL number:|nextUpdate:|revoked:)|confirmed'
step carol confirm demo-crl-2026 --script "$crl" --expect-fingerprint "$crl_fingerprint" | grep -E 'confirmed|: COMPLETED'
as alice ceremony status demo-crl-2026 --crl-out "$dev/demo/root-ca.crl" | tail -1
echo "   openssl checks the CRL's signature with the root certificate's public key (\"verify OK\": the root signed exactly this CRL):"
openssl crl -in "$dev/demo/root-ca.crl" -CAfile "$dev/demo/root-ca.pem" -noout -verify 2>&1

echo "== key ceremony: an envelope KEK, its backup KEK split 2 of 3 among the custodians"
kek=deploy/ceremonies/kek.toml
as alice ceremony start "$kek" | sed -n 1p
step alice sign-in demo-kek-2026 --script "$kek" | sed -n 1p
step carol sign-in demo-kek-2026 --script "$kek" | sed -n 1p
for custodian in alice bob carol; do
  step "$custodian" collect-share demo-kek-2026 --out "$dev/demo/share-$custodian.txt" | sed -n 1p
done
fingerprint=$(as alice ceremony status demo-kek-2026 | sed -n 's/^  fingerprint: //p')
step alice confirm demo-kek-2026 --script "$kek" --expect-fingerprint "$fingerprint" | grep confirmed
step carol confirm demo-kek-2026 --script "$kek" --expect-fingerprint "$fingerprint" | grep -E 'confirmed|: COMPLETED'

echo "== the new backup KEK becomes the one backups use only when the administrative quorum says so"
echo "   alice requests ACTIVATE_BACKUP_KEK: the operation names the KEK's share set, check value and K of N"
op=$(as alice request activate-backup-kek demo-kek-2026 | operation_of)
as alice show "$op" | sed -n '2p'
officer bob approve "$op"
officer carol approve "$op"

echo "== backup: a CREATE_BACKUP operation the administrative quorum approves"
echo "   alice requests it: the operation names the backup KEK set and the exact key versions"
op=$(as alice request backup | operation_of)
as alice show "$op" | sed -n '2p'
echo "   bob and carol approve; every backup-exportable key is wrapped under the backup KEK, manifest signed by the audit key"
officer bob approve "$op"
officer carol approve "$op"
as alice ceremony backup --operation "$op" --out "$dev/demo/backup.json"

echo "== DR drill: two custodians' shares restore the backup into the scratch token, verify it, and clean up"
# The script pins, by SHA-256, the audit key the bundle must be signed by: the
# one custodyd published (here read from an audit export). A restore into
# another custodyd pins the source's the same way.
as auditor audit export --out "$dev/demo/audit-for-pin.jsonl" --key-out "$dev/demo/published-audit-key.pem" >/dev/null
audit_key_sha256=$(openssl pkey -pubin -in "$dev/demo/published-audit-key.pem" -outform DER | sha256sum | cut -d' ' -f1)
cat > "$dev/demo/drill.toml" <<DRILL
format = 1
id = "demo-drill-1"
kind = "restore"
description = "Quarterly DR drill of the demo backup"
[quorum]
officers = ["alice", "bob", "carol"]
required = 2
[restore]
bundle = "backup.json"
bundle_sha256 = "$(sha256sum "$dev/demo/backup.json" | cut -d' ' -f1)"
audit_key_sha256 = "$audit_key_sha256"
drill = true
custodians = ["alice", "bob", "carol"]
DRILL
as bob ceremony check "$dev/demo/drill.toml" | sed -n '/^bundle signed/,+2p'
as bob ceremony start "$dev/demo/drill.toml" | sed -n 1p
step bob sign-in demo-drill-1 --script "$dev/demo/drill.toml" | sed -n 1p
step carol sign-in demo-drill-1 --script "$dev/demo/drill.toml" | sed -n 1p
step bob submit-share demo-drill-1 --share-file "$dev/demo/share-bob.txt" | grep -E 'submitted|waiting'
echo "   with one share (K-1) the drill waits: nothing can be unwrapped yet"
drill=$(step alice submit-share demo-drill-1 --share-file "$dev/demo/share-alice.txt")
echo "$drill" | grep -E 'submitted|: COMPLETED|drill:'
echo "$drill" | grep -q ': COMPLETED' || { echo "the drill did not complete:"; echo "$drill"; exit 1; }

echo "== the ceremony transcript, verified offline against the audit key"
as alice ceremony transcript demo-root-2026 --out-dir "$dev/demo/transcripts" >/dev/null
"$bin/custodyctl" ceremony verify-transcript "$dev/demo/transcripts/demo-root-2026.json" \
  --audit-key "$dev/demo/transcripts/audit-key.pem"
as auditor drift

echo "== the auditor exports the audit log and verifies it offline"
as auditor audit export --out "$dev/demo/audit.jsonl" --key-out "$dev/demo/audit-key.pem"
as auditor audit verify "$dev/demo/audit.jsonl" --audit-key "$dev/demo/audit-key.pem"
