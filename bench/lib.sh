# bench/lib.sh: what every bench script shares: logging and stopping what it started, by PID,
# each wait with a deadline. Sourced after the script sets SINK_PIDS, PF_MASTER and PF_CONF
# (read when the functions run).

log() { printf '[%(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "FATAL: $*"; exit 1; }

stop_pid() { # PID [seconds]: TERM, wait with a deadline, then KILL
    local pid="$1" secs="${2:-20}" i
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < secs * 10; i++)); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.1
    done
    log "PID $pid ignored SIGTERM for ${secs}s: SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
}

stop_postfix() { # the private Postfix instance ($PF_CONF, master $PF_MASTER)
    [ -n "$PF_MASTER" ] || return 0
    postfix -c "$PF_CONF" stop >/dev/null 2>&1 || true
    stop_pid "$PF_MASTER" 60
    PF_MASTER=""
}

stop_sinks() { # every smtp-sink in $SINK_PIDS
    local p
    for p in "${SINK_PIDS[@]}"; do stop_pid "$p" 5; done
    SINK_PIDS=()
}

# run_servers: bench_NAME for each NAME in $BENCH_SERVERS, in turn. Before a server that writes
# files, when another ran before it (in this call or an earlier one: rounds), a sync and
# BENCH_SETTLE_SECS of quiet, so the previous server's file churn does not weigh on it
# (smtp-sink writes nothing and gets none).
SERVERS_RUN=0
run_servers() {
    local s
    for s in $BENCH_SERVERS; do
        declare -F "bench_$s" >/dev/null || die "unknown server $s"
        if [ "$SERVERS_RUN" -gt 0 ] && [ "$s" != sink ] && [ "$BENCH_SETTLE_SECS" -gt 0 ]; then
            log "settling: sync, then ${BENCH_SETTLE_SECS}s so the previous server's file churn does not weigh on $s"
            sync
            sleep "$BENCH_SETTLE_SECS"
        fi
        SERVERS_RUN=$((SERVERS_RUN + 1))
        "bench_$s"
    done
}
