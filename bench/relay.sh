#!/usr/bin/env bash
# bench/relay.sh: relay (outbound) throughput, Tern vs Postfix, both relaying to the same smtp-sink.
#
# What it does: installs postfix + strace if missing, builds target/release/tern (unless TERN_BIN),
# then for each server in turn (Tern, then a private Postfix instance) with smtp-source as the load
# generator (20 sessions, many messages per session) and smtp-sink as the receiving host:
#   1. relay msg/s end to end, 4 KiB and 100 KiB: from the first message sent until the sink has
#      received every message (its `-c` counter), plus the accepted rate (smtp-source's exit)
#   2. messages per outbound connection to that busy destination: messages / sessions counted by
#      the sink over the run (after every connection to it has closed)
#   3. fsync-family calls per relayed message: strace attached for one batch (accept + relay)
#   4. a slow destination beside a fast one: the fast domain's end-to-end rate alone, then again
#      while a sink that answers DATA after 1 s (`smtp-sink -w 1`) holds a backlog of its own
# and prints a table with Tern, Postfix, the ratio and the targets of the issue.
#
# Invariants: everything listens on 127.0.0.1 only, on free ports; every wait has a deadline;
# every process it starts is recorded by PID and stopped by the EXIT trap, also on failure.
# It does not touch the system Postfix instance (/etc/postfix is only read for postfix-files).
# Errors: a failing measurement is logged and shown as n/a; a missing prerequisite aborts.
#
# Knobs (environment): BENCH_TARGET_SECS (length of each throughput batch, default 8),
# BENCH_FSYNC_MSGS (messages in the strace batch, 400), BENCH_SERVERS ("tern postfix"),
# BENCH_WARMUP_MSGS (unrecorded batch before each rate row, 1000), BENCH_CEILING (1: measure
# smtp-source straight into smtp-sink first, the ceiling of any relay here; 0: skip),
# BENCH_SLOW_MSGS (backlog for the slow destination, default 50 x BENCH_TARGET_SECS: at 20
# connections and 1 s per message it stays busy 2.5x as long as the fast run), BENCH_SETTLE_SECS
# (pause with sync before the second server, 15), TERN_BIN (skip the build), BENCH_OUT (results
# dir), BENCH_KEEP=1 (keep the temp dir), BENCH_TERN_OUTBOUND (extra lines for Tern's [outbound]
# section, e.g. $'max_messages_per_connection = 1000'), BENCH_FAST_ROUNDS (rounds of the fast/slow
# pair, 2).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/.." && pwd)"
LIB="$HERE/benchlib.py"
: "${BENCH_TARGET_SECS:=8}"
: "${BENCH_FSYNC_MSGS:=400}"
: "${BENCH_SERVERS:=tern postfix}"
: "${BENCH_SLOW_MSGS:=$((50 * BENCH_TARGET_SECS))}"
: "${BENCH_SETTLE_SECS:=15}"
: "${BENCH_TERN_OUTBOUND:=}"
: "${BENCH_WARMUP_MSGS:=1000}"
: "${BENCH_FAST_ROUNDS:=2}"
: "${BENCH_OUT:=/tmp/tern-relay-bench-$(date +%Y%m%d-%H%M%S)}"
SESSIONS=20
SLOW_SESSIONS=5

# shellcheck source=bench/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

[ "$(id -u)" = 0 ] || die "run as root (apt-get, strace -p, a private Postfix instance)"

# ---------------------------------------------------------------- prerequisites
need=()
command -v smtp-source >/dev/null && command -v smtp-sink >/dev/null \
    && command -v postfix >/dev/null || need+=(postfix)
