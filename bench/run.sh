#!/usr/bin/env bash
# bench/run.sh: Tern vs Postfix vs smtp-sink, side by side, in one run on this machine.
#
# What it does: installs postfix + strace if missing, builds target/release/tern, then for each
# server in turn (smtp-sink, a private Postfix instance, Tern) measures with Postfix's smtp-source:
#   1. accepted msg/s, 4 KiB and 100 KiB, 20 parallel sessions, many messages per session (-d)
#   2. end-to-end msg/s (first message sent -> last file in Maildir/new), Postfix and Tern
#   3. accepted msg/s with one message per connection (no -d), 20 sessions
#   4. fsync-family calls per message (accept + local delivery), strace attached for one batch
#   5. PSS per idle session with N sessions open after EHLO (5,000 by default)
# and prints a table with the ratios Tern/Postfix and Tern/smtp-sink.
#
# Invariants: everything listens on 127.0.0.1 only, on free ports; every wait has a deadline;
# every process it starts is recorded by PID and stopped by the EXIT trap, also on failure.
# It does not touch the system Postfix instance (/etc/postfix is only read for postfix-files).
# Errors: a failing measurement is logged and shown as n/a; a missing prerequisite aborts.
#
# Knobs (environment): BENCH_TARGET_SECS (length of each throughput batch, default 8),
# BENCH_IDLE_SESSIONS (5000), BENCH_PF_IDLE_SESSIONS (Postfix idle sessions, default 1000: one
# smtpd process each; 5,000 took ~3 min to fork on this 2-core machine and gave the same per-session PSS),
# BENCH_FSYNC_MSGS (messages in the strace batch, 400), BENCH_SERVERS ("sink postfix tern"),
# TERN_BIN (skip the cargo build and use this binary), BENCH_OUT (results dir), BENCH_KEEP=1 (keep
# the temp dir with spools, logs and Maildirs), BENCH_SETTLE_SECS (pause before a server that
# writes to disk, 65), BENCH_ROUNDS (1: rounds of the load runs, servers alternating; the
# machine's speed drifts by minutes, so 3 rounds give ratios of runs measured close together),
# BENCH_SLOW_FLUSH_US (0: off; N: every fsync/fdatasync/syncfs of Postfix and Tern also holds one
# machine-wide lock for N us, as on a disk whose flush takes that long, one at a time; see
# slowflush.c: a model of a slower disk than this one, for both servers alike).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/.." && pwd)"
LIB="$HERE/benchlib.py"
: "${BENCH_TARGET_SECS:=8}"
: "${BENCH_IDLE_SESSIONS:=5000}"
: "${BENCH_PF_IDLE_SESSIONS:=1000}"   # a process per session: 5,000 take ~3 min to spawn here
: "${BENCH_FSYNC_MSGS:=400}"
: "${BENCH_SERVERS:=sink postfix tern}"
# Rounds of the load runs (figures 1-3), the servers in turn in each round; the table shows
# medians and the median of the per-round ratios. Idle sessions and fsyncs: first round only.
: "${BENCH_ROUNDS:=1}"
ROUND=1
# Between two servers: sync, then wait. ext4 (without a journal, as here) skips inodes deleted
# in the last 60 s when it allocates new ones (RECENTCY_MIN in ialloc.c), so without the pause
# the queue-file churn of one server (Postfix deletes a file per message) slows the file
# creation of the next one, and its writeback competes with the next one's. Measured here:
# Tern's 4 KiB end-to-end rate moved from 2,822/s (right after Postfix) to 3,441/s (before it).
: "${BENCH_SETTLE_SECS:=65}"
: "${BENCH_SLOW_FLUSH_US:=0}"
: "${BENCH_OUT:=/tmp/tern-bench-results-$(date +%Y%m%d-%H%M%S)}"
SESSIONS=20

# shellcheck source=bench/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
# Frees DIR only if the disk is short (below 16 GiB free): see the note at TMP.
free_if_low() {
    [ "${BENCH_KEEP:-0}" = 1 ] && return 0
    local avail_kib
    avail_kib=$(df -Pk "$1" | awk 'NR==2 {print $4}')
    if [ "${avail_kib:-0}" -lt $((16 * 1024 * 1024)) ]; then
        log "disk below 16 GiB free: removing $1"
        rm -rf "$1"
    fi
}

