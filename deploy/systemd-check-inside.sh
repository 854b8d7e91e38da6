#!/usr/bin/env bash
# Runs as root inside the container deploy/systemd-check.sh boots, systemd
# its PID 1: the runbook's steps from the .deb to a running, ready custodyd
# ("Installing the package"), then what systemd saw. Every wait is bounded.
set -euo pipefail
cd /root

fail() {
  echo "systemd check: $*" >&2
  echo "--- systemctl status custodyd" >&2
  systemctl status custodyd --no-pager -l >&2 || true
  echo "--- journalctl -u custodyd (last 40 lines)" >&2
  journalctl -u custodyd --no-pager -o short-monotonic -n 40 >&2 || true
  exit 1
}
# systemd's own debug messages name each notification it takes from the
# service ("Got notification message from PID N (READY=1, STATUS=...)").
systemd-analyze log-level debug
notes() { journalctl -u custodyd --no-pager -o cat | grep -F "Got notification message from PID $1" || true; }
# Waits up to $1 seconds for the shell test in "$2".
wait_for() {
  local seconds=$1 what=$2
  for _ in $(seq "$seconds"); do
    if eval "$what"; then return 0; fi
    sleep 1
  done
  return 1
}
random_pin() { od -An -N12 -tx1 /dev/urandom | tr -d ' \n'; }

# --- The runbook, "Installing the package" -------------------------------
# (softhsm2 is already in the rootfs: the container has no network for apt)
dpkg -i /root/custody.deb >/dev/null
SO_PIN=$(random_pin)
USER_PIN=$(random_pin)
# 1. A token, initialised as the custody user in custodyd's state directory.
#    softhsm2-util asks for the PINs at the terminal (on its command line
#    they would reach the journal, which records the command line of every
#    process that logs, runuser's PAM session among them): here `script`
#    gives it a terminal and types them.
printf '%s\n%s\n%s\n%s\n' "$SO_PIN" "$SO_PIN" "$USER_PIN" "$USER_PIN" |
  script -qec "runuser -u custody -- env SOFTHSM2_CONF=/etc/custody/softhsm2.conf \
    softhsm2-util --init-token --free --label custody" /dev/null >/dev/null ||
  fail "softhsm2-util --init-token failed"
# The operator's certificates and officers come from their own PKI; here a
# dev PKI and three officers, as in deploy/demo.sh.
custodyctl dev-pki --out /root/pki >/dev/null
cp /root/pki/ca.pem /root/pki/client-ca.pem
cp /root/pki/crl.pem /root/pki/client-ca.crl
echo "required = 2" >/root/officers.toml
for officer in alice bob carol; do
  public_key=$(CUSTODY_OFFICER_PASSPHRASE="check passphrase of $officer" \
    custodyctl officer keygen --officer-id "$officer" --out "/root/$officer.key" | awk '/public key/ {print $NF}')
  printf '[[officers]]\nid = "%s"\nprincipal = "%s"\npublic_key = "%s"\n' "$officer" "$officer" "$public_key" >>/root/officers.toml
done
cd /root/pki
# 2. Secrets: root-only files the unit hands over as credentials.
install -m 0600 /dev/stdin /etc/custody/credentials/hsm.pin <<<"$USER_PIN"
install -m 0600 server.key /etc/custody/credentials/tls.key
# 3. Certificates (not secret) and the officers' genesis file.
install -d /etc/custody/tls && cp server.pem client-ca.pem client-ca.crl /etc/custody/tls/
cp /root/officers.toml /etc/custody/officers.toml
cd /root
# 4. Start it: systemd waits for custodyd's READY=1.
timeout 150 systemctl enable --now custodyd || fail "systemctl enable --now custodyd failed"
[ "$(systemctl is-active custodyd)" = active ] || fail "custodyd is not active after its start"
pid=$(systemctl show -p MainPID --value custodyd)
notes "$pid" | grep -q 'READY=1' || fail "systemd took no READY=1 from custodyd (PID $pid)"
status=$(systemctl show -p StatusText --value custodyd)
case "$status" in ready*) ;; *) fail "custodyd's status is '$status', not ready" ;; esac
echo "started: active, READY=1 from PID $pid, Status: \"$status\""

# --- Readiness over gRPC, mTLS on loopback ---------------------------------
export CUSTODY_SERVER=https://localhost:7443 CUSTODY_CA=/root/pki/ca.pem
export CUSTODY_CERT=/root/pki/operator.pem CUSTODY_KEY=/root/pki/operator.key
for service in "" custody.v1.SigningService; do
  answer=$(custodyctl health --service "$service") || fail "custodyctl health --service '$service': $answer"
  echo "health '$service': $answer"