command -v strace >/dev/null || need+=(strace)
command -v ss >/dev/null || need+=(iproute2)
if [ ${#need[@]} -gt 0 ]; then
    log "installing ${need[*]}"
    apt-get update -qq
    echo 'postfix postfix/main_mailer_type select No configuration' | debconf-set-selections
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
PATH="$PATH:/usr/sbin:/sbin"
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

TMP="$(mktemp -d /tmp/tern-relay-bench.XXXXXX)"
chmod 755 "$TMP"
# Each server in a block group of its own (see run.sh: ext4 without a journal rescans recently
# deleted inodes, and Postfix deletes a queue file per message).
chattr +T "$TMP" 2>/dev/null || log "chattr +T $TMP failed (not ext2/3/4?): directories stay together"
mkdir -p "$BENCH_OUT"
RESULTS="$BENCH_OUT/results.txt"
: >"$RESULTS"
log "temp dir $TMP, results in $BENCH_OUT"

# PIDs of everything started; the trap stops each one by its PID.
SINK_PIDS=() PF_MASTER="" PF_CONF="" TERN_PID="" STRACE_PID="" SLOWSRC_PID="" PERF_PID=""

cleanup() {
    local rc=$?
    trap - EXIT INT TERM ERR
    [ "$rc" = 0 ] || log "exiting with status $rc"
    [ -n "$PERF_PID" ] && { kill -INT "$PERF_PID" 2>/dev/null || true; stop_pid "$PERF_PID" 5; }
    [ -n "$STRACE_PID" ] && { kill -INT "$STRACE_PID" 2>/dev/null || true; stop_pid "$STRACE_PID" 5; }
    stop_pid "$SLOWSRC_PID" 5
    stop_pid "$TERN_PID" 20
    stop_postfix
    stop_sinks
    if [ "${BENCH_KEEP:-0}" = 1 ]; then log "kept $TMP"; else rm -rf "$TMP"; fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
# A command that fails outside a guarded measurement ends the run (set -e): say which one.
set -E
trap 'log "failed (status $?) at line $LINENO: $BASH_COMMAND"' ERR

record() { tee -a "$RESULTS" >&2; }

wait_port() { # PORT SECONDS: poll until something accepts on 127.0.0.1:PORT
    local deadline=$((SECONDS + $2))
    while ((SECONDS < deadline)); do
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        sleep 0.1
    done
    return 1
}

# The probe connections of wait_port count as sessions at a sink: sinks are probed before the
# server starts, and every figure below is a difference of counters taken after that.
open_conns() { # PORT: established connections whose local end is 127.0.0.1:PORT (the sink's side)
    ss -Htn state established "( sport = :$1 )" 2>/dev/null | wc -l
}

wait_no_conns() { # PORT SECONDS: until nothing is connected to the sink (so its session count is final)
    local deadline=$((SECONDS + $2))
    while ((SECONDS < deadline)); do
        [ "$(open_conns "$1")" = 0 ] && return 0
        sleep 0.1
    done
    log "connections to :$1 still open after $2 s: $(open_conns "$1")"
    return 1
}

# ---------------------------------------------------------------- sinks
# Three receiving hosts per server, fresh for each, so their counters are that server's alone:
# "relay" (the busy destination: [route] relay / relayhost), "fast" and "slow" (two domains with
# a transport each). `-c` makes smtp-sink print "sess=S quit=Q mesg=M" whenever a session ends,
# a QUIT arrives or a message's "." arrives: messages received and connections ended.
declare -A SINK_PORT SINK_FILE
start_sinks() { # NAME
    local name="$1" s port extra
    for s in relay fast slow; do
        port=$(python3 "$LIB" freeport)
        extra=()
        [ "$s" = slow ] && extra=(-w 1)   # wait 1 s before answering DATA
        SINK_FILE[$s]="$BENCH_OUT/$name.sink-$s.out"
        smtp-sink -u nobody -c "${extra[@]}" "127.0.0.1:$port" 1000 >"${SINK_FILE[$s]}" 2>&1 &
        SINK_PIDS+=($!)
        SINK_PORT[$s]=$port
        wait_port "$port" 10 || die "smtp-sink ($s) did not listen on $port"
    done
    wait_no_conns "${SINK_PORT[relay]}" 5 || true
    log "$name: sinks relay=:${SINK_PORT[relay]} fast=:${SINK_PORT[fast]} slow=:${SINK_PORT[slow]} (slow answers DATA after 1 s)"
}

sink_counts() { # SINK: print "sessions-ended messages" of that sink
    python3 "$LIB" sinkcount "${SINK_FILE[$1]}" --prefix x | sed 's/^x\.[a-z]*=//' | paste -sd' '
}

# ---------------------------------------------------------------- measurements
# fsync-family calls without ptrace: `perf stat` counts the syscall tracepoints of the server's
# processes (and of children they fork later) while a load runs at full speed. strace (fsyncs
# below) stops every syscall of every thread and so slows the server and changes its batching;
# this count does not. Empty when perf or the tracepoints are unavailable. Tern only: a counter
# attached with -p is lost when its process exits (the counts of children forked later fold into
# it), so for Postfix, whose cleanup processes exit after 100 messages, it would undercount.
PERF_PID="" PERF_FILE="" PERF_CALLS=""
PERF_EVENTS=syscalls:sys_enter_fsync,syscalls:sys_enter_fdatasync,syscalls:sys_enter_syncfs,syscalls:sys_enter_sync_file_range
perf_start() { # FILE PID...
    PERF_FILE="$1"
    shift
    [ $# -gt 0 ] && command -v perf >/dev/null || return 0
    perf stat -x, -e "$PERF_EVENTS" -o "$PERF_FILE" -p "$(echo "$@" | tr ' ' ',')"         >/dev/null 2>"$PERF_FILE.err" &
    PERF_PID=$!
    sleep 0.5   # attached (perf stat -p attaches at once; a short margin)
}
perf_stop() { # sets PERF_CALLS to the number of calls counted, or to nothing
    PERF_CALLS=""
    [ -n "$PERF_PID" ] || return 0
    local i
    kill -INT "$PERF_PID" 2>/dev/null || true   # perf stat prints its counts on SIGINT
    for ((i = 0; i < 100; i++)); do kill -0 "$PERF_PID" 2>/dev/null || break; sleep 0.1; done
    stop_pid "$PERF_PID" 5
    PERF_PID=""
    PERF_CALLS=$(awk -F, '$3 ~ /sys_enter/ && $1 ~ /^[0-9]+$/ {n += $1; ok = 1} END {if (ok) print n}' \
        "$PERF_FILE" 2>/dev/null || true)
}

# relay_rate NAME ROW SIZE MINMSGS PID...: one calibrated load run to the busy destination, then
# its messages per connection from the sink's counters (after every connection has closed) and
# its fsyncs per message from perf.
relay_rate() {
    local name="$1" row="$2" size="$3" min="$4" sb mb sa ma calls
    shift 4
    log "$name: relay, $row, $SESSIONS sessions, many messages per session"
    if [ "$BENCH_WARMUP_MSGS" -gt 0 ]; then
        # Unrecorded: a fresh server (Postfix starts at 5 connections per destination, Tern's window
        # at 5) and a cold cache would otherwise skew the calibration batch that sizes the run.
        python3 "$LIB" load --port "$PORT" --prefix "$name.$row.warmup" --size "$size" --reuse \
            --msgs "$BENCH_WARMUP_MSGS" --rcpt "sink@relay.test" --sink-count "${SINK_FILE[relay]}" \
            >/dev/null || log "$name: $row warm-up failed"
        wait_no_conns "${SINK_PORT[relay]}" 30 || true
    fi
    read -r sb mb <<<"$(sink_counts relay)"
    perf_start "$BENCH_OUT/$name.$row.perf" "$@"
    python3 "$LIB" load --port "$PORT" --prefix "$name.$row" --size "$size" --reuse \
        --target-secs "$BENCH_TARGET_SECS" --min-msgs "$min" --rcpt "sink@relay.test" \
        --sink-count "${SINK_FILE[relay]}" | record || { log "$name: $row run failed"; return 0; }
    wait_no_conns "${SINK_PORT[relay]}" 30 || true
    sleep 1   # the server's last DONE records / queue file removals
    perf_stop
    calls=$PERF_CALLS
    read -r sa ma <<<"$(sink_counts relay)"
    echo "$name.$row.sink_msgs=$((ma - mb))" | record
    if [ -n "$calls" ] && [ $((ma - mb)) -gt 0 ]; then
        echo "$name.$row.perf_fsyncs=$calls" | record
        python3 -c "print('$name.$row.fsync_per_msg=%.3f' % ($calls / $((ma - mb))))" | record
    fi
    echo "$name.$row.sink_conns=$((sa - sb))" | record
    [ $((sa - sb)) -gt 0 ] && python3 -c "print('$name.$row.msgs_per_conn=%.1f' % ($((ma - mb)) / $((sa - sb))))" | record
    return 0
}

# fsyncs NAME PID...: fsync-family calls while one batch is accepted and relayed to the sink.
fsyncs() {
    local name="$1" trace="$BENCH_OUT/$1.strace" args=() p n i want=0
    shift
    for p in "$@"; do args+=(-p "$p"); done
    log "$name: strace on ${#} process(es) for a batch of $BENCH_FSYNC_MSGS relayed messages"
    strace -f -e trace=fsync,fdatasync,sync_file_range,syncfs -o "$trace" "${args[@]}" \
        2>"$trace.err" &
    STRACE_PID=$!
    for p in "$@"; do want=$((want + $(ls "/proc/$p/task" 2>/dev/null | wc -l))); done
    for ((i = 0; i < 100; i++)); do
        n=$(grep -c 'attached' "$trace.err" 2>/dev/null || true)
        ((n >= want)) && break
        sleep 0.1
    done
    if python3 "$LIB" load --port "$PORT" --prefix "$name.fsyncbatch" --size 4096 --reuse \
        --msgs "$BENCH_FSYNC_MSGS" --rcpt "sink@relay.test" --sink-count "${SINK_FILE[relay]}" >/dev/null; then
        # Relayed; the server may still record the deliveries (DONE records, queue file removal).
        python3 "$LIB" waitquiet "$trace" --quiet 2 --timeout 60 || true
        n=$(python3 "$LIB" synccount "$trace")
        echo "$name.fsync.calls=$n" | record
        python3 -c "print('$name.fsync.per_msg=%.3f' % ($n / $BENCH_FSYNC_MSGS))" | record
    else
        log "$name: fsync batch failed"
    fi
    kill -INT "$STRACE_PID" 2>/dev/null || true
    for ((i = 0; i < 100; i++)); do kill -0 "$STRACE_PID" 2>/dev/null || break; sleep 0.1; done
    stop_pid "$STRACE_PID" 5
    STRACE_PID=""
}

# fast_slow NAME: the fast domain alone, then beside a slow destination with a backlog, in
# BENCH_FAST_ROUNDS rounds (each waits for the previous slow backlog to drain first): one 8 s pair
# varies by +-8% with the machine's drift, and the table shows the mean of the rounds' ratios.
fast_slow() {
    local name="$1" n sb mb ma i r _
    n=$(sed -n "s/^$name\.relay4k\.msgs=//p" "$RESULTS" | tail -1)
    [ -n "$n" ] || n=$((500 * BENCH_TARGET_SECS))
    for ((r = 1; r <= BENCH_FAST_ROUNDS; r++)); do
        log "$name: round $r, fast destination alone, $n messages of 4 KiB"
        python3 "$LIB" load --port "$PORT" --prefix "$name.fastalone.r$r" --size 4096 --reuse \
            --msgs "$n" --rcpt "sink@fast.test" --sink-count "${SINK_FILE[fast]}" | record \
            || log "$name: fast-alone run failed"
        wait_no_conns "${SINK_PORT[fast]}" 30 || true
        log "$name: round $r, $BENCH_SLOW_MSGS messages for the slow destination, then the same fast batch"
        read -r _ mb <<<"$(sink_counts slow)"
        smtp-source -s "$SLOW_SESSIONS" -m "$BENCH_SLOW_MSGS" -l 4096 -d -M client.bench.test \
            -f load@client.bench.test -t sink@slow.test "127.0.0.1:$PORT" \
            >"$BENCH_OUT/$name.slowsource.out" 2>&1 &
        SLOWSRC_PID=$!
        # Until the server has accepted the whole slow backlog (60 s deadline).
        for ((i = 0; i < 600; i++)); do kill -0 "$SLOWSRC_PID" 2>/dev/null || break; sleep 0.1; done
        kill -0 "$SLOWSRC_PID" 2>/dev/null && log "$name: slow smtp-source still running after 60 s"
        stop_pid "$SLOWSRC_PID" 5
        SLOWSRC_PID=""
        echo "$name.slow.conns_at_start=$(open_conns "${SINK_PORT[slow]}")" | record
        read -r _ sb <<<"$(sink_counts slow)"
        python3 "$LIB" load --port "$PORT" --prefix "$name.fastmixed.r$r" --size 4096 --reuse \
            --msgs "$n" --rcpt "sink@fast.test" --sink-count "${SINK_FILE[fast]}" | record \
            || log "$name: fast-beside-slow run failed"
        echo "$name.slow.conns_at_end=$(open_conns "${SINK_PORT[slow]}")" | record
        read -r _ ma <<<"$(sink_counts slow)"
        echo "$name.slow.msgs_before_fast=$((sb - mb))" | record
        echo "$name.slow.msgs_during_fast=$((ma - sb))" | record
        echo "$name.slow.backlog=$BENCH_SLOW_MSGS" | record
        wait_no_conns "${SINK_PORT[fast]}" 30 || true
        # The next round's "alone" must be alone: the slow backlog drained (120 s deadline).
        for ((i = 0; i < 1200; i++)); do
            read -r _ ma <<<"$(sink_counts slow)"
            ((ma - mb >= BENCH_SLOW_MSGS)) && break
            sleep 0.1
        done
        ((ma - mb >= BENCH_SLOW_MSGS)) || log "$name: slow backlog not drained after 120 s"
        wait_no_conns "${SINK_PORT[slow]}" 30 || true
    done
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

bench_tern() {
    find_tern || { log "skipping Tern"; return 0; }
    local d="$TMP/tern" cfg i
    mkdir -p "$d"
    cfg="$d/tern.toml"
    start_sinks tern
    # Log level: warnings, plus the SMTP client's one line per outbound connection
    # (event=delivery.attempt messages=N): a cross-check of the sink's connection count.
    cat >"$cfg" <<EOF
hostname = "tern.bench.test"
data_dir = "$d/data"

[[listener]]
address = "127.0.0.1:0"
role = "mx"

[local]
domains = ["bench.test"]

[[user]]
name = "bench"
addresses = ["bench@bench.test"]

[relay]
trusted_networks = ["127.0.0.0/8"]

[limits]
greeting_delay = "0s"

[route]
relay = "[127.0.0.1]:${SINK_PORT[relay]}"

[route.transports]
"fast.test" = "[127.0.0.1]:${SINK_PORT[fast]}"
"slow.test" = "[127.0.0.1]:${SINK_PORT[slow]}"

[outbound]
tls = "none"
$BENCH_TERN_OUTBOUND

[log]
level = "warn,tern::deliver::smtp=info"
EOF
    start_tern "$cfg" mx || { stop_sinks; return 0; }
    log "Tern PID $TERN_PID on 127.0.0.1:$PORT"
    relay_rate tern relay4k 4096 200 "$TERN_PID"
    relay_rate tern relay100k 102400 100 "$TERN_PID"
    fsyncs tern "$TERN_PID"
    fast_slow tern
    stop_pid "$TERN_PID" 30
    TERN_PID=""
    stop_sinks
    # Cross-check from Tern's own log: outbound connections that ended, and the messages they carried.
    python3 - "$BENCH_OUT/tern.err" "127.0.0.1:${SINK_PORT[relay]}" <<'EOF' | record
import re, sys
conns = msgs = 0
for line in open(sys.argv[1], errors="replace"):
    if "delivery.attempt" in line and sys.argv[2] in line:
        m = re.search(r"messages=(\d+)", line)
        conns += 1
        msgs += int(m.group(1)) if m else 0
print(f"tern.log.relay_conns={conns}")
print(f"tern.log.relay_msgs={msgs}")
EOF
}

# ---------------------------------------------------------------- Postfix
postfix_config() { # DIR PORT: a private instance relaying everything to the sinks
    local d="$1" port="$2"
    mkdir -p "$d/etc" "$d/queue" "$d/data"
    chown postfix "$d/data"
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
mynetworks = 127.0.0.0/8
relay_domains =
alias_maps =
alias_database =
biff = no
maillog_file = $d/maillog
maillog_file_prefixes = $d
smtpd_client_connection_count_limit = 0
smtpd_client_event_limit_exceptions = 127.0.0.0/8
# Relaying: everything to the busy sink, two domains to sinks of their own.
relayhost = [127.0.0.1]:${SINK_PORT[relay]}
transport_maps = inline:{ fast.test=smtp:[127.0.0.1]:${SINK_PORT[fast]}, slow.test=smtp:[127.0.0.1]:${SINK_PORT[slow]} }
smtp_tls_security_level = none
EOF
    sed "s/@PORT@/$port/" "$HERE/postfix-master.cf" >"$d/etc/master.cf"
}

bench_postfix() {
    local d="$TMP/pf" i
    start_sinks postfix
    PORT=$(python3 "$LIB" freeport)
    postfix_config "$d" "$PORT"
    PF_CONF="$d/etc"
    postfix -c "$PF_CONF" check >"$BENCH_OUT/postfix.check" 2>&1 || true
    postfix -c "$PF_CONF" start >>"$BENCH_OUT/postfix.start" 2>&1 \
        || die "postfix start failed: $(tail -3 "$d/maillog" 2>/dev/null)"
    for ((i = 0; i < 100; i++)); do
        [ -s "$d/queue/pid/master.pid" ] && break
        sleep 0.1
    done
    PF_MASTER=$(tr -d ' \n' <"$d/queue/pid/master.pid" 2>/dev/null || true)
    [ -n "$PF_MASTER" ] || die "no Postfix master.pid"
    wait_port "$PORT" 10 || die "Postfix did not listen on $PORT"
    log "Postfix master PID $PF_MASTER on 127.0.0.1:$PORT"
    # No perf count for Postfix: a perf counter attached to a process is lost when that process
    # exits, and Postfix's cleanup processes (which do the fsyncs) exit after 100 uses. Its
    # fsyncs come from the strace batch, which follows every fork.
    relay_rate postfix relay4k 4096 200
    relay_rate postfix relay100k 102400 100
    # shellcheck disable=SC2046
    fsyncs postfix $(python3 "$LIB" tree "$PF_MASTER")
    fast_slow postfix
    cp "$d/maillog" "$BENCH_OUT/postfix.maillog" 2>/dev/null || true
    stop_postfix
    stop_sinks
    # Cross-check from Postfix's log: deliveries to the busy sink, and how many of them went over
    # a reused connection (Postfix adds conn_use=N, N >= 2, to those).
    python3 - "$BENCH_OUT/postfix.maillog" "127.0.0.1]:${SINK_PORT[relay]}" <<'EOF' | record
import sys
sent = reused = 0
for line in open(sys.argv[1], errors="replace"):
    if "status=sent" in line and sys.argv[2] in line:
        sent += 1
        reused += "conn_use=" in line
print(f"postfix.log.relay_sent={sent}")
print(f"postfix.log.relay_new_conns={sent - reused}")
EOF
}

# ---------------------------------------------------------------- main
{
    echo "# $(date -u +%FT%TZ) $(uname -r) $(nproc) cores; $(postconf -d mail_version 2>/dev/null)"
    echo "# relay; target ${BENCH_TARGET_SECS}s per batch, $SESSIONS sessions, fsync batch $BENCH_FSYNC_MSGS, slow backlog $BENCH_SLOW_MSGS"
} >>"$RESULTS"
START=$SECONDS
# The ceiling: smtp-source straight into an smtp-sink, no server in between (one sink process
# takes every relayed message, so neither server can relay faster than this on this machine).
if [ "${BENCH_CEILING:-1}" = 1 ]; then
    start_sinks ceiling
    PORT=${SINK_PORT[relay]}
    for sz in 4096 102400; do
        row=ceil$((sz / 1024))k
        log "ceiling: smtp-source -> smtp-sink, $row"
        python3 "$LIB" load --port "$PORT" --prefix "sink.$row" --size "$sz" --reuse \
            --target-secs "$BENCH_TARGET_SECS" --min-msgs 100 --rcpt "sink@relay.test" \
            --sink-count "${SINK_FILE[relay]}" | record || log "ceiling $row failed"
    done
    stop_sinks
fi
run_servers
log "done in $((SECONDS - START))s"
echo
python3 "$LIB" relaytable "$RESULTS" | tee "$BENCH_OUT/table.txt"
echo
echo "Raw figures: $RESULTS"
