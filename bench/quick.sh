#!/usr/bin/env bash
# A first, rough measurement (issue 2): requests per second through the
# tollgate race path (3 backends) and a one-backend route, against hitting
# one backend directly. The backends are nginx answering a fixed JSON body.
# Loopback only; every process started here is stopped by PID on exit.
#
#   bench/quick.sh [seconds] [connections]     (defaults: 10 32)
#
# BASELINE=/path/to/another/tollgate runs the same routes through that binary
# too (e.g. an older build), in the same run, for a before/after ratio.
#
# Needs nginx and wrk (installed with apt-get when missing) and a release build.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-10}
conns=${2:-32}

need=()
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || need+=(nginx-light)
command -v wrk >/dev/null 2>&1 || need+=(wrk)
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
if ((${#need[@]})); then
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >/dev/null
fi
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
cargo build --release --locked -q

dir=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$dir"; }
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 200); do (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0; sleep 0.05; done; echo "port $1 not ready" >&2; exit 1; }

b1=$(free_port); b2=$(free_port); b3=$(free_port); gw=$(free_port); adm=$(free_port)
body='{"status": true, "data": {"symbol": "AAPL", "close": 123.45}}'
{
  echo "worker_processes 1; error_log $dir/nginx.err; pid $dir/nginx.pid; daemon off;"
  echo "events { worker_connections 1024; }"
  echo "http { access_log off; keepalive_requests 100000;"
  for p in $b1 $b2 $b3; do
    echo "  server { listen 127.0.0.1:$p; location / { default_type application/json; return 200 '$body'; } }"
  done
  echo "}"
} > "$dir/nginx.conf"
"$NGINX" -p "$dir" -c "$dir/nginx.conf" & pids+=($!)

cat > "$dir/keys.yaml" <<YAML
keys:
  - {key: "bench-key", name: bench, credits: 1000000000000, rate_per_second: 100000000}
YAML
conf() { # conf NAME PORT ADMIN [STORE]
cat > "$dir/$1.yaml" <<YAML
server: {threads: 1, pid_file: $dir/$1.pid, upgrade_sock: $dir/$1.sock}
listen: ["127.0.0.1:$2"]
admin_listen: "127.0.0.1:$3"
access_log: ${ACCESS_LOG:-off}   # off as nginx's (access_log off): the comparison is of request handling
store: ${4:-{keys_file: $dir/keys.yaml\}}
routes:
  - {name: race3, prefix: /race/, backends: ["http://127.0.0.1:$b1", "http://127.0.0.1:$b2", "http://127.0.0.1:$b3"]}
  - {name: one, prefix: /one/, backends: ["http://127.0.0.1:$b1"]}
  - {name: cached, prefix: /cached/, backends: ["http://127.0.0.1:$b1", "http://127.0.0.1:$b2", "http://127.0.0.1:$b3"], cache: {ttl_seconds: 3600}}
cache: {memory_entries: ${5:-10000}}
YAML
}
conf tollgate "$gw" "$adm"
RUST_LOG=warn target/release/tollgate serve -c "$dir/tollgate.yaml" 2>"$dir/tollgate.log" & pids+=($!)
for p in $b1 $b2 $b3 $gw; do wait_port "$p"; done
# The same gateway on the Redis store.
rp=$(free_port); rgw=$(free_port); radm=$(free_port)
redis-server --port "$rp" --bind 127.0.0.1 --save '' --appendonly no >/dev/null 2>&1 & pids+=($!)
wait_port "$rp"
conf redis "$rgw" "$radm" "{redis_url: \"redis://127.0.0.1:$rp/0\"}"
# A one-entry in-process tier, so that nearly every hit comes from Redis.
tgw=$(free_port); tadm=$(free_port)
conf redistier "$tgw" "$tadm" "{redis_url: \"redis://127.0.0.1:$rp/0\"}" 1
target/release/tollgate keys import "$dir/keys.yaml" -c "$dir/redis.yaml" >/dev/null
RUST_LOG=warn target/release/tollgate serve -c "$dir/redis.yaml" 2>"$dir/redis-gw.log" & pids+=($!)
RUST_LOG=warn target/release/tollgate serve -c "$dir/redistier.yaml" 2>"$dir/redistier-gw.log" & pids+=($!)
wait_port "$rgw"; wait_port "$tgw"
# 100 distinct cached paths, stored in Redis before the runs.
for i in $(seq 0 99); do curl -s -o /dev/null -H "X-API-Key: bench-key" "http://127.0.0.1:$tgw/cached/k$i"; done
cat > "$dir/cycle.lua" <<'LUA'
local i = 0
request = function()
  i = i + 1
  return wrk.format(nil, "/cached/k" .. (i % 100))
end
LUA
if [ -n "${BASELINE:-}" ]; then
  bgw=$(free_port); badm=$(free_port)
  conf baseline "$bgw" "$badm"
  RUST_LOG=warn "$BASELINE" serve -c "$dir/baseline.yaml" 2>"$dir/baseline.log" & pids+=($!)
  wait_port "$bgw"
fi

run() {
  local name=$1 url=$2 out rps p99
  out=$(wrk -t1 -c"$conns" -d"${secs}s" --latency -H "X-API-Key: bench-key" ${3:+-s "$3"} "$url")
  rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
  p99=$(awk '$1=="99%" {print $2}' <<<"$out")
  errs=$(grep -E "Non-2xx|Socket errors" <<<"$out" | tr -s ' ' || true)
  printf '%-34s %12s req/s   p99 %-9s %s\n' "$name" "$rps" "$p99" "$errs"
}
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
echo "wrk: 1 thread, $conns connections, ${secs}s each; tollgate threads: 1; nginx backends: 1 worker"
run "direct backend (nginx)" "http://127.0.0.1:$b1/api/x"
run "tollgate, route with 1 backend" "http://127.0.0.1:$gw/one/x"
run "tollgate, race over 3 backends" "http://127.0.0.1:$gw/race/x"
run "tollgate, cache hit (in-process)" "http://127.0.0.1:$gw/cached/x"
run "tollgate+redis, cache hit (in-process)" "http://127.0.0.1:$rgw/cached/x"
run "tollgate+redis, cache hit (Redis tier)" "http://127.0.0.1:$tgw" "$dir/cycle.lua"
run "tollgate+redis, route with 1 backend" "http://127.0.0.1:$rgw/one/x"
run "tollgate+redis, race over 3 backends" "http://127.0.0.1:$rgw/race/x"
if [ -n "${BASELINE:-}" ]; then
  run "baseline, route with 1 backend" "http://127.0.0.1:$bgw/one/x"
  run "baseline, race over 3 backends" "http://127.0.0.1:$bgw/race/x"
fi
