#!/usr/bin/env bash
# scripts/test.sh: THE one command that runs Tern's whole test suite.
#
# What it does, in order (each is a "step"; a failing step does not hide the
# later ones, but the script exits non-zero if any step failed):
#   1. deps     install missing real peers with apt-get / pip (idempotent,
#               `apt-get update` only when something is missing)
#   2. fmt      cargo fmt --all -- --check                    (TERN_SKIP_LINT=1 skips)
#   3. clippy   cargo clippy --workspace --all-targets -D warnings (TERN_SKIP_LINT=1 skips)
#   4. test     cargo test --workspace
#   5. build    cargo build -p tern --bins --example test-dns --example dkim-sign
#               (debug; what the pytest suite runs)
#   6. pytest   python3 -m pytest -q tests/integration   (TERN_BIN=target/debug/tern)
#   7. fuzz     cargo +nightly fuzz run server_session (60 s), command (20 s) and
#               client_session (20 s)
#               (TERN_SKIP_FUZZ=1 skips; skipped with a message while fuzz/ is absent)
# It ends with a plain summary line "N passed, N failed" (counting steps).
#
# Designed for CI: a fresh Debian machine, run as root from a clean clone, no
# stdin, 2 cores. Nothing here reads from the terminal.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT="$(pwd)"
export DEBIAN_FRONTEND=noninteractive
export CARGO_TERM_PROGRESS_WHEN=never

PASSED=0
FAILED=0
FAILED_NAMES=()
# The Python interpreter that has pytest; chosen by step_deps.
PYTHON="${PYTHON:-python3}"

log() { printf '==> %s\n' "$*"; }

# run_step NAME FUNCTION: runs FUNCTION in a subshell with errexit active.
# Why the `set +e` dance: errexit is silently disabled for anything called from
# an `if`/`||` context, so `if fn; then` would hide failures inside fn.
run_step() {
    local name="$1"
    shift
    local start=$SECONDS rc
    log "step ${name}: running"
    set +e
    (
        set -euo pipefail
        "$@"
    )
    rc=$?
    set -e
    if [[ $rc -eq 0 ]]; then
        PASSED=$((PASSED + 1))
        log "step ${name}: ok ($((SECONDS - start))s)"
    else
        FAILED=$((FAILED + 1))
        FAILED_NAMES+=("$name")
        log "step ${name}: FAILED (exit ${rc}, $((SECONDS - start))s)"
    fi
    return 0
}

skip_step() {
    log "step $1: skipped ($2)"
}

# ---------------------------------------------------------------- deps

apt_missing=()
need_apt() {
    # need_apt PACKAGE COMMAND: queue PACKAGE when COMMAND is not available.
    if ! command -v "$2" >/dev/null 2>&1 && [[ ! -x "$2" ]]; then
        apt_missing+=("$1")
    fi
}

need_perl() {
    # need_perl PACKAGE MODULE: queue PACKAGE when perl cannot load MODULE.
    perl -M"$2" -e 1 >/dev/null 2>&1 || apt_missing+=("$1")
}