[ "$(id -u)" = 0 ] || die "run as root (apt-get, strace -p, /proc/PID/smaps_rollup of other users)"

# ---------------------------------------------------------------- prerequisites
install_deps() {
    local need=()
    command -v smtp-source >/dev/null && command -v smtp-sink >/dev/null \
        && command -v postfix >/dev/null || need+=(postfix)
    command -v strace >/dev/null || need+=(strace)
    [ ${#need[@]} -eq 0 ] && return 0
    log "installing ${need[*]}"
    apt-get update -qq
    echo 'postfix postfix/main_mailer_type select No configuration' | debconf-set-selections
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
}
install_deps
PATH="$PATH:/usr/sbin:/sbin"

# Many idle sessions need many descriptors, in this shell and in every server it starts.
ulimit -Hn 65536 2>/dev/null || true
ulimit -n "$(ulimit -Hn)"

TMP="$(mktemp -d /tmp/tern-bench.XXXXXX)"
chmod 755 "$TMP"   # Postfix's virtual(8) runs as nobody and must traverse it
# Each server and round works in a directory of its own, and nothing is deleted before the end
# (unless the disk runs low). Why: ext4 without a journal (as here) does not reuse an inode freed
# in the last 60 s (360 s while its inode-table block is dirty) and rescans every such inode
# for each file it creates in that block group. Measured with perf: 34-47% of Tern's CPU in
# recently_deleted() when its Maildir shared a block group with files deleted minutes before
# (Postfix's queue files, an earlier round's data). The "top directory" flag makes ext4 place
# each subdirectory of $TMP in a block group of its own (Orlov), away from those.
chattr +T "$TMP" 2>/dev/null || log "chattr +T $TMP failed (not ext2/3/4?): directories stay together"
mkdir -p "$BENCH_OUT"
RESULTS="$BENCH_OUT/results.txt"
: >"$RESULTS"
log "temp dir $TMP, results in $BENCH_OUT"

# The slow-disk model (BENCH_SLOW_FLUSH_US): a preload for both servers, built here.
SLOW_ENV=()
if [ "$BENCH_SLOW_FLUSH_US" != 0 ]; then
    cc -O2 -shared -fPIC -o "$TMP/slowflush.so" "$HERE/slowflush.c" -ldl \
        || die "cannot build $HERE/slowflush.c"
    : >"$TMP/slowflush.lock"
    chmod 644 "$TMP/slowflush.so"
    chmod 666 "$TMP/slowflush.lock"
    SLOW_ENV=(LD_PRELOAD="$TMP/slowflush.so" SLOW_FLUSH_US="$BENCH_SLOW_FLUSH_US"
        SLOW_FLUSH_LOCK="$TMP/slowflush.lock")
    log "slow-disk model: every flush holds the disk for ${BENCH_SLOW_FLUSH_US} us"
fi

# PIDs of everything started; the trap stops each one by its PID.
SINK_PID="" PF_MASTER="" PF_CONF="" TERN_PID="" STRACE_PID="" IDLE_PID=""

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    exec 7>&- 2>/dev/null || true   # the idle client's stdin
    [ -n "$STRACE_PID" ] && { kill -INT "$STRACE_PID" 2>/dev/null || true; stop_pid "$STRACE_PID" 5; }
    stop_pid "$IDLE_PID" 5
    stop_pid "$SINK_PID" 5
    stop_pid "$TERN_PID" 20
    stop_postfix
    if [ "${BENCH_KEEP:-0}" = 1 ]; then log "kept $TMP"; else rm -rf "$TMP"; fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

record() { tee -a "$RESULTS" >&2; }

wait_port() { # PORT SECONDS: poll until something accepts on 127.0.0.1:PORT
    local deadline=$((SECONDS + $2))
    while ((SECONDS < deadline)); do
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        sleep 0.1
    done
    return 1
}

# ---------------------------------------------------------------- measurements
# throughput NAME PORT [MAILDIR]: figures 1-3 for one server.
throughput() {
    local name="$1" port="$2" maildir="${3:-}" md=()
    [ -n "$maildir" ] && md=(--maildir "$maildir")
    log "$name: accepted rate, 4 KiB, $SESSIONS sessions, many messages per session"
    python3 "$LIB" load --port "$port" --prefix "$name.acc4k" --size 4096 --reuse \
        --target-secs "$BENCH_TARGET_SECS" "${md[@]}" | record || log "$name: 4 KiB run failed"
    log "$name: accepted rate, 100 KiB"
    python3 "$LIB" load --port "$port" --prefix "$name.acc100k" --size 102400 --reuse \
        --target-secs "$BENCH_TARGET_SECS" --min-msgs 100 "${md[@]}" | record \
        || log "$name: 100 KiB run failed"
    log "$name: one message per connection, 4 KiB"
    python3 "$LIB" load --port "$port" --prefix "$name.conn4k" --size 4096 \
        --target-secs "$BENCH_TARGET_SECS" "${md[@]}" | record || log "$name: per-connection run failed"
}

# fsyncs NAME PORT MAILDIR PID...: count fsync-family calls while one batch is accepted and delivered.
fsyncs() {
    local name="$1" port="$2" maildir="$3"
    shift 3
    local trace="$BENCH_OUT/$name.strace" args=() p n i
    for p in "$@"; do args+=(-p "$p"); done
    log "$name: strace on ${#} process(es) for a batch of $BENCH_FSYNC_MSGS messages"
    strace -f -e trace=fsync,fdatasync,sync_file_range,syncfs -o "$trace" "${args[@]}" \
        2>"$trace.err" &
    STRACE_PID=$!
    # Attached once strace has said so for every thread of every PID (-p PID -f attaches all the
    # threads of a multi-threaded process, one line each). 10 s deadline: a process that exits
    # meanwhile never reports.
    local want=0
    for p in "$@"; do want=$((want + $(ls "/proc/$p/task" 2>/dev/null | wc -l))); done
    for ((i = 0; i < 100; i++)); do
        n=$(grep -c 'attached' "$trace.err" 2>/dev/null || true)
        ((n >= want)) && break
        sleep 0.1
    done
    local mdargs=()
    [ -n "$maildir" ] && mdargs=(--maildir "$maildir")
    if python3 "$LIB" load --port "$port" --prefix "$name.fsyncbatch" --size 4096 --reuse \
        --msgs "$BENCH_FSYNC_MSGS" "${mdargs[@]}" >/dev/null; then
        # Delivery done; the server may still commit its own bookkeeping (STATE/DONE records, queue
        # file removal): wait until the trace stops growing.
        python3 "$LIB" waitquiet "$trace" --quiet 2 --timeout 60 || true
        kill -INT "$STRACE_PID" 2>/dev/null || true
        wait "$STRACE_PID" 2>/dev/null || true
        STRACE_PID=""
        n=$(python3 "$LIB" synccount "$trace")
        echo "$name.fsync.calls=$n" | record
        python3 -c "print('$name.fsync.per_msg=%.3f' % ($n / $BENCH_FSYNC_MSGS))" | record
    else
        log "$name: fsync batch failed"
        kill -INT "$STRACE_PID" 2>/dev/null || true
        wait "$STRACE_PID" 2>/dev/null || true
        STRACE_PID=""
    fi
}

# idle NAME PORT ROOTPID COUNT [PROCNAME]: PSS of the server's process tree before and after COUNT
# idle sessions (greeting + EHLO), divided by the number actually opened.
idle() {
    local name="$1" port="$2" root="$3" count="$4" pname="${5:-}" before after opened i out
    out="$BENCH_OUT/$name.idle.out"
    before=$(python3 "$LIB" pss --root "$root" --prefix x | sed -n 's/^x.pss_kib=//p')
    log "$name: opening $count idle sessions (PSS before: $before KiB)"
    rm -f "$TMP/idle.in"
    mkfifo "$TMP/idle.in"
    python3 "$HERE/idle_sessions.py" --port "$port" --count "$count" <"$TMP/idle.in" >"$out" \
        2>"$out.err" &
    IDLE_PID=$!
    exec 7>"$TMP/idle.in"
    for ((i = 0; i < 2400; i++)); do   # 240 s deadline; the client has its own 180 s one
        grep -q '^failed=' "$out" 2>/dev/null && break
        kill -0 "$IDLE_PID" 2>/dev/null || break
        sleep 0.1
    done
    opened=$(sed -n 's/^open=//p' "$out")
    if [ -n "$opened" ] && [ "$opened" -gt 0 ]; then
        python3 "$LIB" pss --root "$root" --prefix "$name.idle.after" ${pname:+--name "$pname"} \
            >"$out.pss"
        record <"$out.pss"
        after=$(sed -n "s/^$name.idle.after.pss_kib=//p" "$out.pss")
        echo "$name.idle.sessions=$opened" | record
        echo "$name.idle.pss_before_kib=$before" | record
        python3 -c "print('$name.idle.per_session_kib=%.1f' % (($after - $before) / $opened))" | record
        [ "$opened" -lt "$count" ] && log "$name: only $opened of $count sessions opened: $(head -1 "$out.err")"
    else
        log "$name: idle client opened nothing: $(head -3 "$out.err" 2>/dev/null)"
    fi
    exec 7>&-
    stop_pid "$IDLE_PID" 10
    IDLE_PID=""
}

# ---------------------------------------------------------------- smtp-sink
bench_sink() {
    local port
    port=$(python3 "$LIB" freeport)
    # -u: drop root; -c: count; -m: concurrency cap (default 256) raised for the idle test.
    smtp-sink -u nobody -m $((BENCH_IDLE_SESSIONS + 100)) "127.0.0.1:$port" 4096 \
        >"$BENCH_OUT/sink.log" 2>&1 &
    SINK_PID=$!
    wait_port "$port" 10 || die "smtp-sink did not listen on $port"
    log "smtp-sink PID $SINK_PID on 127.0.0.1:$port (round $ROUND)"
    if [ "$ROUND" = 1 ]; then idle sink "$port" "$SINK_PID" "$BENCH_IDLE_SESSIONS"; fi
    throughput sink "$port"
    if [ "$ROUND" = 1 ]; then fsyncs sink "$port" "" "$SINK_PID"; fi
    stop_pid "$SINK_PID" 5
    SINK_PID=""
}

# ---------------------------------------------------------------- Postfix
postfix_config() { # DIR PORT: a private instance; nothing shared with /etc/postfix but the binaries
    local d="$1" port="$2"
    mkdir -p "$d/etc" "$d/queue" "$d/data" "$d/mail/bench/Maildir"/{new,cur,tmp}
    chown -R nobody:nogroup "$d/mail"
    chown postfix "$d/data"   # master.lock and friends are created as mail_owner
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
# Local delivery to one Maildir, like Tern's user "bench".
virtual_mailbox_domains = bench.test
virtual_mailbox_base = $d/mail
virtual_mailbox_maps = inline:{ bench@bench.test=bench/Maildir/ }
virtual_uid_maps = static:65534
virtual_gid_maps = static:65534
virtual_minimum_uid = 100
# A process per session: allow enough smtpd processes for the idle-session test.
default_process_limit = $((BENCH_PF_IDLE_SESSIONS + 200))
smtpd_client_connection_count_limit = 0
smtpd_client_event_limit_exceptions = 127.0.0.0/8
EOF
    # The slow-disk model reaches Postfix's processes through master's environment.
    if [ ${#SLOW_ENV[@]} -gt 0 ]; then
        echo "import_environment = $(postconf -d -h import_environment) ${SLOW_ENV[*]}" >>"$d/etc/main.cf"
    fi
    sed "s/@PORT@/$port/" "$HERE/postfix-master.cf" >"$d/etc/master.cf"
}

start_postfix() { # DIR PORT: start the private instance, set PF_MASTER, wait for the listener
    local d="$1" port="$2" i
    postfix -c "$PF_CONF" start >>"$BENCH_OUT/postfix.start" 2>&1 \
        || die "postfix start failed: $(tail -3 "$d/maillog" 2>/dev/null)"
    for ((i = 0; i < 100; i++)); do
        [ -s "$d/queue/pid/master.pid" ] && break
        sleep 0.1
    done
    PF_MASTER=$(tr -d ' \n' <"$d/queue/pid/master.pid" 2>/dev/null || true)
    [ -n "$PF_MASTER" ] || die "no Postfix master.pid"
    wait_port "$port" 10 || die "Postfix did not listen on $port"
    log "Postfix master PID $PF_MASTER on 127.0.0.1:$port"
}

bench_postfix() {
    local d="$TMP/pf.r$ROUND" port
    port=$(python3 "$LIB" freeport)
    postfix_config "$d" "$port"
    PF_CONF="$d/etc"
    postfix -c "$PF_CONF" check >"$BENCH_OUT/postfix.check" 2>&1 || true
    start_postfix "$d" "$port"
    local md="$d/mail/bench/Maildir/new"
    if [ "$ROUND" = 1 ]; then
        # Idle sessions first, on the fresh instance: no smtpd left idle by the load runs yet, so
        # the PSS difference counts exactly one new smtpd per session.
        idle postfix "$port" "$PF_MASTER" "$BENCH_PF_IDLE_SESSIONS" smtpd
        # Restart: thousands of idle smtpds (max_idle 100s) would all wake on every new
        # connection and skew the load runs.
        log "Postfix: restarting after the idle test"
        stop_postfix
        start_postfix "$d" "$port"
    fi
    throughput postfix "$port" "$md"
    # Attach to the master (new children are followed with -f) and to every running child.
    # shellcheck disable=SC2046
    if [ "$ROUND" = 1 ]; then fsyncs postfix "$port" "$md" $(python3 "$LIB" tree "$PF_MASTER"); fi
    cp "$d/maillog" "$BENCH_OUT/postfix.maillog" 2>/dev/null || true
    stop_postfix
    free_if_low "$d/mail"
}

# ---------------------------------------------------------------- Tern
find_tern() {
    if [ -n "${TERN_BIN:-}" ]; then
        [ -x "$TERN_BIN" ] && return 0
        log "TERN_BIN=$TERN_BIN is not executable"
        return 1
    fi
    command -v cargo >/dev/null || { log "no cargo: cannot build Tern"; return 1; }
    log "building Tern (cargo build --release -p tern)"
    (cd "$REPO" && cargo build --release -p tern) >"$BENCH_OUT/tern.build" 2>&1 \
        || { log "Tern build failed: see $BENCH_OUT/tern.build"; return 1; }
    TERN_BIN="$REPO/target/release/tern"
    [ -x "$TERN_BIN" ]
}

bench_tern() {
    find_tern || { log "skipping Tern"; return 0; }
    local d="$TMP/tern.r$ROUND" cfg port="" i
    mkdir -p "$d"
    cfg="$d/tern.toml"
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

[limits]
greeting_delay = "0s"
max_connections = $((BENCH_IDLE_SESSIONS + 1000))
max_connections_per_ip = $((BENCH_IDLE_SESSIONS + 1000))

[log]
level = "warn"
EOF
    start_tern "$cfg" mx "${SLOW_ENV[@]}" || return 0
    port=$PORT
    log "Tern PID $TERN_PID on 127.0.0.1:$port (round $ROUND)"
    local md="$d/data/mail/bench/Maildir/new"
    if [ "$ROUND" = 1 ]; then idle tern "$port" "$TERN_PID" "$BENCH_IDLE_SESSIONS"; fi
    throughput tern "$port" "$md"
    if [ "$ROUND" = 1 ]; then fsyncs tern "$port" "$md" "$TERN_PID"; fi
    stop_pid "$TERN_PID" 30
    TERN_PID=""
    free_if_low "$d/data"
}

# ---------------------------------------------------------------- main
{
    echo "# $(date -u +%FT%TZ) $(uname -r) $(nproc) cores; $(postconf -d mail_version 2>/dev/null)"
    echo "# target ${BENCH_TARGET_SECS}s per batch, $SESSIONS sessions, fsync batch $BENCH_FSYNC_MSGS"
    [ "$BENCH_SLOW_FLUSH_US" = 0 ] || echo "# slow-disk model: ${BENCH_SLOW_FLUSH_US} us per flush, one at a time"
} >>"$RESULTS"
START=$SECONDS
for ((ROUND = 1; ROUND <= BENCH_ROUNDS; ROUND++)); do
    run_servers
done
log "done in $((SECONDS - START))s"
echo
python3 "$LIB" table "$RESULTS" | tee "$BENCH_OUT/table.txt"
echo
echo "Raw figures: $RESULTS"
