#!/usr/bin/env bash
# Per-core cost of arkgate against its floor (a bare Pingora forwarder, benches/bare_pingora.rs)
# and nginx, in one run on this machine, with a row per arkgate variant:
#
#   bash benches/percore.sh      # Markdown tables on stdout; progress on stderr
#
# Targets (VARIANTS, run in turn for ROUNDS rounds, so a drift of the machine touches all alike):
#   direct          wrk to the mock itself (for added latency; no proxy CPU)
#   nginx           proxy_pass with an upstream keepalive pool, one worker, no rewrite
#   bare[+steal][@bin]  the bare Pingora 0.9 forwarder, one thread, Pingora's single-threaded
#                   runtime as arkgate's default (+steal: the work-stealing one; @bin: the binary
#                   in $BARE_BIN_bin)
#   ark[+opt...][@bin]  arkgate with its defaults and one thread, changed by each +opt:
#       +pass       no byte rules, structured_output passthrough (the rewrite's own cost)
#       +nolog      logging.sample_rate 0 (no sampled access lines)
#       +steal      server.work_stealing true;  +nosteal  false
#       +t2         two worker threads (still on the one proxy core)
#       +rbufN      listen read_buffer_bytes N (e.g. +rbuf0, +rbuf65536)
#       +tcache     jemalloc's thread cache raised to 128 KiB (for a jemalloc build: @bin)
#     and @bin runs the binary in $ARK_BIN_bin instead (another allocator or build profile, built
#     beforehand; see the README's Performance section).
# Shapes (SHAPES): plain (HTTP/1.1 client → proxy → mock) and tls (TLS on both sides: wrk over
# TLS to the proxy, the proxy over TLS to the mock; a throwaway self-signed certificate).
#
# Each run: a 1 s warm-up at 64 connections, TPUT_SECS at 64 connections (req/s and the proxy's
# CPU ticks → CPU µs per request), then LAT_SECS at one connection (p50/p99). The proxy runs
# alone on CPU $PROXY_CPU; wrk and the mocks share CPU $LOAD_CPU. Everything listens on
# 127.0.0.1 ports picked here, and every process started is stopped on exit.
#
# Then, on plain HTTP, each of IDLE_VARIANTS is started afresh and holds IDLE_CONNS keep-alive
# client connections, each served one request and then left idle: its RSS is reported.
#
# Tunables (environment): VARIANTS TLS_VARIANTS (the tls shape's, default VARIANTS) SHAPES ROUNDS TPUT_SECS LAT_SECS PROXY_CPU LOAD_CPU
# IDLE_VARIANTS IDLE_CONNS (0: no idle phase) RESULTS_FILE (keeps the raw figures, one line per
# run; `mapfile -t r <FILE; python3 benches/percore_report.py "${r[@]}"` reprints the tables)
# KEEP_WORK=1
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
# shellcheck source=benches/lib.sh
source "$ROOT/benches/lib.sh"

PROXY_CPU=${PROXY_CPU:-0}
LOAD_CPU=${LOAD_CPU:-1}
TPUT_SECS=${TPUT_SECS:-5}
LAT_SECS=${LAT_SECS:-4}
ROUNDS=${ROUNDS:-3}
SHAPES=${SHAPES:-"plain tls"}
VARIANTS=${VARIANTS:-"direct nginx bare ark ark+pass ark+steal"}
IDLE_VARIANTS=${IDLE_VARIANTS:-"nginx bare ark ark+rbuf65536"}
IDLE_CONNS=${IDLE_CONNS:-10000}
LUA=$ROOT/benches/load_post.lua
BODY=$ROOT/benches/load_body.json

command -v wrk >/dev/null 2>&1 || apt_install wrk
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || apt_install nginx
NGINX_BIN=$(command -v nginx || echo /usr/sbin/nginx)
(($(nproc) >= 2)) || die "needs 2 CPUs (proxy on one, load on the other)"
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
NOFILE=$(ulimit -n)
[ "$NOFILE" = unlimited ] && NOFILE=1048576
((IDLE_CONNS + 4096 <= NOFILE)) || IDLE_CONNS=$((NOFILE - 4096))

