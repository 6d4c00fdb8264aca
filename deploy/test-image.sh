#!/usr/bin/env bash
# Build the real Dockerfile with podman and prove the image works.
#
#   sudo bash deploy/test-image.sh [--no-cache] [--rebuild-base]
#
# It builds ./Dockerfile unchanged, runs the image (host network, listening on
# a free loopback port) against a redis-server it starts on another free
# loopback port, and checks: the image's metadata and user, /health, /ready,
# a subscribe that receives an event published by `autogpt-ws publish` from
# inside the container, the image's HEALTHCHECK, and a SIGTERM stop (the
# client sees close 1001, the container exits 0 within the 10 s grace).
# One PASS/FAIL line per check; exit status 0 when all pass, 1 when one
# fails, 2 when the test cannot run.  Everything it starts (container,
# redis-server, temporary files) is removed on exit; the image stays tagged
# localhost/autogpt-ws:test (the one it replaces, and with --no-cache the
# build stage, stay as dangling images: `podman image prune` removes them).
#
# No registry is needed: without BASE_IMAGE, the base is a stand-in for
# python:3.11-slim-bookworm made with debootstrap (Debian bookworm, python3,
# python3-venv, the CA certificates of this machine, which pip inside the
# build needs behind an intercepting proxy), imported once with
# `podman import` and kept, with its tarball in $AUTOGPT_WS_TEST_CACHE
# (default /var/cache/autogpt-ws-test).  BASE_IMAGE=python:3.11-slim-bookworm
# uses the public image instead.
#
# Needs root, podman, runc, redis-server, python3 (and debootstrap for the
# stand-in); on Debian it installs the missing ones with apt-get.  Podman is
# configured by a containers.conf of its own (runtime runc, ulimits within
# this shell's hard limits and kernel.pid_max) unless CONTAINERS_CONF is set.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cache=${AUTOGPT_WS_TEST_CACHE:-/var/cache/autogpt-ws-test}
standin=localhost/autogpt-ws-standin:bookworm
image=localhost/autogpt-ws:test
grace=10  # the default stop grace period of docker and compose
no_cache="" rebuild_base=""
for arg in "$@"; do
    case $arg in
        --no-cache) no_cache=--no-cache ;;
        --rebuild-base) rebuild_base=1 ;;
        *) echo "usage: $0 [--no-cache] [--rebuild-base]" >&2; exit 2 ;;
    esac
done

