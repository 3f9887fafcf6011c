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

# start_tern CONFIG ROLE [VAR=VALUE...]: checks CONFIG, starts `tern serve` on it (with the
# variables in its environment), waits at most 30 s for "ready" and sets TERN_PID and PORT (the
# first listener of ROLE). When Tern does not start it logs why, stops it and fails; the caller
# stops what else it started.
start_tern() {
    local cfg="$1" role="$2" i
    shift 2
    TERN_PID="" PORT=""
    "$TERN_BIN" check-config "$cfg" >"$BENCH_OUT/tern.check" 2>&1 \
        || { log "tern check-config failed: $(cat "$BENCH_OUT/tern.check")"; return 1; }
    env "$@" "$TERN_BIN" serve --config "$cfg" >"$BENCH_OUT/tern.out" 2>"$BENCH_OUT/tern.err" &
    TERN_PID=$!
    for ((i = 0; i < 300; i++)); do
        grep -qx 'ready' "$BENCH_OUT/tern.out" 2>/dev/null && break
        kill -0 "$TERN_PID" 2>/dev/null || break
        sleep 0.1
    done
    PORT=$(sed -n "s/^listening on 127\.0\.0\.1:\([0-9]*\) role=$role\$/\1/p" "$BENCH_OUT/tern.out" | head -1)
    if [ -z "$PORT" ] || ! grep -qx 'ready' "$BENCH_OUT/tern.out"; then
        log "Tern did not become ready: $(tail -3 "$BENCH_OUT/tern.err")"
        stop_pid "$TERN_PID" 5
        TERN_PID=""
        return 1
    fi
}