done
# ... and says so when it is not: exit status 1 for a service it does not serve.
if custodyctl health --service custody.v1.NoSuchService >/dev/null 2>&1; then
  fail "custodyctl health succeeded for a service custodyd does not serve"
fi
curl_metrics() { exec 3<>/dev/tcp/127.0.0.1/9464 && printf 'GET /metrics HTTP/1.0\r\n\r\n' >&3 && cat <&3; }
curl_metrics | grep -q '^custody_serving 1' || fail "the metrics do not say custody_serving 1"

# --- The hardening is in force, and custodyd runs under it ----------------
proc=/proc/$pid/status
grep -q '^NoNewPrivs:[[:space:]]*1' "$proc" || fail "NoNewPrivs is not set"
grep -q '^Seccomp:[[:space:]]*2' "$proc" || fail "no seccomp filter"
grep -q '^CapBnd:[[:space:]]*0000000000000000' "$proc" || fail "the capability bounding set is not empty"
[ "$(stat -c %U /proc/"$pid")" = custody ] || fail "custodyd does not run as custody"
[ -z "$(ls /run/credentials/custodyd.service/ 2>/dev/null | grep -v -e '^hsm.pin$' -e '^tls.key$')" ] ||
  fail "unexpected credentials"
echo "hardening: user custody, NoNewPrivs, seccomp, no capabilities; credentials hsm.pin and tls.key"

# --- The watchdog: systemd takes WATCHDOG=1 at once, then every 15 s (half
# of WatchdogSec=30s); a second one shows the pings keep coming.
wait_for 40 '[ "$(notes "$pid" | grep -c "WATCHDOG=1")" -ge 2 ]' ||
  fail "fewer than two WATCHDOG=1 within 40 s"
[ "$(systemctl show -p NRestarts --value custodyd)" = 0 ] || fail "systemd restarted custodyd"
echo "watchdog: systemd took WATCHDOG=1 from PID $pid twice (WatchdogSec=$(systemctl show -p WatchdogUSec --value custodyd)), no restart"

# --- Reload: SIGHUP, RELOADING=1 then READY=1, the same process ------------
timeout 60 systemctl reload custodyd || fail "systemctl reload custodyd failed"
[ "$(systemctl show -p MainPID --value custodyd)" = "$pid" ] || fail "the reload replaced the process"
[ "$(systemctl is-active custodyd)" = active ] || fail "custodyd is not active after the reload"
notes "$pid" | grep -q 'RELOADING=1' || fail "systemd took no RELOADING=1"
notes "$pid" | sed -n '/RELOADING=1/,$p' | grep -q 'READY=1' || fail "no READY=1 after RELOADING=1"
custodyctl health --service custody.v1.SigningService >/dev/null || fail "not serving after the reload"
echo "reload: RELOADING=1 then READY=1 from PID $pid; serving"

# --- Stop: STOPPING=1, exit status 0 ---------------------------------------
timeout 120 systemctl stop custodyd || fail "systemctl stop custodyd failed"
notes "$pid" | grep -q 'STOPPING=1' || fail "systemd took no STOPPING=1"
result=$(systemctl show -p Result --value custodyd)
code=$(systemctl show -p ExecMainStatus --value custodyd)
[ "$result" = success ] && [ "$code" = 0 ] || fail "the stop ended in '$result', exit status $code"
echo "stop: STOPPING=1, Result=success, exit status 0"

# --- A second start, on the token and database of the first ---------------
timeout 150 systemctl start custodyd || fail "the second start failed"
custodyctl health --service custody.v1.SigningService >/dev/null || fail "not serving after the second start"
timeout 120 systemctl stop custodyd || fail "the second stop failed"
echo "restart: ready again on the same token and database"

# --- No secret in the journal ------------------------------------------------
key_line=$(sed -n 2p /root/pki/server.key)
journal=$(journalctl --no-pager -o verbose)
for secret in "$USER_PIN" "$SO_PIN" "$key_line"; do
  if grep -qF -- "$secret" <<<"$journal"; then
    echo "--- journal fields with a secret:" >&2
    grep -F -- "$secret" <<<"$journal" | sed 's/=.*//' | sort -u >&2
    fail "a secret is in the journal"
  fi
done
echo "journal: $(journalctl -u custodyd --no-pager -o cat | wc -l) lines of custodyd's, no PIN and no key"
