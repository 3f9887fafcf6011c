#!/usr/bin/env bash
# bench/submission.sh: authenticated submission over STARTTLS with DKIM signing, Tern vs Postfix
# (+ Dovecot SASL + OpenDKIM), same load generator (bench/submit-load.py), 4 KiB messages.
#
# What it does: installs postfix, dovecot-core, opendkim, opendkim-tools if missing, builds
# target/release/tern (unless TERN_BIN), makes one TLS certificate both servers offer, then for
# each server in turn (Tern, then a private Postfix with a private Dovecot for SASL and a private
# OpenDKIM milter), both relaying everything to an smtp-sink of their own:
#   0. a check: one message to a dumping sink must carry an RSA-SHA256 DKIM-Signature (d=bench.test)
#   1. accepted msg/s: 20 sessions, each STARTTLS + AUTH PLAIN once, then 4 KiB messages (From: the
#      user's address) for BENCH_TARGET_SECS; end to end: until the sink has received them all
#   2. logins/s: 20 loops of connect, EHLO, STARTTLS, EHLO, AUTH PLAIN, QUIT (the same login)
#   3. Tern only: password spraying: BENCH_SPRAY_ACCOUNTS logins (BENCH_SPRAY_REAL of them real
#      users, the rest unknown), BENCH_SPRAY_PASSWORDS wrong passwords each, every attempt from its
#      own 127.A.B.C (a /24 of its own); then, from Tern's auth.login log lines, the password
#      hashes computed per login, and the most in any 60 s window (target: at most 1)
# and prints a table with Tern, Postfix, the ratio and the targets of the issue.
#
# Fairness: both sign with one RSA-2048 key each (`tern dkim generate --algorithm rsa`,
# `opendkim-genkey -b 2048`), relaxed/relaxed; both offer the same certificate (ECDSA P-256 by
# default); Dovecot's passwd-file holds the very argon2id hash Tern stores for the user (same cost
# per verification); both refuse a sender that is not the login's (Postfix:
# reject_sender_login_mismatch); both relay to an smtp-sink on 127.0.0.1 without TLS.
#
# Invariants: everything listens on 127.0.0.1 only, on free ports; every wait has a deadline;
# every process it starts is recorded by PID and stopped by the EXIT trap, also on failure. The
# system Postfix, Dovecot and OpenDKIM are not touched (private config, queue, base and state dirs).
# Errors: a failing measurement is logged and shown as n/a; a missing prerequisite aborts.
#
# Knobs (environment): BENCH_TARGET_SECS (length of each rate run, 8), BENCH_WARMUP_SECS (2),
# BENCH_SESSIONS (20), BENCH_PROCS (load generator processes, 2), BENCH_ROUNDS (rate runs per
# server, 1), BENCH_SERVERS ("tern postfix"), BENCH_SPRAY (1: run the spray), BENCH_SPRAY_ACCOUNTS
# (1000), BENCH_SPRAY_REAL (100), BENCH_SPRAY_PASSWORDS (3), BENCH_SPRAY_GAP (seconds between
# spray rounds, 0; > 60 lets every account be hashed again), BENCH_CERT (ec | rsa), BENCH_SETTLE_SECS
# (10), TERN_BIN (skip the build), BENCH_OUT (results dir), BENCH_KEEP=1 (keep the temp dir).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/.." && pwd)"
LIB="$HERE/benchlib.py"
GEN="$HERE/submit-load.py"
: "${BENCH_TARGET_SECS:=8}"
: "${BENCH_WARMUP_SECS:=2}"
: "${BENCH_SESSIONS:=20}"
: "${BENCH_PROCS:=2}"
: "${BENCH_ROUNDS:=1}"
: "${BENCH_SERVERS:=tern postfix}"
: "${BENCH_SPRAY:=1}"
: "${BENCH_SPRAY_ACCOUNTS:=1000}"
: "${BENCH_SPRAY_REAL:=100}"
: "${BENCH_SPRAY_PASSWORDS:=3}"
: "${BENCH_SPRAY_GAP:=0}"
: "${BENCH_CERT:=ec}"
: "${BENCH_PF_MILTER:=1}"
: "${BENCH_SETTLE_SECS:=10}"
: "${BENCH_OUT:=/tmp/tern-submission-bench-$(date +%Y%m%d-%H%M%S)}"
USER_NAME=bench
USER_ADDR=bench@bench.test
PASSWORD="bench-$(head -c 9 /dev/urandom | base64 | tr '+/' '-_')"

