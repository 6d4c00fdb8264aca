#!/usr/bin/env bash
# The test command of autogpt-ws (README, CI): bash tests/run.sh
#
# Installs what the tests need, then runs every trial test on two workers:
#   - .venv (python3 -m venv) with the package installed editable, extras [test];
#     editable_mode=compat puts the checkout on sys.path, so twistd finds the
#     twisted/plugins/autogpt_ws_plugin.py of the checkout;
#   - redis-server (apt-get) when it is not on PATH: the Redis bus tests
#     start their own on a free port (a 3-master cluster too);
#   - PostgreSQL: the tests create and drop their own databases on the one
#     at $AUTOGPT_WS_TEST_POSTGRES (default postgres@127.0.0.1:5432), or on a
#     throwaway one this script starts when that one is not reachable.
# Prints trial's output (also kept in test-run.log), then one last line
# "N passed, M failed" (skips and expected failures are neither; errors
# count as failed), and exits with trial's status.
set -uo pipefail

cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
LOG=${TEST_LOG:-test-run.log}

if [ ! -x "$VENV/bin/python" ]; then
    echo "creating $VENV"
    python3 -m venv "$VENV" || exit 1
fi

# reinstall only when the packaging changed (or nothing is installed yet)
stamp="$VENV/.autogpt-ws-installed"
want=$(cat setup.cfg setup.py | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ] || ! "$VENV/bin/python" -c "import autogpt_ws, hypothesis" 2>/dev/null; then
    echo "installing autogpt-ws[test] into $VENV"
    "$VENV/bin/python" -m pip install -qq -e '.[test]' --config-settings editable_mode=compat || exit 1
    echo "$want" > "$stamp"
fi

if ! command -v redis-server >/dev/null 2>&1; then
    echo "installing redis-server"
    SUDO=""
    if [ "$(id -u)" != 0 ] && command -v sudo >/dev/null 2>&1; then SUDO="sudo"; fi
    if ! { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq redis-server >/dev/null; }; then
        echo "warning: could not install redis-server; the Redis tests will be skipped"
    fi
fi

# PostgreSQL for the cluster-bus tests (AutoGPT's execution table): the one
# at $AUTOGPT_WS_TEST_POSTGRES (default: postgres@127.0.0.1:5432, trust),
# else a throwaway one started here for this run (postgresql from apt when
# missing), stopped and removed at the end.
PG_URL=${AUTOGPT_WS_TEST_POSTGRES:-postgresql://postgres@127.0.0.1:5432/postgres}
pg_up() { "$VENV/bin/python" -c 'import sys, psycopg; psycopg.connect(sys.argv[1], connect_timeout=3).close()' "$1" 2>/dev/null; }
if ! pg_up "$PG_URL"; then
    initdb=$(ls /usr/lib/postgresql/*/bin/initdb 2>/dev/null | sort -V | tail -1)
    if [ -z "$initdb" ]; then
        echo "installing postgresql"
        SUDO=""
        if [ "$(id -u)" != 0 ] && command -v sudo >/dev/null 2>&1; then SUDO="sudo"; fi
        { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq postgresql >/dev/null; } || true
        initdb=$(ls /usr/lib/postgresql/*/bin/initdb 2>/dev/null | sort -V | tail -1)
    fi
    if [ -n "$initdb" ]; then
        pgbin=$(dirname "$initdb")
        pgdir=$(mktemp -d /tmp/autogpt-ws-pg.XXXXXX)
        pgport=$("$VENV/bin/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
        as_pg=""
        if [ "$(id -u)" = 0 ]; then chown postgres "$pgdir" && as_pg="runuser -u postgres --"; fi  # initdb refuses root
        if $as_pg "$pgbin/initdb" -D "$pgdir/data" -U postgres --auth=trust >/dev/null \
            && $as_pg "$pgbin/pg_ctl" -D "$pgdir/data" -l "$pgdir/log" -w \
                -o "-p $pgport -k $pgdir -c listen_addresses=127.0.0.1" start >/dev/null; then
            export AUTOGPT_WS_TEST_POSTGRES="postgresql://postgres@127.0.0.1:$pgport/postgres"
            echo "started a throwaway PostgreSQL on 127.0.0.1:$pgport"
            trap '$as_pg "$pgbin/pg_ctl" -D "$pgdir/data" -m fast stop >/dev/null 2>&1; rm -rf "$pgdir"' EXIT
        else
            echo "warning: could not start PostgreSQL; the tests that need AutoGPT's database will be skipped"
        fi
    else
        echo "warning: no PostgreSQL; the tests that need AutoGPT's database will be skipped"
    fi
fi

"$VENV/bin/python" -m twisted.trial -j2 tests 2>&1 | tee "$LOG"
status=${PIPESTATUS[0]}

# trial's summary: PASSED (successes=N) or FAILED (failures=a, errors=b, successes=c, ...)
summary=$(grep -E '^(PASSED|FAILED) \(' "$LOG" | tail -1)
count() { echo "$summary" | grep -oE "\b$1=[0-9]+" | head -1 | cut -d= -f2; }
passed=$(count successes); failures=$(count failures); errors=$(count errors)
passed=${passed:-0}
failed=$(( ${failures:-0} + ${errors:-0} ))
if [ -z "$summary" ]; then
    # trial died before its summary (trial -j crashes on an unexpected
    # success, Twisted 26.10): count the per-test verdicts it printed
    passed=$(grep -cE '\.\.\. +\[OK\]$' "$LOG")
    failed=$(grep -cE '\.\.\. +\[(FAIL|ERROR)\]$' "$LOG")
    if [ "$status" -ne 0 ] && [ "$failed" -eq 0 ]; then failed=1; fi
fi
echo "$passed passed, $failed failed"
exit "$status"
