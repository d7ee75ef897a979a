#!/usr/bin/env bash
# What each gateway feature costs a request, in one run on this machine: the same release arkgate
# in front of the same mock upstream (benches/mock_upstream.rs), once per configuration:
#
#   base          the shipped defaults (byte rule on), no feature section
#   cache_hit     cache: (memory); every request after the first is a hit, the upstream idle
#   cache_redis   cache: backend redis (a redis-server started here); every request a hit
#   keys_only     clients: one key, no limits (the key check and the upstream key swap)
#   limit_rpm     the same key with a requests-per-minute limit far above the load (memory)
#   limit_memory  clients: one key with rpm/tpm limits far above the load; memory store
#   limit_redis   the same with rate_limit.store: redis
#   policies      three request+response policies (regex and words) that match nothing
#
# The variants run in turn, $ROUNDS rounds (default 3), so a drift of the machine touches every
# variant alike; the table gives each variant's median and the min–max spread of its CPU cost.
# For each: max req/s at 64 connections and the proxy's CPU share over that run (→ CPU µs per
# request), then p50/p99 at 1 connection. The proxy runs alone on CPU $PROXY_CPU (default 0); wrk,
# the mock and redis-server share CPU $LOAD_CPU (default 1). Everything listens on 127.0.0.1 ports
# picked here, and every process started is stopped on exit.
#
#   bash benches/features.sh          # prints a Markdown table on stdout; progress on stderr
#
# Tunables (environment): PROXY_CPU LOAD_CPU TPUT_SECS LAT_SECS ROUNDS VARIANTS="base cache_hit ..."
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PROXY_CPU=${PROXY_CPU:-0}
LOAD_CPU=${LOAD_CPU:-1}
TPUT_SECS=${TPUT_SECS:-5}
LAT_SECS=${LAT_SECS:-5}
VARIANTS=${VARIANTS:-"base cache_hit cache_redis keys_only limit_memory limit_redis policies"}
ROUNDS=${ROUNDS:-3}
LUA=$ROOT/benches/load_post.lua

# shellcheck source=benches/lib.sh
source "$ROOT/benches/lib.sh"
bash .ci/setup >&2
command -v wrk >/dev/null 2>&1 || apt_install wrk

log "building arkgate and the mock (release)"
cargo_release --bin arkgate --example mock_upstream
ARKGATE=$REL/arkgate
MOCK=$REL/examples/mock_upstream

bench_workdir features
start_mock mock
MOCK_PORT=$PORT
REDIS_PORT=$(free_port)
taskset -c "$LOAD_CPU" redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no \
  >"$WORK/redis.log" 2>&1 &
STARTED+=($!)
wait_port "$REDIS_PORT" "$!" redis

# Bodies: temperature 0 (cacheable) for every variant, so only the configuration differs.
BODY=$WORK/body.json
printf '%s' '{"model":"deepseek-v3-250324","temperature":0,"messages":[{"role":"system","content":"You are helpful."},{"role":"user","content":"Capital of France, as JSON?"}],"response_format":{"type":"json_schema","json_schema":{"name":"answer","schema":{"type":"object","properties":{"city":{"type":"string"}},"required":["city"]}}},"stream":false}' >"$BODY"
printf 'ark-bench-upstream-key\n' >"$WORK/ark.key"
chmod 600 "$WORK/ark.key"
CLIENT_KEY=ak-bench-client-key-0123456789
KEY_SHA=$(printf '%s' "$CLIENT_KEY" | "$ARKGATE" key hash)

section() { # variant: the YAML it adds to the base config
  case $1 in
    base) ;;
    cache_hit) printf 'cache: {backend: memory}\n' ;;
    cache_redis) printf 'cache: {backend: redis}\nredis: {url: "redis://127.0.0.1:%s/0"}\n' "$REDIS_PORT" ;;
    keys_only)
      printf 'clients:\n  upstream_key_file: %s\n  keys:\n    - {name: bench, key_sha256: "%s"}\n' \
        "$WORK/ark.key" "$KEY_SHA"
      ;;
    limit_rpm)
      printf 'clients:\n  upstream_key_file: %s\n  keys:\n    - {name: bench, key_sha256: "%s", rpm: 100000000}\n' \
        "$WORK/ark.key" "$KEY_SHA"
      ;;
    limit_memory | limit_redis)
      printf 'clients:\n  upstream_key_file: %s\n  keys:\n    - {name: bench, key_sha256: "%s", rpm: 100000000, tpm: 1000000000000}\n' \
        "$WORK/ark.key" "$KEY_SHA"
      if [ "$1" = limit_redis ]; then
        printf 'rate_limit: {store: redis, by: key}\nredis: {url: "redis://127.0.0.1:%s/0"}\n' "$REDIS_PORT"
      fi
      ;;
    policies)
      cat <<'YAML'