failures=0
pass() { echo "PASS $*"; }
fail() { echo "FAIL $*"; failures=$((failures + 1)); }
die() { echo "test-image: $*" >&2; exit 2; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

[ "$(id -u)" = 0 ] || die "needs root (rootful podman, debootstrap)"

# -- tools ---------------------------------------------------------------------
missing=()
for tool in podman runc redis-server python3; do
    command -v "$tool" > /dev/null || missing+=("$tool")
done
if [ -z "${BASE_IMAGE:-}" ] && ! command -v debootstrap > /dev/null; then missing+=(debootstrap); fi
if [ ${#missing[@]} -gt 0 ]; then
    command -v apt-get > /dev/null || die "missing: ${missing[*]} (install them, then run again)"
    echo "installing ${missing[*]} with apt-get"
    { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"; } > /dev/null \
        || die "apt-get could not install: ${missing[*]}"
fi

# -- cleanup -------------------------------------------------------------------
work=$(mktemp -d /tmp/autogpt-ws-test-image.XXXXXX)
container="autogpt-ws-test-$$"
redis_pid="" probe_pid="" unresponsive_pid=""
cleanup() {
    set +e
    [ -n "$probe_pid$unresponsive_pid" ] && kill $probe_pid $unresponsive_pid 2> /dev/null
    podman rm -f -t 0 "$container" > /dev/null 2>&1
    [ -n "$redis_pid" ] && kill "$redis_pid" 2> /dev/null && wait "$redis_pid" 2> /dev/null
    for mount in proc sys dev/pts dev; do  # left behind by an interrupted debootstrap
        mountpoint -q "$work/rootfs/$mount" 2> /dev/null && umount -l "$work/rootfs/$mount"
    done
    rm -rf --one-file-system "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

if [ -z "${CONTAINERS_CONF:-}" ]; then
    # runc (Debian's podman defaults to crun), and ulimits this shell may
    # grant: podman's defaults (1048576) are refused where the hard limits
    # are lower, and so is an nproc above kernel.pid_max on some machines
    nofile=$(ulimit -Hn) nproc=$(ulimit -Hu) pid_max=$(cat /proc/sys/kernel/pid_max)
    [ "$nproc" = unlimited ] || [ "$nproc" -gt "$pid_max" ] && nproc=$pid_max
    ulimits="\"nproc=$nproc:$nproc\""
    [ "$nofile" = unlimited ] || ulimits="$ulimits, \"nofile=$nofile:$nofile\""
    printf '[containers]\ndefault_ulimits = [%s]\n\n[engine]\nruntime = "runc"\n' "$ulimits" > "$work/containers.conf"
    export CONTAINERS_CONF=$work/containers.conf
fi

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
http_get() {  # prints "<status> <body>"
    python3 - "$1" << 'EOF'
import sys, urllib.error, urllib.request
try:
    with urllib.request.urlopen(sys.argv[1], timeout=5) as answer:
        print(answer.status, answer.read().decode())
except urllib.error.HTTPError as exc:
    print(exc.code, exc.read().decode())
except OSError as exc:
    print(0, exc)
EOF
}
http_ok() { [ "$(http_get "$1" | cut -d' ' -f1)" = 200 ]; }
wait_for() {  # wait_for SECONDS COMMAND...: true once COMMAND succeeds
    local deadline=$(($(date +%s) + $1)); shift
    until "$@" > /dev/null 2>&1; do
        [ "$(date +%s)" -lt "$deadline" ] || return 1
        sleep 0.2
    done
}
show_logs() { echo "--- container log (last 30 lines)"; podman logs --tail 30 "$container" 2>&1 | sed 's/^/    /'; }

# -- the base ------------------------------------------------------------------
if [ -n "${BASE_IMAGE:-}" ]; then
    base=$BASE_IMAGE
else
    base=$standin
    tarball=$cache/bookworm-python3.tar
    if [ -n "$rebuild_base" ] || [ ! -s "$tarball" ]; then
        echo "making the stand-in base with debootstrap (about a minute)"
        started=$(now)
        rootfs=$work/rootfs
        debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
            bookworm "$rootfs" "${DEBIAN_MIRROR:-http://deb.debian.org/debian}" > "$work/debootstrap.log" 2>&1 \
            || { tail -5 "$work/debootstrap.log" >&2; die "debootstrap failed"; }
        cp /usr/local/share/ca-certificates/*.crt "$rootfs/usr/local/share/ca-certificates/" 2> /dev/null || true
        chroot "$rootfs" update-ca-certificates > /dev/null 2>&1
        chroot "$rootfs" apt-get clean
        rm -rf "$rootfs"/var/lib/apt/lists/*
        mkdir -p "$cache"
        tar -C "$rootfs" -cf "$tarball.part" . && mv "$tarball.part" "$tarball"
        podman rmi -f "$standin" > /dev/null 2>&1 || true
        echo "stand-in base made in $(since "$started") s"
    fi
    if ! podman image exists "$standin"; then
        podman import -q \
            --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
            --change 'ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt' \
            --change 'ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt' \
            --change 'CMD ["python3"]' \
            "$tarball" "$standin" > /dev/null || die "podman import of $tarball failed"
    fi
fi

# -- 1. build ------------------------------------------------------------------
started=$(now)
# --format docker: the OCI image format has no HEALTHCHECK; --network host:
# pip in the build reaches the package index the way this machine does
if podman build --format docker $no_cache --network host --build-arg "BASE_IMAGE=$base" \
        -t "$image" -f "$repo/Dockerfile" "$repo" > "$work/build.log" 2>&1; then
    pass "build: $(since "$started") s, FROM $base"
else
    tail -20 "$work/build.log"
    fail "build: podman build failed after $(since "$started") s"
    exit 1
fi

# -- 2. image metadata ---------------------------------------------------------
meta=$(podman image inspect --format \
    '{{.Config.User}}|{{.Config.StopSignal}}|{{range $p, $_ := .Config.ExposedPorts}}{{$p}} {{end}}|{{json .Config.Healthcheck.Test}}' \
    "$image")
IFS='|' read -r user stopsignal ports health <<< "$meta"
if [ "$user" = 10001:10001 ] && [ "$stopsignal" = SIGTERM ] && [ "$ports" = "8001/tcp " ] \
        && [[ $health == *healthcheck.py* ]]; then
    pass "image: user $user, stop signal $stopsignal, exposes ${ports% }, HEALTHCHECK $health"
else
    fail "image: user '$user', stop signal '$stopsignal', exposes '$ports', HEALTHCHECK '$health'"
fi

# -- run -----------------------------------------------------------------------
redis_port=$(free_port)
redis-server --port "$redis_port" --bind 127.0.0.1 --save '' --appendonly no > "$work/redis.log" 2>&1 &
redis_pid=$!
wait_for 10 redis-cli -p "$redis_port" ping || die "redis-server did not start (see $work/redis.log)"
ws_port=$(free_port)
# EVENT_BUS=redis: the classic bus on a plain Redis, named explicitly
podman run -d --name "$container" --network host \
    -e WEBSOCKET_SERVER_HOST=127.0.0.1 -e WEBSOCKET_SERVER_PORT="$ws_port" -e ENABLE_AUTH=false \
    -e EVENT_BUS=redis -e REDIS_HOST=127.0.0.1 -e REDIS_PORT="$redis_port" \
    "$image" > /dev/null 2> "$work/run.err" || { cat "$work/run.err" >&2; die "podman run failed"; }
base_url=http://127.0.0.1:$ws_port

# -- 3. the process inside -----------------------------------------------------
inside=$(podman exec "$container" sh -c \
    'echo "$(id -un) $(id -u) $(pwd) [$(ls -A)]"; for t in gcc cc make pip pip3; do command -v $t; done; ls /opt/autogpt-ws/bin | grep -x "pip.*" ; true' 2>&1)
if [ "$inside" = "autogpt-ws 10001 /srv/autogpt-ws []" ]; then
    pass "process: runs as autogpt-ws (uid 10001) in an empty /srv/autogpt-ws (no config.yaml), no compiler or pip"
else
    fail "process: expected 'autogpt-ws 10001 /srv/autogpt-ws []' and no compiler or pip, got: $(echo "$inside" | paste -sd' ' -)"
fi

# -- 4. /health, 5. /ready -----------------------------------------------------
started=$(now)
if wait_for 20 http_ok "$base_url/health"; then
    answer=$(http_get "$base_url/health")
    if [ "$answer" = '200 {"status":"healthy"}' ]; then
        pass "/health: $answer ($(since "$started") s after start)"
    else
        fail "/health: $answer"
    fi
else
    fail "/health: no answer within 20 s"
    show_logs
fi
wait_for 15 http_ok "$base_url/ready" || true
answer=$(http_get "$base_url/ready")
if [ "$answer" = '200 {"status":"ready"}' ]; then
    pass "/ready: $answer"
else
    fail "/ready: $answer"
fi

# -- 6. subscribe, publish, receive --------------------------------------------
user=3e53486c-cf57-477e-ba2a-cb02dc828e1a  # ENABLE_AUTH=false: the default user
# and a second client, which will answer neither pings nor the close (step 8)
python3 "$repo/deploy/wsprobe.py" --unresponsive 127.0.0.1 "$ws_port" \
    '{"method":"heartbeat","data":"ping","success":true}' > "$work/unresponsive.out" 2>&1 &
unresponsive_pid=$!
python3 "$repo/deploy/wsprobe.py" 127.0.0.1 "$ws_port" \
    '{"method":"subscribe_graph_execution","data":{"graph_exec_id":"exec-image-test"}}' > "$work/probe.out" 2>&1 &
probe_pid=$!
expected_reply='{"method":"subscribe_graph_execution","data":null,"success":true,"channel":"'$user'|graph_exec#exec-image-test","error":null}'
if wait_for 10 grep -qF "text $expected_reply" "$work/probe.out"; then
    published=$(podman exec "$container" autogpt-ws publish graph --graph graph-image-test \
        --exec exec-image-test --status COMPLETED 2>&1 || true)
    if wait_for 10 grep -q '^text {"method":"graph_execution_event".*"status":"COMPLETED"' "$work/probe.out"; then
        pass "subscribe + event: subscribed, 'autogpt-ws publish' in the container printed '$published', the socket got graph_execution_event COMPLETED"
    else
        fail "subscribe + event: no event received (publish printed '$published'); client saw: $(paste -sd' ' "$work/probe.out")"
    fi
else
    fail "subscribe + event: no subscribe reply; client saw: $(paste -sd' ' "$work/probe.out")"
fi

# -- 7. the image's HEALTHCHECK ------------------------------------------------
# podman runs health checks from systemd timers; without systemd, run it now
if check=$(podman healthcheck run "$container" 2>&1); then
    status=$(podman inspect --format '{{.State.Health.Status}}' "$container" 2>/dev/null \
        || podman inspect --format '{{.State.Healthcheck.Status}}' "$container")
    if [ "$status" = healthy ]; then
        pass "health check: podman healthcheck run -> ${check:-healthy}, status $status"
    else
        fail "health check: ran ($check) but status is '$status'"
    fi
else
    fail "health check: $check"
fi

# -- 8. SIGTERM stop -----------------------------------------------------------
wait_for 10 grep -q '"data":"pong"' "$work/unresponsive.out" \
    || fail "SIGTERM: the unresponsive client did not connect: $(paste -sd' ' "$work/unresponsive.out")"
started=$(now)
podman stop -t "$grace" "$container" > /dev/null 2>&1 || true
stop_time=$(since "$started")
wait "$probe_pid" "$unresponsive_pid" 2> /dev/null || true
probe_pid="" unresponsive_pid=""
close=$(grep '^close ' "$work/probe.out" || echo "no close frame: $(tail -1 "$work/probe.out")")
unresponsive=$(grep -v '^text ' "$work/unresponsive.out" | paste -sd' ' - || true)
exit_code=$(podman inspect --format '{{.State.ExitCode}}' "$container")
log_lines=$(podman logs "$container" 2>&1 | grep -o -e 'received SIGTERM' -e 'autogpt-ws stopped in [0-9.]*s' | paste -sd, - || true)
if [ "$close" = "close 1001 server shutting down" ] && [ "$unresponsive" = "close 1001 server shutting down dropped" ] \
        && [ "$exit_code" = 0 ] && awk -v t="$stop_time" -v g="$grace" 'BEGIN { exit !(t < g) }'; then
    pass "SIGTERM: client got '$close'; a client that never answered got the same and was dropped; container exited $exit_code after $stop_time s (grace $grace s; log: $log_lines)"
else
    fail "SIGTERM: client got '$close', the unresponsive one '$unresponsive', exit status $exit_code, stop took $stop_time s (grace $grace s)"
    show_logs
fi

if [ "$failures" -gt 0 ]; then
    echo "test-image: $failures check(s) failed"
    exit 1
fi
echo "test-image: all checks passed"
