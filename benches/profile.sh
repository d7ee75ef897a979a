#!/usr/bin/env bash
# Where a request's instructions go: arkgate and the bare Pingora forwarder (benches/bare_pingora.rs)
# each run under valgrind's callgrind, one thread, in front of the same mock, and serve the same
# POSTs from wrk. Callgrind counts instructions, not time, so the figures repeat from run to run
# whatever else the machine is doing (the kernel's share is not in them: see benches/percore.sh
# for CPU time).
#
#   bash benches/profile.sh     # instructions per request for each target, and arkgate's costliest
#                               # functions (inclusive) beside the bare forwarder's
#
# Tunables (environment): TARGETS ("bare ark", or ark@bin / bare@bin with $ARK_BIN_bin /
# $BARE_BIN_bin), REQS_SECS (how
# long wrk sends, default 6), TOP (rows per profile, default 40), KEEP_WORK=1.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
# shellcheck source=benches/lib.sh
source "$ROOT/benches/lib.sh"

LOAD_CPU=${LOAD_CPU:-1}
PROXY_CPU=${PROXY_CPU:-0}
TARGETS=${TARGETS:-"bare ark"}
REQS_SECS=${REQS_SECS:-6}
TOP=${TOP:-40}
LUA=$ROOT/benches/load_post.lua
BODY=$ROOT/benches/load_body.json

command -v valgrind >/dev/null 2>&1 || apt_install valgrind
command -v wrk >/dev/null 2>&1 || apt_install wrk
cargo_release --bin arkgate --example mock_upstream --example bare_pingora

MOCK=$REL/examples/mock_upstream
bench_workdir profile
start_mock mock
MOCK_PORT=$PORT

mock_requests() { curl -sf "http://127.0.0.1:$MOCK_PORT/__stats" | python3 -c 'import json,sys; print(json.load(sys.stdin)["requests"])'; }

for t in $TARGETS; do
  port=$(free_port)
  out=$WORK/$t.callgrind
  bin=$REL/arkgate
  [[ $t == bare* ]] && bin=$REL/examples/bare_pingora
  if [[ $t == *@* ]]; then
    var="ARK_BIN_${t##*@}"
    [[ $t == bare* ]] && var="BARE_BIN_${t##*@}"
    bin=${!var:-}
    [ -x "$bin" ] || die "$t: \$$var does not name an executable"
  fi
  case $t in
    bare*) cmd=("$bin" --listen "127.0.0.1:$port" --upstream "127.0.0.1:$MOCK_PORT"
      --prefix /api/v3 --threads 1) ;;
    ark*)
      name=${t//@/_}
      cat >"$WORK/$name.yaml" <<EOF
listen: [{addr: "127.0.0.1:$port"}]
upstream: {base_url: "http://127.0.0.1:$MOCK_PORT/api/v3"}
server: {threads: 1, pid_file: $WORK/$name.pid, upgrade_sock: $WORK/$name.sock}
EOF
      cmd=("$bin" -c "$WORK/$name.yaml")
      ;;
    *) die "unknown target $t" ;;
  esac
  # Instrumentation starts off (--instr-atstart=no) and is switched on for the measured
  # requests only, after a warm-up has filled the pools and caches.
  taskset -c "$PROXY_CPU" valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$out" \
    "${cmd[@]}" >"$WORK/$t.log" 2>&1 &
  pid=$!
  STARTED+=("$pid")
  for ((i = 0; i < 600; i++)); do
    (: </dev/tcp/127.0.0.1/"$port") 2>/dev/null && break
    kill -0 "$pid" 2>/dev/null || die "$t exited: $(tail -3 "$WORK/$t.log")"
    sleep 0.1
  done
  run_wrk "http://127.0.0.1:$port/chat/completions" 8 2
  callgrind_control -i on "$pid" >/dev/null
  r0=$(mock_requests)
  run_wrk "http://127.0.0.1:$port/chat/completions" 8 "$REQS_SECS"
  r1=$(mock_requests)
  callgrind_control -i off "$pid" >/dev/null
  callgrind_control -d "$pid" >/dev/null
  kill -INT "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  n=$((r1 - r0))
  dump=$out.1 # the dump taken above (the file without a suffix is written at exit)
  callgrind_annotate --inclusive=yes --threshold=100 "$dump" >"$WORK/$t.annotated" 2>/dev/null
  python3 - "$WORK/$t.annotated" "$t" "$n" "$TOP" <<'PY'
import re, sys
path, target, n, top = sys.argv[1], sys.argv[2], max(1, int(sys.argv[3])), int(sys.argv[4])
rows, total = [], None
for line in open(path, encoding="utf-8", errors="replace"):
    m = re.match(r"\s*([\d,]+)\s+(?:\(([\d.]+)%\)\s+)?(.*)", line)
    if not m:
        continue
    ir = int(m.group(1).replace(",", ""))
    if "PROGRAM TOTALS" in m.group(3):
        total = ir
    elif total is not None and m.group(2):
        name = re.sub(r"^(.*?\.(rs|c|h|S)|\?\?\?):", "", m.group(3))
        rows.append((ir, m.group(2), re.sub(r" \[/.*\]$", "", name)[:110]))
if total is None:
    sys.exit(f"{target}: callgrind recorded nothing")
print(f"### {target}: {n} requests, {total / n:,.0f} instructions per request")
print()
print("```")
print(f"{'Ir/req':>10}  {'share':>7}  function (inclusive)")
for ir, share, name in rows[:top]:
    print(f"{ir / n:>10,.0f}  {share:>6}%  {name}")
PY
  echo '```'
  echo
done