policies:
  - {name: no-keys, on: [request, response], regex: "sk-[A-Za-z0-9]{20,}", action: redact}
  - {name: no-mail, on: [request, response], regex: "[a-z0-9.]+@internal\\.example", action: redact}
  - {name: no-hosts, on: [request, response], words: ["db.internal.example", "vault.internal.example"], action: block}
YAML
      ;;
    *) die "unknown variant $1" ;;
  esac
}

ark_wrk() { # conns secs auth: run_wrk against this variant's listener
  run_wrk "http://127.0.0.1:$ARK_PORT/chat/completions" "$@"
}

RESULTS=()
for round in $(seq 1 "$ROUNDS"); do
for v in $VARIANTS; do
  ARK_PORT=$(free_port)
  {
    printf 'listen: [{addr: "127.0.0.1:%s"}]\n' "$ARK_PORT"
    printf 'upstream: {base_url: "http://127.0.0.1:%s/api/v3"}\n' "$MOCK_PORT"
    printf 'server: {threads: 1, pid_file: %s/%s.pid, upgrade_sock: %s/%s.sock}\n' "$WORK" "$v" "$WORK" "$v"
    section "$v"
  } >"$WORK/$v.yaml"
  "$ARKGATE" -t -c "$WORK/$v.yaml" >/dev/null 2>"$WORK/$v.check" || die "$v: config rejected: $(cat "$WORK/$v.check")"
  taskset -c "$PROXY_CPU" "$ARKGATE" -c "$WORK/$v.yaml" >"$WORK/$v.log" 2>&1 &
  pid=$!
  STARTED+=("$pid")
  wait_port "$ARK_PORT" "$pid" "$v"
  auth=""
  case $v in limit_* | keys_only) auth="Bearer $CLIENT_KEY" ;; esac
  ark_wrk 64 1 "$auth" # warm-up (and the first, stored, answer for the cache variants)
  ark_wrk 1 1 "$auth"
  c0=$(cpu_ticks "$pid")
  ark_wrk 64 "$TPUT_SECS" "$auth"
  c1=$(cpu_ticks "$pid")
  rps=$W_rps
  cpu=$(python3 -c "print(round(100.0 * ($c1 - $c0) / $(getconf CLK_TCK) / $TPUT_SECS, 1))")
  ark_wrk 1 "$LAT_SECS" "$auth"
  log "round $round $v: $rps req/s at CPU $cpu%, 1 conn p50 $W_p50_us µs p99 $W_p99_us µs"
  RESULTS+=("$v $rps $cpu $W_p50_us $W_p99_us")
  kill -INT "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
done
done

echo
echo "### Feature cost ($(date -u +%Y-%m-%dT%H:%MZ), proxy on CPU $PROXY_CPU, wrk + mock + redis on CPU $LOAD_CPU)"
echo
python3 - "${RESULTS[@]}" <<'PY'
import statistics
import sys

runs = {}
for r in sys.argv[1:]:
    name, rps, cpu, p50, p99 = r.split()
    rps, cpu = float(rps), float(cpu)
    us = cpu / 100.0 / rps * 1e6 if rps else float("nan")
    runs.setdefault(name, []).append((us, rps, int(p50), int(p99)))
med = lambda xs: statistics.median(xs)
base = med([u for u, *_ in runs["base"]]) if "base" in runs else None
base_p99 = med([r[3] for r in runs["base"]]) if "base" in runs else None
print("| configuration | CPU µs per request (median; min–max) | ÷ base | req/s, 64 conns | p50 at 1 conn (µs) | p99 at 1 conn (µs) | added p99 vs base (µs) |")
print("|---|---|---|---|---|---|---|")
for name, rs in runs.items():
    us = [r[0] for r in rs]
    m = med(us)
    ratio = f"{m / base:.2f}×" if base else "—"
    p99 = med([r[3] for r in rs])
    added = f"{p99 - base_p99:+.0f}" if base_p99 is not None else "—"
    print(f"| {name} | {m:.1f} ({min(us):.1f}–{max(us):.1f}) | {ratio} | {med([r[1] for r in rs]):,.0f} "
          f"| {med([r[2] for r in rs]):.0f} | {p99:.0f} | {added} |")
print()
print(f"{len(next(iter(runs.values())))} rounds; each round runs every configuration in turn.")
PY