install_apt_missing() {
    if [[ ${#apt_missing[@]} -eq 0 ]]; then
        log "apt peers already present"
        return 0
    fi
    log "installing with apt-get: ${apt_missing[*]}"
    # Postfix asks a debconf question; answer it up front so the install never
    # blocks and leaves postfix unconfigured (we only want smtp-source/-sink).
    echo 'postfix postfix/main_mailer_type select No configuration' | debconf-set-selections
    # Keep package scripts from starting daemons (the postfix master in
    # particular). Only create the policy file if there is none, and only
    # remove what we created.
    local created_policy=0
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        created_policy=1
    fi
    local rc=0
    apt-get update -qq && apt-get install -y -qq --no-install-recommends "${apt_missing[@]}" </dev/null || rc=$?
    if [[ $created_policy -eq 1 ]]; then rm -f /usr/sbin/policy-rc.d; fi
    return $rc
}

ensure_postfix_stopped() {
    # "No configuration" means no main.cf, so the master should not run; make
    # sure anyway, because it would hold port 25 and confuse the benchmarks.
    if [[ -f /etc/postfix/main.cf ]] && postfix status >/dev/null 2>&1; then
        log "postfix master is running: stopping it"
        postfix stop || true
    fi
}

choose_python() {
    # /root/.pyenv may shadow Debian's python3 on PATH: use whichever python3
    # comes first, and give *that* interpreter pytest.
    local py
    py="$(command -v python3 || true)"
    if [[ -z "$py" ]]; then
        log "no python3 at all: installing Debian's python3 and python3-pytest"
        apt-get update -qq && apt-get install -y -qq --no-install-recommends python3 python3-pytest </dev/null
        py=/usr/bin/python3
    fi
    if "$py" -c 'import pytest' >/dev/null 2>&1; then
        PYTHON="$py"
        return 0
    fi
    if [[ "$(readlink -f "$py")" == /usr/bin/python3* ]]; then
        log "installing python3-pytest for $py"
        apt-get update -qq && apt-get install -y -qq --no-install-recommends python3-pytest </dev/null
    else
        log "installing pytest with pip for $py"
        "$py" -m pip install --quiet --disable-pip-version-check pytest </dev/null ||
            {
                log "pip failed; falling back to Debian's python3-pytest"
                apt-get update -qq && apt-get install -y -qq --no-install-recommends python3 python3-pytest </dev/null
                py=/usr/bin/python3
            }
    fi
    "$py" -c 'import pytest' >/dev/null
    PYTHON="$py"
}

step_deps() {
    need_apt swaks swaks
    # swaks speaks TLS and AUTH through these Perl modules.
    need_perl libnet-ssleay-perl Net::SSLeay
    need_perl libauthen-sasl-perl Authen::SASL
    need_apt openssl openssl
    need_apt curl curl
    need_apt strace strace
    need_apt postfix /usr/sbin/smtp-source
    # Dovecot's LMTP server: the outbound tests deliver into it (test_outbound.py).
    need_apt dovecot-lmtpd /usr/lib/dovecot/lmtp
    # Dovecot's IMAP server reads the Maildirs Tern wrote as their owner
    # (test_privileges.py); useradd and setpriv make and become its users.
    need_apt dovecot-imapd /usr/lib/dovecot/imap
    need_apt passwd useradd
    need_apt util-linux setpriv
    # systemd-analyze verifies and rates dist/tern.service (test_service.py).
    need_apt systemd systemd-analyze
    # dkimpy, the independent DKIM verifier of test_dkim.py (for /usr/bin/python3).
    need_apt python3-dkim /usr/bin/dkimverify
    # A real mail client for test_submission.py.
    need_apt msmtp msmtp
    # Mail clients that hand mail to `tern sendmail` (test_sendmail.py).
    # bsd-mailx needs an MTA package: Postfix, above, is it.
    need_apt bsd-mailx bsd-mailx
    need_apt s-nail s-nail
    # test_disk_full.py: prlimit starts the server under a file-size limit;
    # libfuse2 is what fusepy (below) mounts faultfs.py with.
    need_apt util-linux prlimit
    ldconfig -p 2>/dev/null | grep -q 'libfuse\.so\.2 ' || apt_missing+=(libfuse2)
    install_apt_missing
    ensure_postfix_stopped
    choose_python
    # scramp: an independent SCRAM-SHA-256 client (test_submission.py).
    if ! "$PYTHON" -c 'import scramp' >/dev/null 2>&1; then
        log "installing scramp with pip for $PYTHON"
        "$PYTHON" -m pip install --quiet --disable-pip-version-check scramp </dev/null ||
            { apt-get install -y -qq --no-install-recommends python3-scramp </dev/null || true; }
    fi
    # prometheus_client: its text-format parser reads Tern's /metrics (test_metrics.py).
    if ! "$PYTHON" -c 'import prometheus_client.parser' >/dev/null 2>&1; then
        log "installing prometheus_client with pip for $PYTHON"
        "$PYTHON" -m pip install --quiet --disable-pip-version-check prometheus_client </dev/null ||
            { apt-get install -y -qq --no-install-recommends python3-prometheus-client </dev/null || true; }
    fi
    # fusepy: the FUSE binding of faultfs.py, the fault-injecting file system
    # of test_disk_full.py.
    if ! "$PYTHON" -c 'import fuse' >/dev/null 2>&1; then
        log "installing fusepy with pip for $PYTHON"
        "$PYTHON" -m pip install --quiet --disable-pip-version-check fusepy </dev/null ||
            { apt-get install -y -qq --no-install-recommends python3-fusepy </dev/null || true; }
    fi
    echo "PYTHON=$PYTHON" >"$ROOT/target/.tern-test-python"
    log "python for pytest: $PYTHON ($("$PYTHON" -m pytest --version 2>&1 | head -n1))"
}

# ---------------------------------------------------------------- cargo

step_fmt() { cargo fmt --all -- --check; }
step_clippy() { cargo clippy --workspace --all-targets -- -D warnings; }
# --no-fail-fast: one failing test binary must not hide the others' results.
step_test() { cargo test --workspace --no-fail-fast; }
# The test DNS server (an example, built on the dev-only hickory-server) is
# run by the integration tests that deliver by MX; dkim-sign signs messages
# with the config's DKIM keys for test_dkim.py.
step_build() { cargo build -p tern --bins --example test-dns --example dkim-sign; }

# ---------------------------------------------------------------- pytest

step_pytest() {
    if [[ ! -x "$ROOT/target/debug/tern" ]]; then
        log "target/debug/tern does not exist (build failed?)"
        return 1
    fi
    TERN_BIN="${TERN_BIN:-$ROOT/target/debug/tern}" "$PYTHON" -m pytest -q -p no:cacheprovider tests/integration
}

# ---------------------------------------------------------------- fuzz

step_fuzz() {
    if ! cargo fuzz --version >/dev/null 2>&1; then
        log "installing cargo-fuzz"
        cargo install cargo-fuzz --locked
    fi
    cd "$ROOT/fuzz"
    log "fuzz target server_session for 60s"
    cargo +nightly fuzz run server_session -- -max_total_time=60
    log "fuzz target command for 20s"
    cargo +nightly fuzz run command -- -max_total_time=20
    log "fuzz target client_session for 20s"
    cargo +nightly fuzz run client_session -- -max_total_time=20
}

# ---------------------------------------------------------------- main

mkdir -p "$ROOT/target"
rm -f "$ROOT/target/.tern-test-python"
# step_deps runs in a subshell, so it hands the chosen interpreter back via a file.
run_step deps step_deps
if [[ -f "$ROOT/target/.tern-test-python" ]]; then
    # shellcheck disable=SC1091
    source "$ROOT/target/.tern-test-python"
fi

if [[ "${TERN_SKIP_LINT:-0}" == 1 ]]; then
    skip_step fmt "TERN_SKIP_LINT=1"
    skip_step clippy "TERN_SKIP_LINT=1"
else
    run_step fmt step_fmt
    run_step clippy step_clippy
fi
run_step test step_test
run_step build step_build
run_step pytest step_pytest

if [[ "${TERN_SKIP_FUZZ:-0}" == 1 ]]; then
    skip_step fuzz "TERN_SKIP_FUZZ=1"
elif [[ ! -d "$ROOT/fuzz" ]]; then
    skip_step fuzz "fuzz/ does not exist yet"
else
    run_step fuzz step_fuzz
fi

if [[ $FAILED -gt 0 ]]; then
    log "failed steps: ${FAILED_NAMES[*]}"
fi
echo "${PASSED} passed, ${FAILED} failed"
[[ $FAILED -eq 0 ]]