# shellcheck source=bench/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

[ "$(id -u)" = 0 ] || die "run as root (apt-get, a private Postfix/Dovecot/OpenDKIM)"

# ---------------------------------------------------------------- prerequisites
need=()
command -v smtp-source >/dev/null && command -v smtp-sink >/dev/null \
    && command -v postfix >/dev/null || need+=(postfix)
command -v dovecot >/dev/null && command -v doveadm >/dev/null || need+=(dovecot-core)
command -v opendkim >/dev/null || need+=(opendkim)
command -v opendkim-genkey >/dev/null || need+=(opendkim-tools)
command -v openssl >/dev/null || need+=(openssl)
command -v ss >/dev/null || need+=(iproute2)
if [ ${#need[@]} -gt 0 ]; then
    log "installing ${need[*]}"
    apt-get update -qq
    echo 'postfix postfix/main_mailer_type select No configuration' | debconf-set-selections
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
PATH="$PATH:/usr/sbin:/sbin"
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || die "python3 >= 3.11 needed (asyncio StreamWriter.start_tls)"

TMP="$(mktemp -d /tmp/tern-submission-bench.XXXXXX)"
chmod 755 "$TMP"
chattr +T "$TMP" 2>/dev/null || true   # each server's files in a block group of its own (run.sh)
mkdir -p "$BENCH_OUT"
RESULTS="$BENCH_OUT/results.txt"
: >"$RESULTS"
log "temp dir $TMP, results in $BENCH_OUT"

# PIDs of everything started; the trap stops each one by its PID.
SINK_PIDS=() PF_MASTER="" PF_CONF="" TERN_PID="" DOVE_PID="" DKIM_PID=""
# OpenDKIM refuses a config or key file under a directory others can write to (/tmp): its
# files live in a root-only directory under /run, removed by the trap.
DKIM_DIR="$(mktemp -d /run/tern-submission-dkim.XXXXXX)"
chmod 700 "$DKIM_DIR"

stop_all() {
    stop_pid "$TERN_PID" 20
    TERN_PID=""
    stop_postfix
    stop_pid "$DKIM_PID" 10
    DKIM_PID=""
    stop_pid "$DOVE_PID" 10
    DOVE_PID=""
    stop_sinks
}

cleanup() {
    local rc=$?
    trap - EXIT INT TERM ERR
    [ "$rc" = 0 ] || log "exiting with status $rc"
    stop_all
    if [ "${BENCH_KEEP:-0}" = 1 ]; then log "kept $TMP"; else rm -rf "$TMP"; fi
    rm -rf "$DKIM_DIR"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
set -E
trap 'log "failed (status $?) at line $LINENO: $BASH_COMMAND"' ERR

record() { tee -a "$RESULTS" >&2; }

# cpu_secs PID...: CPU seconds (user + system) of these processes and their live descendants,
# children they already reaped included (cutime/cstime): Postfix's smtpd and cleanup processes
# come and go, and their time lands in their parent's counters when they exit.
cpu_secs() {
    python3 - "$HERE" "$@" <<'EOF'
import os, sys
sys.path.insert(0, sys.argv[1])
import benchlib
pids = set()
for root in sys.argv[2:]:
    if root:
        pids.update(benchlib.descendants(int(root)))
ticks = 0
for pid in pids:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        continue
    ticks += sum(int(x) for x in fields[11:15])  # utime stime cutime cstime
print(f"{ticks / os.sysconf('SC_CLK_TCK'):.2f}")
EOF
}

# per_event NAME.ROW COUNTKEY CPU_BEFORE CPU_AFTER: the server's CPU ms per message/login of a run.
per_event() {
    local key="$1" countkey="$2" before="$3" after="$4" n
    n=$(sed -n "s/^$key\.$countkey=//p" "$RESULTS" | tail -1)
    [ -n "$n" ] && [ "$n" -gt 0 ] || return 0
    python3 -c "print('$key.cpu_s=%.2f' % ($after - $before)); print('$key.cpu_ms=%.3f' % (($after - $before) * 1000 / $n))" | record
}

wait_port() { # PORT SECONDS: poll until something accepts on 127.0.0.1:PORT
    local deadline=$((SECONDS + $2))
    while ((SECONDS < deadline)); do
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        sleep 0.1
    done
    return 1
}

# ---------------------------------------------------------------- shared pieces
# One certificate for both servers: the TLS handshake costs the same on each side.
CERT="$TMP/cert.pem" KEY="$TMP/key.pem"
if [ "$BENCH_CERT" = rsa ]; then keyopt=(-newkey rsa:2048); else keyopt=(-newkey ec -pkeyopt ec_paramgen_curve:P-256); fi
openssl req -x509 "${keyopt[@]}" -nodes -days 7 -subj /CN=bench.test \
    -addext subjectAltName=DNS:bench.test -keyout "$KEY" -out "$CERT" >/dev/null 2>&1 \
    || die "openssl could not make a certificate"
chmod 644 "$CERT"
chmod 600 "$KEY"

# smtp-sinks per server: "relay" (everything) and "check" (dumps what it gets: the DKIM check).
declare -A SINK_PORT SINK_FILE
start_sinks() { # NAME
    local name="$1" s port extra
    for s in relay check; do
        port=$(python3 "$LIB" freeport)
        extra=()
        if [ "$s" = check ]; then
            mkdir -p "$TMP/$name.dump" && chown nobody "$TMP/$name.dump"
            extra=(-D "$TMP/$name.dump/mail")
        fi
        SINK_FILE[$s]="$BENCH_OUT/$name.sink-$s.out"
        smtp-sink -u nobody -c "${extra[@]}" "127.0.0.1:$port" 1000 >"${SINK_FILE[$s]}" 2>&1 &
        SINK_PIDS+=($!)
        SINK_PORT[$s]=$port
        wait_port "$port" 10 || die "smtp-sink ($s) did not listen on $port"
    done
    log "$name: sinks relay=:${SINK_PORT[relay]} check=:${SINK_PORT[check]}"
}

gen() { # MODE PREFIX [ARGS...]: the load generator against $PORT as the bench user
    local mode="$1" prefix="$2"
    shift 2
    python3 "$GEN" "$mode" --port "$PORT" --prefix "$prefix" --user "$USER_NAME" \
        --password "$PASSWORD" --from "$USER_ADDR" --sessions "$BENCH_SESSIONS" \
        --procs "$BENCH_PROCS" "$@"
}

# dkim_check NAME: one message to the dumping sink; its DKIM-Signature must be rsa-sha256, d=bench.test.
dkim_check() {
    local name="$1" f i
    gen send "$name.check" --sessions 1 --procs 1 --count 1 --secs 10 --rcpt "check@check.test" \
        --sink-count "${SINK_FILE[check]}" >/dev/null || { log "$name: check message not accepted"; return 0; }
    f="$TMP/$name.dump/mail"
    for ((i = 0; i < 50; i++)); do [ -s "$f" ] && break; sleep 0.1; done
    cp "$f" "$BENCH_OUT/$name.check.eml" 2>/dev/null || true
    if tr -d '\r' <"$f" 2>/dev/null | sed -n '/^DKIM-Signature:/,/^[^ \t]/p' | tr -d ' \t\n' \
        | grep -q 'a=rsa-sha256.*d=bench.test\|d=bench.test.*a=rsa-sha256'; then
        echo "$name.dkim_signed=1" | record
    else
        log "$name: WARNING: the check message carries no rsa-sha256 DKIM-Signature for bench.test"
        echo "$name.dkim_signed=0" | record
    fi
    echo "$name.dkim_sigs=$(grep -c "^DKIM-Signature:" "$f" 2>/dev/null || true)" | record
}

# rates NAME ROUND PID...: warm-up (unrecorded), messages, logins; the CPU the server's
# processes (PID... and their children) used per message and per login.
rates() {
    local name="$1" r="$2" c0 c1
    shift 2
    if [ "$BENCH_WARMUP_SECS" != 0 ]; then
        gen send "$name.warmup" --secs "$BENCH_WARMUP_SECS" --rcpt "sink@relay.test" \
            --sink-count "${SINK_FILE[relay]}" >/dev/null || log "$name: warm-up failed"
    fi
    log "$name: round $r: $BENCH_SESSIONS sessions, STARTTLS + AUTH PLAIN, 4 KiB messages for ${BENCH_TARGET_SECS}s"
    c0=$(cpu_secs "$@")
    gen send "$name.send4k" --secs "$BENCH_TARGET_SECS" --rcpt "sink@relay.test" --size 4096 \
        --sink-count "${SINK_FILE[relay]}" | record || log "$name: send run failed"
    c1=$(cpu_secs "$@")
    per_event "$name.send4k" msgs "$c0" "$c1"
    log "$name: round $r: $BENCH_SESSIONS loops of connect, STARTTLS, AUTH PLAIN, QUIT for ${BENCH_TARGET_SECS}s"
    c0=$(cpu_secs "$@")
    gen login "$name.login" --secs "$BENCH_TARGET_SECS" | record || log "$name: login run failed"
    c1=$(cpu_secs "$@")
    per_event "$name.login" logins "$c0" "$c1"
}

# ---------------------------------------------------------------- Tern
find_tern() {
    if [ -n "${TERN_BIN:-}" ]; then
        [ -x "$TERN_BIN" ] && return 0
        log "TERN_BIN=$TERN_BIN is not executable"
        return 1
    fi
    command -v cargo >/dev/null || { log "no cargo: cannot build Tern"; return 1; }
    log "building Tern (cargo build --release -p tern --bins)"
    (cd "$REPO" && cargo build --release -p tern --bins) >"$BENCH_OUT/tern.build" 2>&1 \
        || { log "Tern build failed: see $BENCH_OUT/tern.build"; return 1; }
    TERN_BIN="${CARGO_TARGET_DIR:-$REPO/target}/release/tern"
    [ -x "$TERN_BIN" ]
}

TERN_HASH=""   # the bench user's argon2id hash, from users.toml (given to Dovecot too)

bench_tern() {
    find_tern || { log "skipping Tern"; return 0; }
    local d="$TMP/tern" cfg i n r
    mkdir -p "$d"
    cfg="$d/tern.toml"
    start_sinks tern
    # auth.login lines (one per login attempt) at info: the spray's hash count reads them.
    cat >"$cfg" <<EOF
hostname = "tern.bench.test"
data_dir = "$d/data"

[[listener]]
address = "127.0.0.1:0"
role = "submission"

[tls]
certificates = [{ cert = "$CERT", key = "$KEY" }]

[local]
domains = ["bench.test"]

[[user]]
name = "$USER_NAME"
addresses = ["$USER_ADDR"]

[limits]
greeting_delay = "0s"
max_connections = 6000
max_connections_per_ip = 6000

[route]
relay = "[127.0.0.1]:${SINK_PORT[relay]}"

[route.transports]
"check.test" = "[127.0.0.1]:${SINK_PORT[check]}"

[outbound]
tls = "none"

[log]
level = "warn,tern::auth=info"
format = "json"
EOF
    "$TERN_BIN" dkim generate bench.test --algorithm rsa --selector bench --config "$cfg" \
        >"$BENCH_OUT/tern.dkim" 2>&1 || { log "tern dkim generate failed: $(tail -3 "$BENCH_OUT/tern.dkim")"; stop_sinks; return 0; }
    echo "$PASSWORD" | "$TERN_BIN" user add "$USER_NAME" --config "$cfg" >"$BENCH_OUT/tern.useradd" 2>&1 \
        || { log "tern user add failed: $(tail -3 "$BENCH_OUT/tern.useradd")"; stop_sinks; return 0; }
    TERN_HASH=$(python3 - "$d/data/users.toml" "$USER_NAME" <<'EOF'
import re, sys
text = open(sys.argv[1]).read()
# The first argon2id PHC string after the user's table header.
at = text.find(f'"{sys.argv[2]}"')
m = re.search(r"\$argon2id\$[^\"']+", text[max(at, 0):])
print(m.group(0) if m else "")
EOF
)
    [ -n "$TERN_HASH" ] || log "no argon2id hash found in users.toml: Dovecot will use its own"
    # The spray's accounts: BENCH_SPRAY_REAL real users (sprayNNNN, a password nobody guesses),
    # the rest logins nobody has.
    : >"$TMP/spray.accounts"
    for ((i = 0; i < BENCH_SPRAY_ACCOUNTS; i++)); do
        if ((i < BENCH_SPRAY_REAL)); then printf 'spray%04d\n' "$i"; else printf 'ghost%04d@bench.test\n' "$i"; fi
    done >"$TMP/spray.accounts"
    if [ "$BENCH_SPRAY" = 1 ] && ((BENCH_SPRAY_REAL > 0)); then
        log "tern: adding $BENCH_SPRAY_REAL users for the spray"
        for ((i = 0; i < BENCH_SPRAY_REAL && i < BENCH_SPRAY_ACCOUNTS; i++)); do
            head -c 18 /dev/urandom | base64 | "$TERN_BIN" user add "$(printf 'spray%04d' "$i")" \
                --address "$(printf 'spray%04d@bench.test' "$i")" --config "$cfg" >>"$BENCH_OUT/tern.useradd" 2>&1 \
                || { log "tern user add spray$i failed"; break; }
        done
    fi
    start_tern "$cfg" submission || { stop_all; return 0; }
    log "Tern PID $TERN_PID on 127.0.0.1:$PORT (submission)"
    dkim_check tern
    for ((r = 1; r <= BENCH_ROUNDS; r++)); do rates tern "$r" "$TERN_PID"; done
    if [ "$BENCH_SPRAY" = 1 ]; then
        n=$((BENCH_SPRAY_ACCOUNTS * BENCH_SPRAY_PASSWORDS))
        log "tern: spraying $BENCH_SPRAY_ACCOUNTS logins x $BENCH_SPRAY_PASSWORDS passwords ($n attempts, each from its own 127.A.B.C)"
        date +%s.%N >"$TMP/spray.start"
        python3 "$GEN" spray --port "$PORT" --prefix tern.spray --accounts "$TMP/spray.accounts" \
            --passwords "$BENCH_SPRAY_PASSWORDS" --round-gap "$BENCH_SPRAY_GAP" \
            --sessions "$BENCH_SESSIONS" --procs "$BENCH_PROCS" | record || log "tern: spray failed"
        sleep 1   # the last auth.login lines
        spray_hashes "$BENCH_OUT/tern.err" "$TMP/spray.accounts" | record || log "tern: hash count failed"
    fi
    stop_pid "$TERN_PID" 30
    TERN_PID=""
    stop_sinks
}

# spray_hashes LOG ACCOUNTS: password hashes Tern computed for the spray's logins, from its log.
# Tern logs every attempt as event=auth.login with an outcome and a detail
# (crates/tern/src/auth/guard.rs). A PLAIN/LOGIN attempt computes exactly one hash (argon2id,
# or the decoy hash for an unknown login) when it ends with outcome=invalid and detail "wrong
# secret" or "unknown user", or outcome=success without detail "cached"; every other line
# ("refused before any hash", "repeated wrong secret (cached)", "cached", "hashing pool busy")
# computed none. Counted per login, with the most in any 60 s window.
spray_hashes() {
    python3 - "$1" "$2" <<'EOF'
import json, re, sys
from datetime import datetime
accounts = {l.strip() for l in open(sys.argv[2]) if l.strip()}
def when(ts):
    # RFC 3339 with up to 9 fractional digits and a Z: keep microseconds for fromisoformat.
    m = re.match(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(\.\d+)?", ts or "")
    if not m:
        return 0.0
    return datetime.fromisoformat(m.group(1)).timestamp() + float(m.group(2) or 0)
hashes, lines, outcomes, users_seen = {}, 0, {}, set()
for line in open(sys.argv[1], errors="replace"):
    if "auth.login" not in line:
        continue
    try:
        obj = json.loads(line)
    except ValueError:
        continue
    f = obj.get("fields", {})
    if f.get("event") != "auth.login" or f.get("user") not in accounts:
        continue
    user = f["user"]
    lines += 1
    users_seen.add(user)
    outcome, detail = f.get("outcome", ""), f.get("detail", "")
    k = f"{outcome}/{detail or '-'}"
    outcomes[k] = outcomes.get(k, 0) + 1
    hashed = (outcome == "invalid" and detail in ("wrong secret", "unknown user")) or \
             (outcome == "success" and detail != "cached")
    if hashed:
        hashes.setdefault(user, []).append(when(obj.get("timestamp")))
worst = 0
for ts in hashes.values():
    ts.sort()
    j = 0
    for i in range(len(ts)):
        while ts[i] - ts[j] >= 60:
            j += 1
        worst = max(worst, i - j + 1)
total = sum(len(v) for v in hashes.values())
print(f"tern.spray.log_lines={lines}")
print(f"tern.spray.logins_seen={len(users_seen)}")
print(f"tern.spray.hashes={total}")
print(f"tern.spray.logins_hashed={len(hashes)}")
print(f"tern.spray.max_hashes_per_login_per_min={worst}")
for k in sorted(outcomes):
    print(f"# tern.spray.outcome {k}: {outcomes[k]}")
EOF
}

# ---------------------------------------------------------------- Postfix + Dovecot + OpenDKIM
bench_postfix() {
    local d="$TMP/pf" i r dport kport
    mkdir -p "$d/etc" "$d/queue" "$d/data" "$d/dovecot/run" "$d/dovecot/state"
    chown postfix "$d/data"
    start_sinks postfix
    # Dovecot: auth only, a TCP auth listener for Postfix (smtpd_sasl_type = dovecot).
    dport=$(python3 "$LIB" freeport)
    local hash="$TERN_HASH"
    if [ -z "$hash" ]; then
        hash=$(doveadm pw -s ARGON2ID -p "$PASSWORD" | sed 's/^{ARGON2ID}//')
    fi
    printf '%s:{ARGON2ID}%s::::::\n' "$USER_NAME" "$hash" >"$d/dovecot/users"
    chown root:dovecot "$d/dovecot/users" 2>/dev/null || true
    chmod 640 "$d/dovecot/users"
    cat >"$d/dovecot/dovecot.conf" <<EOF
instance_name = tern-bench-dovecot
base_dir = $d/dovecot/run
state_dir = $d/dovecot/state
protocols = none
listen = 127.0.0.1
ssl = no
log_path = $d/dovecot/dovecot.log
auth_mechanisms = plain login
disable_plaintext_auth = no
passdb {
  driver = passwd-file
  args = scheme=ARGON2ID $d/dovecot/users
}
userdb {
  driver = static
  args = uid=nobody gid=nogroup home=/nonexistent
}
service auth {
  inet_listener {
    address = 127.0.0.1
    port = $dport
  }
}
EOF
    dovecot -F -c "$d/dovecot/dovecot.conf" >"$BENCH_OUT/dovecot.out" 2>&1 &
    DOVE_PID=$!
    wait_port "$dport" 15 || { log "Dovecot did not listen: $(tail -3 "$BENCH_OUT/dovecot.out" "$d/dovecot/dovecot.log" 2>/dev/null)"; stop_all; return 0; }
    log "Dovecot PID $DOVE_PID, auth on 127.0.0.1:$dport"
    # OpenDKIM: a signing milter, RSA-2048.
    kport=$(python3 "$LIB" freeport)
    local kd="$DKIM_DIR"
    opendkim-genkey -b 2048 -d bench.test -s bench -D "$kd" >/dev/null 2>&1 || die "opendkim-genkey failed"
    chmod 600 "$kd/bench.private"
    cat >"$kd/opendkim.conf" <<EOF
Syslog no
Mode s
Domain bench.test
Selector bench
KeyFile $kd/bench.private
Socket inet:$kport@127.0.0.1
Canonicalization relaxed/relaxed
SignatureAlgorithm rsa-sha256
OversignHeaders From
InternalHosts 127.0.0.0/8
PidFile $kd/opendkim.pid
EOF
    opendkim -f -x "$kd/opendkim.conf" >"$BENCH_OUT/opendkim.out" 2>&1 &
    DKIM_PID=$!
    wait_port "$kport" 15 || { log "OpenDKIM did not listen: $(tail -3 "$BENCH_OUT/opendkim.out")"; stop_all; return 0; }
    log "OpenDKIM PID $DKIM_PID on 127.0.0.1:$kport"
    # Postfix: a private instance, submission-style smtpd on its own port.
    PORT=$(python3 "$LIB" freeport)
    cat >"$d/etc/main.cf" <<EOF
compatibility_level = 3.6
queue_directory = $d/queue
data_directory = $d/data
mail_owner = postfix
setgid_group = postdrop
myhostname = postfix.bench.test
mydomain = bench.test
myorigin = \$myhostname
mydestination =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.1/32
relay_domains =
alias_maps =
alias_database =
biff = no
maillog_file = $d/maillog
maillog_file_prefixes = $d
smtpd_client_connection_count_limit = 0
smtpd_client_event_limit_exceptions = 127.0.0.0/8
# Submission: TLS, SASL through Dovecot, AUTH only over TLS, senders only as the login's address.
smtpd_tls_cert_file = $CERT
smtpd_tls_key_file = $KEY
smtpd_tls_security_level = encrypt
smtpd_tls_auth_only = yes
smtpd_sasl_auth_enable = yes
smtpd_sasl_type = dovecot
smtpd_sasl_path = inet:127.0.0.1:$dport
smtpd_relay_restrictions = permit_sasl_authenticated, reject
smtpd_recipient_restrictions = permit_sasl_authenticated, reject
smtpd_sender_login_maps = inline:{ $USER_ADDR=$USER_NAME }
smtpd_sender_restrictions = reject_sender_login_mismatch
# DKIM signing by OpenDKIM (BENCH_PF_MILTER=0: without, a diagnosis of where Postfix's time goes).
smtpd_milters = $( [ "$BENCH_PF_MILTER" = 1 ] && echo "inet:127.0.0.1:$kport" )
milter_default_action = tempfail
# Everything to the sink, check.test to the dumping sink.
relayhost = [127.0.0.1]:${SINK_PORT[relay]}
transport_maps = inline:{ check.test=smtp:[127.0.0.1]:${SINK_PORT[check]} }
smtp_tls_security_level = none
EOF
    sed "s/@PORT@/$PORT/" "$HERE/postfix-master.cf" >"$d/etc/master.cf"
    echo "tlsmgr    unix  -       -       n       1000?   1       tlsmgr" >>"$d/etc/master.cf"
    PF_CONF="$d/etc"
    postfix -c "$PF_CONF" check >"$BENCH_OUT/postfix.check" 2>&1 || true
    postfix -c "$PF_CONF" start >>"$BENCH_OUT/postfix.start" 2>&1 \
        || { log "postfix start failed: $(tail -3 "$d/maillog" 2>/dev/null)"; stop_all; return 0; }
    for ((i = 0; i < 100; i++)); do
        [ -s "$d/queue/pid/master.pid" ] && break
        sleep 0.1
    done
    PF_MASTER=$(tr -d ' \n' <"$d/queue/pid/master.pid" 2>/dev/null || true)
    [ -n "$PF_MASTER" ] || { log "no Postfix master.pid"; stop_all; return 0; }
    wait_port "$PORT" 10 || { log "Postfix did not listen on $PORT"; stop_all; return 0; }
    log "Postfix master PID $PF_MASTER on 127.0.0.1:$PORT"
    dkim_check postfix
    for ((r = 1; r <= BENCH_ROUNDS; r++)); do rates postfix "$r" "$PF_MASTER" "$DOVE_PID" "$DKIM_PID"; done
    cp "$d/maillog" "$BENCH_OUT/postfix.maillog" 2>/dev/null || true
    cp "$d/dovecot/dovecot.log" "$BENCH_OUT/dovecot.log" 2>/dev/null || true
    stop_all
}

# ---------------------------------------------------------------- table
table() {
    python3 - "$RESULTS" "$BENCH_SPRAY_ACCOUNTS" "$(nproc)" <<'EOF'
import sys
vals = {}
for line in open(sys.argv[1]):
    line = line.strip()
    if "=" in line and not line.startswith("#"):
        k, v = line.split("=", 1)
        try:
            vals.setdefault(k, []).append(float(v))
        except ValueError:
            pass
def med(k):
    xs = sorted(vals.get(k, []))
    if not xs:
        return None
    n = len(xs)
    return xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2
def fmt(v):
    return "n/a" if v is None else (f"{v:,.0f}" if abs(v) >= 100 else f"{v:.2f}")
rows = [["figure", "Postfix", "Tern", "Tern/Postfix", "target"]]
for label, key, target in (
    ("accepted msg/s, 4 KiB, STARTTLS+AUTH, DKIM", "send4k.acc", ">= 2x Postfix"),
    ("end-to-end msg/s (at the sink), 4 KiB", "send4k.e2e", ""),
    ("logins/s (connect, STARTTLS, AUTH, QUIT)", "login.rate", f">= 500 on {sys.argv[3]} cores"),
):
    p, t = med(f"postfix.{key}"), med(f"tern.{key}")
    r = f"{t / p:.2f}x" if p and t else "n/a"
    rows.append([label, fmt(p), fmt(t), r, target])
cores = float(sys.argv[3])
for label, key in (("server CPU ms per message (sending run)", "send4k.cpu_ms"),
                   ("server CPU ms per login (login run)", "login.cpu_ms")):
    p, t = med(f"postfix.{key}"), med(f"tern.{key}")
    rows.append([label, f"{p:.3f}" if p else "n/a", f"{t:.3f}" if t else "n/a",
                 f"{t / p:.2f}x" if p and t else "n/a", "lower is better"])
p, t = med("postfix.login.cpu_ms"), med("tern.login.cpu_ms")
rows.append([f"logins/s the server's CPU allows on {cores:.0f} cores", fmt(cores * 1000 / p) if p else "n/a",
             fmt(cores * 1000 / t) if t else "n/a", f"{p / t:.2f}x" if p and t else "n/a",
             f">= 500 on {cores:.0f} cores"])
h = med("tern.spray.max_hashes_per_login_per_min")
rows.append(["spray: most hashes per login in 60 s", "", fmt(h), "", "<= 1"])
rows.append(["spray: hashes / attempts", "", f"{fmt(med('tern.spray.hashes'))} / {fmt(med('tern.spray.attempts'))}",
             "", f"{sys.argv[2]} logins"])
def yes(k):
    s = med(k)
    return "n/a" if s is None else ("yes" if s else "NO")
rows.append(["check message DKIM-signed (rsa-sha256)", yes("postfix.dkim_signed"), yes("tern.dkim_signed"), "", "yes"])
w = [max(len(r[i]) for r in rows) for i in range(5)]
for i, r in enumerate(rows):
    print("| " + " | ".join([r[0].ljust(w[0])] + [c.rjust(x) for c, x in zip(r[1:], w[1:])]) + " |")
    if i == 0:
        print("|" + "|".join("-" * (x + 2) for x in w) + "|")
print()
fails = {k: v for k, v in vals.items() if k.endswith(".fail") and sum(v)}
if fails:
    print("failed transactions/logins: " + " ".join(f"{k}={sum(v):.0f}" for k, v in fails.items()))
print("Rates: accepted = replies 250 to the final '.' per second over the run; end to end = until the")
print("sink has received them. Spray hashes: Tern's auth.login log lines that imply a hash.")
print("Server CPU: Tern's process; Postfix's master, Dovecot's and OpenDKIM's process trees (reaped")
print("children included), over each run; 'the server's CPU allows' = cores x 1000 / CPU ms per login,")
print("the rate if the server had the machine to itself (the Python client takes a large share).")
EOF
}

# ---------------------------------------------------------------- main
{
    echo "# $(date -u +%FT%TZ) $(uname -r) $(nproc) cores; $(postconf -d mail_version 2>/dev/null); dovecot $(dovecot --version 2>/dev/null | cut -d' ' -f1); $(opendkim -V 2>/dev/null | head -1)"
    echo "# submission; ${BENCH_TARGET_SECS}s per run, $BENCH_SESSIONS sessions, $BENCH_PROCS generator processes, cert $BENCH_CERT"
    echo "# load at start: $(cut -d' ' -f1-3 /proc/loadavg)"
} >>"$RESULTS"
START=$SECONDS
run_servers
log "done in $((SECONDS - START))s"
echo "# load at end: $(cut -d' ' -f1-3 /proc/loadavg)" >>"$RESULTS"
echo
table | tee "$BENCH_OUT/table.txt"
echo
echo "Raw figures: $RESULTS"