log "building arkgate, the mock and the bare forwarder (release)"
cargo_release --bin arkgate --example mock_upstream --example bare_pingora
ARKGATE=$REL/arkgate
MOCK=$REL/examples/mock_upstream
BARE=$REL/examples/bare_pingora

bench_workdir percore

openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=localhost \
  -keyout "$WORK/key.pem" -out "$WORK/cert.pem" 2>/dev/null || die "openssl req failed"

declare -A MOCK_PORT
start_mock mock_plain
MOCK_PORT[plain]=$PORT
start_mock mock_tls --tls-cert "$WORK/cert.pem" --tls-key "$WORK/key.pem"
MOCK_PORT[tls]=$PORT

# start_target variant shape port: starts it on 127.0.0.1:port, sets PIDS (comma-separated).
start_target() {
  local v=$1 shape=$2 port=$3 mport=${MOCK_PORT[$2]} pid
  case $v in
    nginx) start_nginx "$shape" "$port" "$mport" ;;
    bare*)
      local tls=() bin=$BARE
      if [[ $v == *@* ]]; then
        local var="BARE_BIN_${v##*@}"
        bin=${!var:-}
        [ -x "$bin" ] || die "$v: \$$var does not name an executable"
      fi
      [ "$shape" = tls ] && tls=(--tls-cert "$WORK/cert.pem" --tls-key "$WORK/key.pem" --upstream-tls)
      [[ $v == bare+steal* ]] && tls+=(--work-stealing)
      taskset -c "$PROXY_CPU" "$bin" --listen "127.0.0.1:$port" --upstream "127.0.0.1:$mport" \
        --prefix /api/v3 --threads 1 "${tls[@]}" >"$WORK/${v//@/_}.log" 2>&1 &
      pid=$!
      PIDS=$pid
      ;;
    ark*) start_ark "$v" "$shape" "$port" "$mport" ;;
    *) die "unknown variant $v" ;;
  esac
  STARTED+=(${PIDS//,/ })
  wait_port "$port" "${PIDS%%,*}" "$v"
}

start_ark() { # variant shape port mock_port
  local v=$1 bin=$ARKGATE name=${1//[+@]/_} threads=1 steal="" rbuf="" scheme=http opt
  local extra="" env=()
  if [[ $v == *@* ]]; then
    local var="ARK_BIN_${v##*@}"
    bin=${!var:-}
    [ -x "$bin" ] || die "$v: \$$var does not name an executable"
    v=${v%@*}
  fi
  IFS=+ read -r -a opts <<<"${v#ark}"
  for opt in "${opts[@]}"; do
    case $opt in
      "") ;;
      pass) extra+=$'rewrite: []\nstructured_output: {default: passthrough}\n' ;;
      nolog) extra+=$'logging: {sample_rate: 0}\n' ;;
      steal) steal=", work_stealing: true" ;;
      nosteal) steal=", work_stealing: false" ;;
      t2) threads=2 ;;
      rbuf*) rbuf=", read_buffer_bytes: ${opt#rbuf}" ;;
      tcache) env=(_RJEM_MALLOC_CONF=tcache_max:131072 MALLOC_CONF=tcache_max:131072) ;;
      *) die "$1: unknown option +$opt" ;;
    esac
  done
  local listen="{addr: \"127.0.0.1:$3\"$rbuf}"
  if [ "$2" = tls ]; then
    listen="{addr: \"127.0.0.1:$3\"$rbuf, tls: {cert_path: $WORK/cert.pem, key_path: $WORK/key.pem}}"
    scheme=https
  fi
  {
    printf 'listen: [%s]\n' "$listen"
    printf 'upstream: {base_url: "%s://127.0.0.1:%s/api/v3", tls_verify: false}\n' "$scheme" "$4"
    printf 'server: {threads: %s%s, pid_file: %s/%s.pid, upgrade_sock: %s/%s.sock}\n' \
      "$threads" "$steal" "$WORK" "$name" "$WORK" "$name"
    printf '%s' "$extra"
  } >"$WORK/$name.yaml"
  "$bin" -t -c "$WORK/$name.yaml" >/dev/null 2>"$WORK/$name.check" ||
    die "$1: config rejected: $(cat "$WORK/$name.check")"
  env "${env[@]}" taskset -c "$PROXY_CPU" "$bin" -c "$WORK/$name.yaml" >"$WORK/$name.log" 2>&1 &
  PIDS=$!
}

