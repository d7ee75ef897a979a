# Shell helpers shared by the load scripts in benches/ (sourced, not run). They expect $WORK (a
# temp dir), $LOAD_CPU, $LUA and a STARTED=() array of PIDs to stop on exit (bench_workdir sets
# up the first and the last).

log() { printf '== %s\n' "$*" >&2; }
die() {
  log "ERROR: $*"
  exit 1
}

# apt_install pkg...: Debian packages, as root or through sudo, without starting their daemons.
apt_install() {
  local sudo="" policy="" rc=0
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  log "installing $* (Debian packages)"
  # Keep nginx's package from starting its own daemon on port 80 (policy-rc.d exit 101).
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    policy=/usr/sbin/policy-rc.d
    printf '#!/bin/sh\nexit 101\n' | $sudo tee "$policy" >/dev/null
    $sudo chmod +x "$policy"
  fi
  { $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq \
    --no-install-recommends "$@" >/dev/null; } || rc=$?
  [ -z "$policy" ] || $sudo rm -f "$policy"
  ((rc == 0)) || die "apt-get install $* failed (exit $rc)"
}

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

wait_port() { # port pid name: polls a connect until it succeeds; fails if the process died
  local i
  for ((i = 0; i < 200; i++)); do
    kill -0 "$2" 2>/dev/null || die "$3 exited at start: $(tail -3 "$WORK/$3.log" 2>/dev/null)"
    if (: </dev/tcp/127.0.0.1/"$1") 2>/dev/null; then return 0; fi
    sleep 0.05
  done
  die "$3 did not listen on $1"
}

# bench_workdir name: a fresh temp dir in $WORK, no PIDs in STARTED yet, all stopped on exit.
bench_workdir() {
  WORK=$(mktemp -d "/tmp/arkgate-$1.XXXXXX")
  STARTED=()
  trap stop_all EXIT
}

# start_mock name [mock args...]: $MOCK (the mock upstream) on a free port on CPU $LOAD_CPU,
# logging to $WORK/name.log; sets PORT.
start_mock() {
  local name=$1
  shift
  PORT=$(free_port)
  taskset -c "$LOAD_CPU" "$MOCK" --port "$PORT" "$@" >"$WORK/$name.log" 2>&1 &
  STARTED+=($!)
  wait_port "$PORT" "$!" "$name"
}

cpu_ticks() { # comma-separated pids: utime+stime of all their threads, in clock ticks
  local total=0 pid f
  for pid in ${1//,/ }; do
    read -r -a f <"/proc/$pid/stat"
    total=$((total + f[13] + f[14]))
  done
  echo "$total"
}

status_kib() { # comma-separated pids, field (VmHWM|VmRSS): summed, in KiB
  local total=0 pid v
  for pid in ${1//,/ }; do
    v=$(awk -v f="$2:" '$1 == f {print $2}' "/proc/$pid/status")
    total=$((total + ${v:-0}))
  done
  echo "$total"
}

# run_wrk url conns secs [auth]: POSTs $BODY; sets W_requests W_rps W_p50_us W_p99_us W_p999_us
# W_errors and the other fields of the RESULT line printed by load_post.lua.
run_wrk() {
  local out=$WORK/wrk.out kv line
  WRK_BODY=$BODY WRK_AUTH=${4:-} taskset -c "$LOAD_CPU" wrk -t1 -c"$2" -d"${3}s" --timeout 2s \
    -s "$LUA" "$1" >"$out" 2>&1 || die "wrk failed against $1: $(tail -3 "$out")"
  line=$(grep '^RESULT ' "$out") || die "wrk printed no RESULT line against $1: $(tail -3 "$out")"
  for kv in ${line#RESULT }; do printf -v "W_${kv%%=*}" '%s' "${kv#*=}"; done
  ((W_requests > 0)) || die "wrk completed no request against $1"
  ((W_errors == 0)) || log "WARNING: $W_errors errors against $1 (status $W_status)"
}

stop_all() { # the EXIT trap: every PID in STARTED, SIGINT then SIGKILL
  local pid
  for pid in "${STARTED[@]}"; do kill -INT "$pid" 2>/dev/null || true; done
  sleep 0.5
  for pid in "${STARTED[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
  [ "${KEEP_WORK:-0}" = 1 ] && log "kept $WORK" || rm -rf "$WORK"
}

# nginx_conf file listen_port upstream_port proxy_buffering(on|off) connections [tls_cert tls_key]:
# writes the nginx side of a comparison: one worker, access log off, an upstream keepalive pool,
# keep-alive limits lifted (nginx's default 1000 would close each client and upstream connection
# after 1000 requests; the proxies compared with it have no such limit), no rewrite. With a
# certificate and key it listens with TLS and reaches the upstream over TLS (not verified: a mock).
nginx_conf() {
  local ssl="" scheme=http proxy_ssl=""
  if [ -n "${6:-}" ]; then
    ssl=" ssl;
    ssl_certificate $6;
    ssl_certificate_key $7"
    scheme=https
    proxy_ssl="proxy_ssl_verify off; proxy_ssl_session_reuse on;"
  fi
  mkdir -p "$WORK/nginx_tmp"
  cat >"$1" <<EOF
worker_processes 1;
daemon off;
master_process on;
pid $WORK/nginx.pid;
error_log $WORK/nginx_error.log warn;
worker_rlimit_nofile $(($5 + 100));
events { worker_connections $5; }
http {
  access_log off;
  client_body_temp_path $WORK/nginx_tmp/client_body;
  proxy_temp_path $WORK/nginx_tmp/proxy;
  fastcgi_temp_path $WORK/nginx_tmp/fastcgi;
  uwsgi_temp_path $WORK/nginx_tmp/uwsgi;
  scgi_temp_path $WORK/nginx_tmp/scgi;
  keepalive_requests 1000000;
  upstream mock {
    server 127.0.0.1:$3;
    keepalive 64;
    keepalive_requests 1000000;
  }
  server {
    listen 127.0.0.1:$2 backlog=8192$ssl;
    location / {
      proxy_pass $scheme://mock/api/v3/;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering $4;
      $proxy_ssl
    }
  }
}
EOF
}

# cargo_release args...: builds the named release targets quietly and sets REL to the release
# directory (wherever cargo's target directory is).
cargo_release() {
  cargo build --release --quiet "$@" || die "cargo build --release $* failed"
  REL=$(cargo metadata --format-version 1 --no-deps |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')/release
}