start_nginx() { # shape port mock_port
  local tls=()
  [ "$1" = tls ] && tls=("$WORK/cert.pem" "$WORK/key.pem")
  nginx_conf "$WORK/nginx.conf" "$2" "$3" on $((IDLE_CONNS + 4096)) "${tls[@]}"
  taskset -c "$PROXY_CPU" "$NGINX_BIN" -e "$WORK/nginx_error.log" -p "$WORK" -c "$WORK/nginx.conf" \
    >"$WORK/nginx.log" 2>&1 &
  local master=$! worker="" i
  for ((i = 0; i < 100; i++)); do
    worker=$(pgrep -P "$master" | head -1 || true)
    [ -n "$worker" ] && break
    sleep 0.05
  done
  [ -n "$worker" ] || die "nginx started no worker: $(tail -3 "$WORK/nginx_error.log")"
  PIDS="$master,$worker"
}

stop_target() {
  local pid
  for pid in ${PIDS//,/ }; do kill -INT "$pid" 2>/dev/null || true; done
  for pid in ${PIDS//,/ }; do wait "$pid" 2>/dev/null || true; done
}

RESULTS=()
for round in $(seq 1 "$ROUNDS"); do
  for shape in $SHAPES; do
    variants=$VARIANTS
    [ "$shape" = tls ] && variants=${TLS_VARIANTS:-$VARIANTS}
    for v in $variants; do
      scheme=http
      [ "$shape" = tls ] && scheme=https
      if [ "$v" = direct ]; then
        url="$scheme://127.0.0.1:${MOCK_PORT[$shape]}/api/v3/chat/completions"
        run_wrk "$url" 64 1
        run_wrk "$url" 64 "$TPUT_SECS"
        rps=$W_rps
        run_wrk "$url" 1 "$LAT_SECS"
        RESULTS+=("$shape $v $rps 0 $W_p50_us $W_p99_us 0")
        log "round $round $shape $v: $rps req/s; 1 conn p50 $W_p50_us µs p99 $W_p99_us µs"
        continue
      fi
      port=$(free_port)
      start_target "$v" "$shape" "$port"
      url="$scheme://127.0.0.1:$port/chat/completions"
      run_wrk "$url" 64 1 # warm-up: connections, pools, caches
      c0=$(cpu_ticks "$PIDS")
      run_wrk "$url" 64 "$TPUT_SECS"
      c1=$(cpu_ticks "$PIDS")
      hwm=$(status_kib "$PIDS" VmHWM)
      rps=$W_rps
      cpu=$(python3 -c "print(round(100.0 * ($c1 - $c0) / $(getconf CLK_TCK) / $TPUT_SECS, 1))")
      run_wrk "$url" 1 "$LAT_SECS"
      RESULTS+=("$shape $v $rps $cpu $W_p50_us $W_p99_us $hwm")
      log "round $round $shape $v: $rps req/s at CPU $cpu%; 1 conn p50 $W_p50_us µs p99 $W_p99_us µs"
      stop_target
    done
  done
done

if ((IDLE_CONNS > 0)); then
  for v in $IDLE_VARIANTS; do
    port=$(free_port)
    start_target "$v" plain "$port"
    out=$(taskset -c "$LOAD_CPU" python3 "$ROOT/benches/load_client.py" idle --port "$port" \
      --body "$BODY" --conns "$IDLE_CONNS" --pids "$PIDS") || die "idle client failed against $v"
    log "idle $v: $out"
    RESULTS+=("idle $v $(python3 -c 'import json,sys; o=json.loads(sys.argv[1]); print(o["rss_before_kib"], o["rss_idle_kib"], o["still_open"])' "$out")")
    stop_target
  done
fi

echo
echo "### Per-core cost ($(date -u +%Y-%m-%dT%H:%MZ), $ROUNDS rounds, medians; proxy on CPU $PROXY_CPU, wrk + mock on CPU $LOAD_CPU)"
python3 "$ROOT/benches/percore_report.py" "${RESULTS[@]}"
[ -z "${RESULTS_FILE:-}" ] || printf '%s\n' "${RESULTS[@]}" >"$RESULTS_FILE"
