#!/usr/bin/env bash
# levee vs nginx: the same load, the same backend, the same CPU, in the same run.
#
#   bash benches/load/run.sh [proxy|clients|hot|redis|failing|storm|siege|cluster ...]
#   (default: the first six; siege, cluster and instructions run only when named: siege takes
#   SIEGE_QUIET + SIEGE_SECONDS, cluster starts a 6-node Redis Cluster and three levees)
#
# Modes:
#   proxy    plain reverse proxy, no limits (10,000 rotating x-device-id values)
#   clients  10,000 rotating x-device-id values, a per-client limit (1000/s, burst 1000)
#            that no client comes near: the cost of tracking many clients
#   hot      every request from one x-device-id limited to 100/s (burst 100): the cost
#            of refusing (429), and the share of 429s
#   redis    levee with store.kind = "redis" against levee in memory, both in `clients`
#            (a throwaway redis-server; "skipped: <reason>" when levee cannot do it yet)
#   failing  one upstream, two endpoints: A answers 200, B always 503; one retry on 503
#            (levee: retry attempts 2 budget 0.2, outlier consecutive_failures 5; nginx:
#            proxy_next_upstream http_503, tries 2): req/s, 503 share at the client, and the
#            request rate at the backends (stub_status; B's access log)
#   storm    storm.py instead of wrk: 1,000 steady clients at 1/s + one bomb doubling
#            2/s -> 512/s for STORM_SECONDS (12); limit 100/s burst 100 per client, levee's
#            storm detector as shipped: when the bomb is first refused, how many of its
#            requests got through, the steady clients' success rate and p99
#   siege    siege.py instead of wrk, levee alone (nginx has no equivalent defences): a quiet
#            run of the steady fleet (1,000 clients at 1/s) for SIEGE_QUIET (60) s, then for
#            SIEGE_SECONDS (300) the same fleet while idle sockets hold 90% of
#            max_connections (2000), 36 stalled PUT bodies, a rapid-reset h2c connection, a
#            path-spelling flood and a million new client keys (over 6 limited routes) hit
#            levee, and nobody scrapes /metrics. Per minute: the fleet's success and p99,
#            levee's RSS (/proc), client connections, what the attackers got; then the
#            issue's targets, met or not. The attackers run under SCHED_IDLE, so that on the
#            shared load core they never delay the process that measures the fleet.
#            SIEGE_ARGS passes more options to siege.py (e.g. "--rr-rate 0" to leave one
#            attack out, "--no-sched-idle" for the attackers at nice +5 as before 2026-12-04;
#            `python3 siege.py --help` lists them). SIEGE_CAPTURE=1 also records, with tcpdump
#            on the load core, 20 s of the quiet run and 20 s of the siege's second minute
#            (the packets carrying data to and from levee and the backend) and splits the
#            steady fleet's time by where the kernel saw it go (wire.py): levee, the backend,
#            and what is left, the load generator's own delays. The capture costs both cores
#            kernel time on every packet: take the verdicts from a run without it
#   cluster  levee only, three replicas (LEVEE_WORKERS=1 each, all on PROXY_CPU) sharing
#            a throwaway Redis Cluster (3 masters + 3 replicas, on LOAD_CPU) with
#            store.urls = all six nodes, on_failure = "local"; three wrk in parallel, one
#            per replica, CLUSTER_CONNECTIONS (22) connections each: the `clients` load
#            (1000/s burst 1000, never reached) with the cluster store, then the same with
#            store.kind = "memory" (ratio redis/memory), then `hot` (one client id, 100/s
#            burst 100) with the cluster store: decisions/s summed over the replicas, the
#            worst replica's p50/p99, script calls (EVALSHA/EVAL/FCALL) per second and per
#            request summed over the masters' INFO commandstats, the 429 share. Three
#            replicas on one core measure the cost per decision, not scaling
#   instructions  levee and nginx each under callgrind (valgrind), in proxy, clients and
#            hot: user-space instructions per request (wrk -t1 -c8 for 8 s after a 4 s
#            warm-up and zeroed counters; the whole process's count over wrk's requests).
#            Deterministic to a few hundred where req/s moves by tens of percent from one
#            hour to the next on a shared machine; run only when named. CACHE_SIM=1 adds
#            callgrind's cache simulation (--cache-sim=yes, the host's L1 and last-level
#            sizes, no prefetcher): L1 instruction misses, L1 data misses and last-level
#            misses per request beside the instructions, for the time that instruction
#            counts do not explain
#
# Environment: DURATION (10s) measured run, WARMUP (2s) before each, CONNECTIONS (64),
# THREADS (1, wrk), PROXY_CPU (1), LOAD_CPU (0: wrk, backend, redis), LEVEE_BIN (skip
# the build and use this binary), PERF=1 (after each measured run, one more run of
# PERF_DURATION=5 s under perf: system calls per request of each proxy, and levee's top
# symbols; the measured numbers are taken without perf), PROFILES=DIR (with PERF=1: a
# flame graph per proxy and mode, DIR/MODE-PROXY.svg, and DIR/syscalls.md; needs inferno:
# `cargo install inferno`), KEEP_TMP=1 (keep configs and
# logs), ROUNDS (3: proxy, clients and hot keep both proxies up and measure them in turn
# this many times; the table shows the round with the median levee/nginx ratio and lists
# every round's), RESULTS (results.md: where the tables are appended), IDLE_WAIT (600: how long
# to wait, before each run, for cores that something else keeps busy).
#
# Layout on the machine (2 cores here):
#   core 1 (PROXY_CPU): the proxy under test, alone: nginx (worker_processes 1) or levee
#                       (LEVEE_WORKERS=1), one after the other, never both at once
#   core 0 (LOAD_CPU):  wrk, the backend (an nginx that answers `200 ok`) and redis
# On two cores this is the fairest split there is: each proxy gets one whole core to
# itself and the same neighbours. The table shows how busy each core was: when core 0
# is saturated and the proxy's core is not, the load generator is the bottleneck and
# the ratio understates the difference (the "req/CPU-s" column, requests per second
# of proxy CPU, stays comparable in that case).
#
# What it does not measure: more than one core per proxy (scaling), TLS, HTTP/2,
# request or response bodies beyond a few bytes, slow or failing backends, many
# connections (C10k), connection setup (wrk keeps its connections alive), latency
# over a real network, or a Redis on another host (here it is on loopback).
# nginx is told to do the same header work as levee (x-forwarded-for,
# x-forwarded-proto, x-request-id both ways). levee runs its storm detector as shipped
# (config/levee.toml) in every mode but `failing` (whose one request, failing on one
# endpoint, is the retry storm it sheds), so wrk sends what a fleet would: proxy and
# clients rotate $CLIENTS client ids, hot sends one client id for $CLIENTS rotating
# paths; never the same request from the same client while it is in flight.
set -euo pipefail

# The exact command, for the results file (before the defaults below are filled in).
CMD=""
for v in ROUNDS PROFILES CLUSTER_CONNECTIONS IDLE_WAIT STORM_SECONDS SIEGE_SECONDS SIEGE_QUIET SIEGE_ARGS DURATION WARMUP CONNECTIONS THREADS PROXY_CPU LOAD_CPU LEVEE_BIN PERF PERF_DURATION CACHE_SIM; do
  if [ -n "${!v+x}" ]; then
    case "${!v}" in *" "*) CMD+="$v=\"${!v}\" " ;; *) CMD+="$v=${!v} " ;; esac
  fi
done
CMD+="bash benches/load/run.sh${*:+ $*}"

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
HERE="$ROOT/benches/load"
RESULTS=${RESULTS:-$HERE/results.md}
DURATION=${DURATION:-10s}
WARMUP=${WARMUP:-2s}
CONNECTIONS=${CONNECTIONS:-64}
THREADS=${THREADS:-1}
PROXY_CPU=${PROXY_CPU:-1}
LOAD_CPU=${LOAD_CPU:-0}
PERF=${PERF:-0}
PERF_DURATION=${PERF_DURATION:-5}
KEEP_TMP=${KEEP_TMP:-0}
IDLE_WAIT=${IDLE_WAIT:-600}
STORM_SECONDS=${STORM_SECONDS:-12}
SIEGE_SECONDS=${SIEGE_SECONDS:-300}
SIEGE_QUIET=${SIEGE_QUIET:-60}
SIEGE_ARGS=${SIEGE_ARGS:-}
SIEGE_CAPTURE=${SIEGE_CAPTURE:-0}
CLUSTER_CONNECTIONS=${CLUSTER_CONNECTIONS:-22}
PROFILES=${PROFILES:-}
CACHE_SIM=${CACHE_SIM:-0}
ROUNDS=${ROUNDS:-3}
CLIENTS=10000


say() { printf '[load] %s\n' "$*" >&2; }
die() { printf '[load] error: %s\n' "$*" >&2; exit 1; }

# ---------------------------------------------------------------------------- modes
ALL_MODES=(proxy clients hot redis failing storm)
MODES=("$@")
[ ${#MODES[@]} -eq 0 ] && MODES=("${ALL_MODES[@]}")
for m in "${MODES[@]}"; do
  case "$m" in proxy|clients|hot|redis|failing|storm|siege|cluster|instructions) ;; *) die "unknown mode '$m' (expected: ${ALL_MODES[*]} siege cluster instructions)" ;; esac
done
want() { local m; for m in "${MODES[@]}"; do [ "$m" = "$1" ] && return 0; done; return 1; }

# ---------------------------------------------------------------------------- tools
need=()
command -v nginx >/dev/null 2>&1 || need+=(nginx-light)
command -v wrk >/dev/null 2>&1 || need+=(wrk)
command -v taskset >/dev/null 2>&1 || need+=(util-linux)
command -v python3 >/dev/null 2>&1 || need+=(python3-minimal)
if want redis || want cluster; then command -v redis-server >/dev/null 2>&1 || need+=(redis-server); fi
if [ "$PERF" = 1 ]; then command -v perf >/dev/null 2>&1 || need+=(linux-perf); fi
if want instructions; then command -v callgrind_control >/dev/null 2>&1 || need+=(valgrind); fi
if want siege && [ "$SIEGE_CAPTURE" = 1 ]; then command -v tcpdump >/dev/null 2>&1 || need+=(tcpdump); fi
if [ ${#need[@]} -gt 0 ]; then
  [ "$(id -u)" -eq 0 ] || die "missing ${need[*]}; run as root or install them (apt-get install ${need[*]})"
  say "installing ${need[*]} (apt-get)"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  say "installed ${need[*]}"
fi
command -v redis-server >/dev/null 2>&1 && HAVE_REDIS=1 || HAVE_REDIS=0

# PERF=1 PROFILES=DIR: also a flame graph per proxy and mode (DIR/MODE-PROXY.svg, perf
# with DWARF call graphs, folded and drawn by inferno) and DIR/syscalls.md.
REV=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo "?")
FLAME=""
CUR_MODE=""
if [ "$PERF" = 1 ] && [ -n "$PROFILES" ]; then
  command -v inferno-flamegraph >/dev/null 2>&1 || die "PROFILES needs inferno's tools (cargo install inferno)"
  mkdir -p "$PROFILES"; FLAME=$(cd "$PROFILES" && pwd)
  : >"$FLAME/syscalls.rows"
fi

NPROC=$(nproc)
if [ "$NPROC" -lt 2 ]; then
  say "warning: one core only: everything shares core 0, the numbers mean little"
  PROXY_CPU=0 LOAD_CPU=0
fi
CPU_MODEL=$(awk -F': ' '/^model name/{print $2; exit}' /proc/cpuinfo)
CLK_TCK=$(getconf CLK_TCK)
pct_cpu() { awk -v d="$1" -v hz="$CLK_TCK" -v s="$2" 'BEGIN{printf "%.0f", 100 * d / hz / s}'; }  # TICKS SECONDS: % of one core
pct_busy() { awk -v b="$1" -v t="$2" 'BEGIN{ if (t > 0) printf "%.0f", 100 * b / t; else print "?" }'; }  # BUSY TOTAL: %

# ---------------------------------------------------------------------------- processes
TMP=$(mktemp -d /tmp/levee-load.XXXXXX)
chmod 755 "$TMP"   # nginx workers may run as nobody
PIDS=()
OK=0

tree_pids() { # PID: it and its descendants
  local p c
  for p in "$@"; do
    [ -d "/proc/$p" ] || continue
    echo "$p"
    for c in $(ps -o pid= --ppid "$p" 2>/dev/null); do tree_pids "$c"; done
  done
}

any_alive() { local p; for p in "$@"; do kill -0 "$p" 2>/dev/null && return 0; done; return 1; }

stop_pid() { # PID: TERM it and its descendants, KILL after 5 s
  local pid=$1 all=()
  mapfile -t all < <(tree_pids "$pid")
  [ ${#all[@]} -gt 0 ] || return 0
  kill -TERM "${all[@]}" 2>/dev/null || true
  for _ in $(seq 50); do
    any_alive "${all[@]}" || break
    sleep 0.1
  done
  kill -KILL "${all[@]}" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}

cleanup() {
  local rc=$? p
  trap - EXIT INT TERM
  for p in "${PIDS[@]}"; do stop_pid "$p"; done
  if [ "$OK" = 1 ] && [ "$KEEP_TMP" != 1 ]; then
    rm -rf "$TMP"
  else
    say "configs and logs kept in $TMP"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'say "interrupted"; exit 130' INT TERM

LAST_PID=
start() { # NAME CPU CMD...: run pinned to CPU in the background, log to $TMP/NAME.log
  local name=$1 cpu=$2; shift 2
  taskset -c "$cpu" "$@" >"$TMP/$name.log" 2>&1 &
  LAST_PID=$!
  PIDS+=("$LAST_PID")
}

forget() { # PID: stop it and drop it from the cleanup list
  local p keep=()
  stop_pid "$1"
  for p in "${PIDS[@]}"; do [ "$p" = "$1" ] || keep+=("$p"); done
  PIDS=("${keep[@]}")
}

USED_PORTS=" "
PORT=
free_port() { # -> PORT: a port nobody listens on, never handed out before in this run
  local p
  while :; do
    p=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])') \
      || die "cannot pick a free port (python3)"
    case "$USED_PORTS" in *" $p "*) continue ;; esac
    USED_PORTS+="$p "
    PORT=$p
    return
  done
}

http_status() { # PORT [HEADER]: "STATUS [x-levee-reason]" of GET / on 127.0.0.1:PORT, empty if none
  (
    exec 3<>"/dev/tcp/127.0.0.1/$1" || exit 1
    printf 'GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n%s\r\n' "${2:+$2$'\r\n'}" >&3
    timeout 2 cat <&3 | tr -d '\r' | awk 'NR == 1 { s = $2 } /^$/ { exit }
      tolower($1) == "x-levee-reason:" { r = " " $2 } END { if (s != "") print s r }'
  ) 2>/dev/null || true
}

wait_up() { # NAME PID PORT [SECONDS]: wait until PORT accepts connections (15 s), or fail
  local name=$1 pid=$2 port=$3 secs=${4:-15}
  for _ in $(seq $(( secs * 10 ))); do
    if ! kill -0 "$pid" 2>/dev/null; then
      say "$name exited at start; its log ($TMP/$name.log):"
      tail -n 20 "$TMP/$name.log" >&2
      return 1
    fi
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  say "$name does not listen on 127.0.0.1:$port after $secs s; its log ($TMP/$name.log):"
  tail -n 20 "$TMP/$name.log" >&2
  return 1
}

# ---------------------------------------------------------------------------- configs
nginx_conf() { # FILE NAME BODY: an nginx.conf around an http{} body
  local file=$1 name=$2 body=$3
  mkdir -p "$TMP/$name"
  cat >"$file" <<EOF
worker_processes 1;
daemon off;
master_process ${NGINX_MASTER:-on};
pid $TMP/$name/nginx.pid;
error_log $TMP/$name/error.log warn;
events { worker_connections 8192; }
http {
    access_log off;
    default_type text/plain;
    keepalive_timeout 75s;
    keepalive_requests 10000000;
    client_body_temp_path $TMP/$name/body;
    proxy_temp_path $TMP/$name/proxy;
    fastcgi_temp_path $TMP/$name/fastcgi;
    uwsgi_temp_path $TMP/$name/uwsgi;
    scgi_temp_path $TMP/$name/scgi;
$body
}
EOF
}

# What start_nginx and start_levee run the proxy under (mode instructions: valgrind),
# and how long they wait for it to listen.
WRAP=()
UP_WAIT=15
start_nginx() { # NAME CPU CONF PORT
  local name=$1 cpu=$2 conf=$3 port=$4
  nginx -t -q -p "$TMP/$name" -e "$TMP/$name/error.log" -c "$conf" >"$TMP/$name.check" 2>&1 \
    || { cat "$TMP/$name.check" >&2; die "nginx rejects $conf"; }
  start "$name" "$cpu" "${WRAP[@]}" nginx -p "$TMP/$name" -e "$TMP/$name/error.log" -c "$conf"
  wait_up "$name" "$LAST_PID" "$port" "$UP_WAIT" || die "$name did not start"
}

# The nginx under test. LIMIT: none | clients | hot. limit_req_log_level info keeps
# nginx from writing an error-log line per refusal (levee logs none either).
proxy_nginx_conf() { # FILE PORT LIMIT
  local file=$1 port=$2 limit=$3 zone="" lim="" servers="server 127.0.0.1:$BACKEND_PORT;"
  case "$limit" in
    failing)
      # both endpoints, default max_fails=1 fail_timeout=10s: a 503 that is retried on
      # the other server also marks the failing one down for 10 s
      servers="server 127.0.0.1:$BACKEND_PORT; server 127.0.0.1:$FAIL_PORT;"
      lim="proxy_next_upstream error timeout http_503; proxy_next_upstream_tries 2;" ;;
    storm)
      zone="limit_req_zone \$http_x_device_id zone=dev:64m rate=100r/s;"
      lim="limit_req zone=dev burst=100 nodelay; limit_req_status 429; limit_req_log_level info;" ;;
    clients)
      zone="limit_req_zone \$http_x_device_id zone=dev:64m rate=1000r/s;"
      lim="limit_req zone=dev burst=1000 nodelay; limit_req_status 429; limit_req_log_level info;" ;;
    hot)
      zone="limit_req_zone \$http_x_device_id zone=dev:64m rate=100r/s;"
      lim="limit_req zone=dev burst=100 nodelay; limit_req_status 429; limit_req_log_level info;" ;;
  esac
  nginx_conf "$file" nginx "
    upstream backend {
        $servers
        keepalive 64;
        keepalive_requests 10000000;
    }
    map \$http_x_request_id \$reqid { \"\" \$request_id; default \$http_x_request_id; }
    $zone
    server {
        listen 127.0.0.1:$port;
        location / {
            $lim
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection \"\";
            proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto \$scheme;
            proxy_set_header X-Request-Id \$reqid;
            add_header X-Request-Id \$reqid always;
        }
    }"
}

# The levee under test. LIMIT: none | clients | hot; STORE: memory | redis
levee_conf() { # FILE PORT ADMIN_PORT LIMIT STORE
  local file=$1 port=$2 admin=$3 limit=$4 store=$5
  {
    printf '[server]\nlisten = "127.0.0.1:%s"\nshutdown_grace = "1s"\n\n' "$port"
    printf '[admin]\nlisten = "127.0.0.1:%s"\n\n' "$admin"
    if [ "$store" = redis ]; then
      # deny: a store failure shows up as 503s instead of a silent fall-back to memory
      printf '[store]\nkind = "redis"\nurl = "redis://127.0.0.1:%s"\non_failure = "deny"\n\n' "$REDIS_PORT"
    elif [ "$store" = cluster ]; then
      # a Redis Cluster: every node's url; local: per-node buckets while it is unreachable
      printf '[store]\nkind = "redis"\nurls = [%s]\non_failure = "local"\n\n' \
        "$(printf '"redis://127.0.0.1:%s", ' "${CLUSTER_PORTS[@]}" | sed 's/, $//')"
    fi
    if [ "$limit" = failing ]; then
      printf '[upstreams.backend]\nendpoints = ["127.0.0.1:%s", "127.0.0.1:%s"]\nmax_concurrency = 100000\n\n' \
        "$BACKEND_PORT" "$FAIL_PORT"
      printf '[upstreams.backend.outlier]\nconsecutive_failures = 5\n\n'
      printf '[upstreams.backend.retry]\nattempts = 2\nbudget = 0.2\non = ["connect", "502", "503", "504"]\n\n'
    else
      printf '[upstreams.backend]\nendpoints = ["127.0.0.1:%s"]\nmax_concurrency = 100000\n\n' "$BACKEND_PORT"
    fi
    printf '[[routes]]\nname = "bench"\npath_prefix = "/"\nupstream = "backend"\nclient_key = "header:x-device-id"\n'
    case "$limit" in
      clients) printf '\n[[routes.limits]]\nrate = "1000/s"\nburst = 1000\n' ;;
      hot|storm) printf '\n[[routes.limits]]\nrate = "100/s"\nburst = 100\n' ;;
    esac
    if [ "$limit" != failing ]; then
      # as shipped in config/levee.toml
      printf '\n[routes.storm]\nenabled = true\ninterval = "1s"\ngrowth_factor = 2.0\ngrowth_intervals = 3\n'
      printf 'min_rate = "5/s"\nduplicate_window = "2s"\nmax_duplicates = 3\nquarantine = "60s"\n'
    else
      printf '\n[routes.storm]\nenabled = false\n'
    fi
  } >"$file"
}

# The levee of mode siege: the shipped server bounds, written out, with room for 2,000
# connections and 200 in flight; one memory budget of 100,000 clients; six limited routes
# (10/s burst 20 and 5000/h per device, as shipped), storm and auth guard on; an
# unlimited default route that a path spelling would fall to if it escaped its route.
SIEGE_MAX_CONNECTIONS=2000
SIEGE_MAX_CLIENTS=100000
siege_conf() { # FILE PORT ADMIN_PORT
  local file=$1 port=$2 admin=$3 r
  {
    printf '[server]\nlisten = "127.0.0.1:%s"\nmax_connections = %s\n' "$port" "$SIEGE_MAX_CONNECTIONS"
    printf 'header_read_timeout = "10s"\nidle_timeout = "60s"\nbody_read_timeout = "15s"\nshutdown_grace = "1s"\n\n'
    printf '[admin]\nlisten = "127.0.0.1:%s"\n\n' "$admin"
    printf '[store]\nkind = "memory"\nmax_clients = %s\n\n' "$SIEGE_MAX_CLIENTS"
    printf '[upstreams.backend]\nendpoints = ["127.0.0.1:%s"]\nmax_concurrency = 200\n\n' "$SIEGE_BACKEND_PORT"
    for r in device account orders feed search media; do
      printf '[[routes]]\nname = "%s"\npath_prefix = "/v1/%s"\nupstream = "backend"\n' "$r" "$r"
      printf 'client_key = "header:x-device-id"\n\n'
      printf '[[routes.limits]]\nrate = "10/s"\nburst = 20\n[[routes.limits]]\nrate = "5000/h"\n\n'
      printf '[routes.storm]\nenabled = true\ninterval = "1s"\ngrowth_factor = 2.0\ngrowth_intervals = 3\n'
      printf 'min_rate = "5/s"\nduplicate_window = "2s"\nmax_duplicates = 3\nquarantine = "60s"\n\n'
      printf '[routes.auth_guard]\nenabled = true\nwindow = "10s"\nmin_responses = 50\nmax_401_ratio = 0.3\n'
      printf 'recently_authorized = "10m"\n\n'
    done
    printf '[[routes]]\nname = "default"\npath_prefix = "/"\nupstream = "backend"\nclient_key = "ip"\n'
  } >"$file"
}

# SIEGE_CAPTURE=1: once siege.py says a phase began (its stderr, $TMP/siege.err), wait
# AFTER seconds and record SECS seconds of levee's and the backend's data packets.
siege_capture() { # PHASE_PREFIX AFTER SECS FILE LEVEE_PORT
  local i
  for i in $(seq 1 900); do grep -q "^\[siege\] $1" "$TMP/siege.err" 2>/dev/null && break; sleep 1; done
  sleep "$2"
  timeout "$3" taskset -c "$LOAD_CPU" tcpdump -i lo -n -s 200 -B 65536 -w "$4" \
    "tcp and (port $5 or port $SIEGE_BACKEND_PORT) and ((ip[2:2] - ((ip[0]&0xf)<<2) - ((tcp[12]&0xf0)>>2)) != 0)" \
    >"$4.log" 2>&1 || true  # timeout ends it: 124
}

# ---------------------------------------------------------------------------- wrk
cat >"$TMP/clients.lua" <<EOF
-- $CLIENTS client ids, a different one on each request, cycling.
local n, i, reqs = $CLIENTS, 0, {}
function init(args)
  for k = 1, n do
    reqs[k] = wrk.format(nil, nil, { ["x-device-id"] = string.format("dev-%05d", k) })
  end
end
function request()
  i = i % n + 1
  return reqs[i]
end
EOF

cat >"$TMP/hot.lua" <<EOF
-- One client id on every request, each for a different path (a device polling
-- $CLIENTS resources, not retrying one: the storm detector stays on); counts the statuses.
local n, i, reqs = $CLIENTS, 0, {}
local threads = {}
function request()
  i = i % n + 1
  return reqs[i]
end
function setup(thread) table.insert(threads, thread) end
function init(args)
  s2xx, s429, sother = 0, 0, 0
  for k = 1, n do
    reqs[k] = wrk.format(nil, string.format("/item/%05d", k), { ["x-device-id"] = "hot-device" })
  end
end
function response(status, headers, body)
  if status == 429 then s429 = s429 + 1
  elseif status >= 200 and status < 300 then s2xx = s2xx + 1
  else sother = sother + 1 end
end
function done(summary, latency, requests)
  local a, b, c = 0, 0, 0
  for _, t in ipairs(threads) do
    a = a + t:get("s2xx"); b = b + t:get("s429"); c = c + t:get("sother")
  end
  io.write(string.format("STATUS 2xx=%d 429=%d other=%d\n", a, b, c))
end
EOF

secs() { # "10s" | "2m" | "10" -> seconds
  case "$1" in
    *ms) echo 1 ;; *s) echo "${1%s}" ;; *m) echo $(( ${1%m} * 60 )) ;; *h) echo $(( ${1%h} * 3600 )) ;; *) echo "$1" ;;
  esac
}
DUR_S=$(secs "$DURATION")

to_ms() { # "523.00us" | "1.20ms" | "2.01s" | "1.00m" -> ms
  awk -v v="$1" 'BEGIN {
    n = v + 0; u = v; sub(/^[0-9.]+/, "", u)
    f = (u == "us") ? 0.001 : (u == "ms") ? 1 : (u == "s") ? 1000 : (u == "m") ? 60000 : (u == "h") ? 3600000 : -1
    if (f < 0 || v == "") print "?"; else printf "%.3f", n * f }'
}

cpu_busy() { # CPU -> busy and total jiffies of that core so far
  awk -v c="cpu$1" '$1 == c { t = 0; for (i = 2; i <= NF; i++) t += $i; print t - $5 - $6, t }' /proc/stat
}

# Waits (IDLE_WAIT s at most) until both cores are idle: all our daemons are idle between
# runs, so anything busy is someone else (a build, say) and would share the cores.
wait_idle() {
  local b0 t0 b1 t1 b0b t0b b1b t1b u0 u1 waited=0
  while :; do
    read -r b0 t0 < <(cpu_busy "$LOAD_CPU"); read -r b1 t1 < <(cpu_busy "$PROXY_CPU")
    sleep 1
    read -r b0b t0b < <(cpu_busy "$LOAD_CPU"); read -r b1b t1b < <(cpu_busy "$PROXY_CPU")
    u0=$(( 100 * (b0b - b0) / (t0b - t0 + 1) )); u1=$(( 100 * (b1b - b1) / (t1b - t1 + 1) ))
    [ "$u0" -le 15 ] && [ "$u1" -le 15 ] && return 0
    if [ "$waited" -ge "$IDLE_WAIT" ]; then
      say "  warning: still busy after ${IDLE_WAIT}s (core $LOAD_CPU ${u0}%, core $PROXY_CPU ${u1}%): measuring anyway"
      NOTES+="warning: the machine was busy before this run (core $LOAD_CPU ${u0}%, core $PROXY_CPU ${u1}%)."$'\n'
      return 0
    fi
    [ $(( waited % 20 )) -eq 0 ] && say "  waiting for idle cores (core $LOAD_CPU ${u0}%, core $PROXY_CPU ${u1}% busy: another build?)"
    sleep 1; waited=$(( waited + 2 ))
  done
}

tree_ticks() { # PID -> "utime stime" of it and its descendants (clock ticks)
  local u=0 s=0 p x y
  for p in $(tree_pids "$1"); do
    read -r x y < <(sed 's/.*) //' "/proc/$p/stat" 2>/dev/null | awk '{print $12, $13}') || continue
    u=$((u + ${x:-0})); s=$((s + ${y:-0}))
  done
  echo "$u $s"
}

redis_cmds() { # "commands scripts" Redis has run so far; commands include those a script runs
  { redis-cli -p "$REDIS_PORT" info stats; redis-cli -p "$REDIS_PORT" info commandstats; } 2>/dev/null \
    | awk -F'[:=,]' '/^total_commands_processed/ { c = $2 + 0 }
        /^cmdstat_(evalsha|evalsha_ro|eval|eval_ro|fcall|fcall_ro):/ { s += $3 }
        END { print c + 0, s + 0 }'
}

backend_counts() { # "requests failing" the backend nginx has served so far (all endpoints; the 503 one)
  local n f
  n=$(python3 -c 'import sys, urllib.request as u
print(u.urlopen("http://127.0.0.1:%s/" % sys.argv[1], timeout=5).read().decode().split("\n")[2].split()[2])' "$STATUS_PORT" 2>/dev/null)
  f=$(wc -l <"$TMP/backend/fail.log" 2>/dev/null)
  echo "${n:-0} ${f:-0}"
}

# One measured run: warm-up, then DURATION with CPU accounting. Sets R_* variables.
measure() { # LABEL PORT PROXY_PID SCRIPT|""
  local label=$1 port=$2 pid=$3 script=$4 out="$TMP/wrk-$1.txt" args=()
  if [ "$script" = storm ]; then storm_measure "$@"; return; fi
  [ -n "$script" ] && args=(-s "$script")
  wait_idle
  say "  $label: warm-up $WARMUP"
  timeout $(( $(secs "$WARMUP") + 30 )) taskset -c "$LOAD_CPU" \
    wrk -t"$THREADS" -c"$CONNECTIONS" -d"$WARMUP" "${args[@]}" "http://127.0.0.1:$port/" >/dev/null 2>&1 \
    || die "wrk warm-up against $label failed"
  say "  $label: measuring $DURATION (wrk -t$THREADS -c$CONNECTIONS --latency${script:+ -s $(basename "$script")})"
  local t0 t1 c0a c1a r0=0 r1=0 s0=0 s1=0
  [ "${R_REDIS:-0}" = 1 ] && read -r r0 s0 < <(redis_cmds)
  local q0=0 q1=0 f0=0 f1=0
  [ "${R_BACKEND:-0}" = 1 ] && { sleep 0.5; read -r q0 f0 < <(backend_counts); }
  read -r c0a t0 < <(cpu_busy "$LOAD_CPU")
  read -r c1a t1 < <(cpu_busy "$PROXY_CPU")
  local ua sa ub sb
  read -r ua sa < <(tree_ticks "$pid")
  local w0=$EPOCHREALTIME w1
  timeout $(( DUR_S + 30 )) taskset -c "$LOAD_CPU" \
    wrk -t"$THREADS" -c"$CONNECTIONS" -d"$DURATION" --latency "${args[@]}" "http://127.0.0.1:$port/" >"$out" 2>&1 \
    || { cat "$out" >&2; die "wrk against $label failed"; }
  read -r ub sb < <(tree_ticks "$pid")
  w1=$EPOCHREALTIME
  local wall; wall=$(awk -v a="$w0" -v b="$w1" 'BEGIN{printf "%.3f", b - a}')
  local c0b t0b c1b t1b
  read -r c0b t0b < <(cpu_busy "$LOAD_CPU")
  read -r c1b t1b < <(cpu_busy "$PROXY_CPU")
  [ "${R_REDIS:-0}" = 1 ] && read -r r1 s1 < <(redis_cmds)
  [ "${R_BACKEND:-0}" = 1 ] && { sleep 0.5; read -r q1 f1 < <(backend_counts); }
  # requests at the backends per second of the run (minus the stub_status request itself)
  R_UP_RPS=$(awk -v d="$((q1 - q0 - 1))" -v s="$wall" 'BEGIN{printf "%.0f", d / s}')
  R_UP_FAIL=$(awk -v d="$((f1 - f0))" -v s="$wall" 'BEGIN{printf "%.0f", d / s}')
  R_FAIL_ALL=$f1   # B's requests since the backend started: includes the warm-up

  R_RPS=$(awk '/^Requests\/sec:/{printf "%.0f", $2}' "$out")
  R_P50=$(to_ms "$(awk '$1 == "50%" {print $2}' "$out")")
  R_P99=$(to_ms "$(awk '$1 == "99%" {print $2}' "$out")")
  R_TOTAL=$(awk '/requests in/{print $1; exit}' "$out")
  R_NON2XX=$(awk '/Non-2xx or 3xx responses:/{print $NF}' "$out"); R_NON2XX=${R_NON2XX:-0}
  R_SOCKERR=$(awk -F'Socket errors: ' '/Socket errors/{print $2}' "$out")
  R_STATUS=$(awk '/^STATUS /{print $2, $3, $4}' "$out")
  [ -n "$R_RPS" ] || { cat "$out" >&2; die "cannot read wrk's output for $label"; }
  R_CPU=$(pct_cpu "$((ub - ua + sb - sa))" "$wall")
  R_USR=$(pct_cpu "$((ub - ua))" "$wall")
  R_SYS=$(pct_cpu "$((sb - sa))" "$wall")
  R_EFF=$(awk -v r="$R_RPS" -v c="$R_CPU" 'BEGIN{ if (c > 0) printf "%.0f", r / (c / 100); else print "?" }')
  R_CORE0=$(pct_busy "$((c0b - c0a))" "$((t0b - t0))")
  R_CORE1=$(pct_busy "$((c1b - c1a))" "$((t1b - t1))")
  R_REDIS_PER_REQ=$(awk -v d="$((r1 - r0))" -v n="${R_TOTAL:-0}" 'BEGIN{ if (n > 0) printf "%.2f", d / n; else print "0" }')
  R_SCRIPTS_PER_REQ=$(awk -v d="$((s1 - s0))" -v n="${R_TOTAL:-0}" 'BEGIN{ if (n > 0) printf "%.2f", d / n; else print "0" }')
  if [ "$R_CORE1" != "?" ] && [ $(( R_CORE1 - R_CPU )) -gt 10 ]; then
    NOTES+="warning: during the $label run core $PROXY_CPU was ${R_CORE1}% busy but the proxy used ${R_CPU}%: something else ran there."$'\n'
    say "  warning: core $PROXY_CPU was ${R_CORE1}% busy but the proxy used ${R_CPU}%: something else ran there"
  fi
  [ -n "$R_SOCKERR" ] && say "  $label: socket errors: $R_SOCKERR"
  say "  $label: ${R_RPS} req/s, p50 ${R_P50} ms, p99 ${R_P99} ms, proxy CPU ${R_CPU}% (user ${R_USR}, system ${R_SYS}), core $LOAD_CPU ${R_CORE0}%, non-2xx ${R_NON2XX}${R_STATUS:+, $R_STATUS}"
}

# Mode storm: storm.py (1,000 steady clients at 1/s, one bomb doubling 2/s -> 512/s,
# STORM_SECONDS) on core LOAD_CPU instead of wrk. Sets S_* (and R_CPU).
storm_measure() { # LABEL PORT PROXY_PID storm
  local label=$1 port=$2 pid=$3 out="$TMP/storm-$1.json" ua sa ub sb w0 w1 wall
  wait_idle
  say "  $label: storm.py for ${STORM_SECONDS}s (1000 steady clients at 1/s, a bomb doubling 2/s -> 512/s)"
  read -r ua sa < <(tree_ticks "$pid")
  w0=$EPOCHREALTIME
  timeout $(( STORM_SECONDS + 60 )) taskset -c "$LOAD_CPU" \
    python3 "$HERE/storm.py" "$port" --duration "$STORM_SECONDS" >"$out" 2>"$TMP/storm-$label.err" \
    || { cat "$TMP/storm-$label.err" >&2; die "storm.py against $label failed"; }
  w1=$EPOCHREALTIME
  read -r ub sb < <(tree_ticks "$pid")
  wall=$(awk -v a="$w0" -v b="$w1" 'BEGIN{printf "%.3f", b - a}')
  R_CPU=$(pct_cpu "$((ub - ua + sb - sa))" "$wall")
  eval "$(python3 - "$out" <<'PY'
import json, shlex, sys
d = json.load(open(sys.argv[1]))
f = lambda v: "-" if v is None else str(v)
codes = " ".join(f"{k}:{v}" for k, v in sorted(d["steady_codes"].items()))
first = "never" if d["bomb_first_refusal_s"] is None else f'{d["bomb_first_refusal_s"]} s'
why = f(d["bomb_refusal_status"]) + (f' {d["bomb_refusal_reason"]}' if d["bomb_refusal_reason"] else "")
for k, v in [("S_FIRST", first), ("S_RATE", f(d["bomb_rate_at_refusal"])), ("S_WHY", why),
             ("S_BOK", f(d["bomb_ok"])), ("S_BSENT", f(d["bomb_sent"])), ("S_BERR", f(d["bomb_errors"])),
             ("S_SOK", f(d["steady_success_pct"])), ("S_SSENT", f(d["steady_sent"])),
             ("S_P50", f(d["steady_p50_ms"])), ("S_P99", f(d["steady_p99_ms"])), ("S_CODES", codes)]:
    print(f"{k}={shlex.quote(v)}")
PY
)"
  say "  $label: bomb first refused after $S_FIRST (at $S_RATE/s, $S_WHY), bomb accepted $S_BOK of $S_BSENT; steady: $S_SOK% ok of $S_SSENT ($S_CODES), p50 $S_P50 ms, p99 $S_P99 ms; proxy CPU $R_CPU%"
}
srow() { echo "| $1 | $S_FIRST | $S_RATE | $S_WHY | $S_BOK / $S_BSENT | $S_SOK% of $S_SSENT | $S_P50 | $S_P99 | $R_CPU |"; }

# PERF=1: one more run of PERF_DURATION, after the measured one (so that perf does not
# touch the measured numbers): system calls per request for every proxy (perf stat on
# tracepoints) and, for levee, where its CPU goes (perf record).
profile() { # LABEL PORT PROXY_PID SCRIPT|""
  local label=$1 port=$2 pid=$3 script=$4 args=() pids ev rec="" n
  [ "$PERF" = 1 ] || return 0
  [ "$script" = storm ] && return 0
  [ -n "$script" ] && args=(-s "$script")
  pids=$(tree_pids "$pid" | paste -sd,)
  ev=raw_syscalls:sys_enter,syscalls:sys_enter_writev,syscalls:sys_enter_write,syscalls:sys_enter_sendto,syscalls:sys_enter_sendmsg
  ev+=,syscalls:sys_enter_recvfrom,syscalls:sys_enter_read,syscalls:sys_enter_readv,syscalls:sys_enter_epoll_wait,syscalls:sys_enter_epoll_ctl
  ev+=,syscalls:sys_enter_futex,context-switches,cpu-migrations
  say "  $label: profiling for ${PERF_DURATION}s under perf (not part of the table)"
  taskset -c "$LOAD_CPU" perf stat -x, -e "$ev" -p "$pids" -o "$TMP/perfstat-$label.txt" -- sleep "$PERF_DURATION" \
    >/dev/null 2>&1 &
  local stat_pid=$!; PIDS+=("$stat_pid")
  if [ "${label#levee}" != "$label" ] || [ -n "$FLAME" ]; then
    # DWARF unwinding: neither levee's release build nor Debian's nginx keeps frame pointers.
    taskset -c "$LOAD_CPU" perf record --call-graph dwarf,16384 -F 499 -p "$pids" -o "$TMP/perf-$label.data" \
      -- sleep "$PERF_DURATION" >"$TMP/perf-$label.log" 2>&1 &
    rec=$!; PIDS+=("$rec")
  fi
  timeout $(( PERF_DURATION + 30 )) taskset -c "$LOAD_CPU" \
    wrk -t"$THREADS" -c"$CONNECTIONS" -d"$PERF_DURATION"s "${args[@]}" "http://127.0.0.1:$port/" >"$TMP/wrk-perf-$label.txt" 2>&1 || true
  wait "$stat_pid" 2>/dev/null || true
  n=$(awk '/requests in/{print $1; exit}' "$TMP/wrk-perf-$label.txt")
  say "  $label: system calls per request (over ${n:-?} requests):"
  awk -F, -v n="${n:-0}" -v l="$label" '($3 ~ /sys_enter/ || $3 ~ /context-switches|cpu-migrations/) && n > 0 && $1 + 0 > 0 {
      e = $3; sub(/^(raw_)?syscalls:sys_enter_?/, "", e); if (e == "") e = "all syscalls"
      printf "      %-16s %6.3f\n", e, $1 / n }' "$TMP/perfstat-$label.txt" | tee "$TMP/syscalls-$label.txt" >&2
  if [ -n "$FLAME" ]; then
    { printf '| %s | %s | %s |' "$CUR_MODE" "$label" "${n:-?}"
      for e in "all syscalls" writev write recvfrom read readv epoll_wait epoll_ctl futex context-switches cpu-migrations; do
        printf ' %s |' "$(awk -v e="$e" '{ k = $0; sub(/ +[0-9.]+$/, "", k); sub(/^ +/, "", k) } k == e { print $NF }' "$TMP/syscalls-$label.txt")"
      done
      echo
    } >>"$FLAME/syscalls.rows"
  fi
  if [ -n "$rec" ]; then
    wait "$rec" 2>/dev/null || true
    if [ -n "$FLAME" ]; then
      perf script -i "$TMP/perf-$label.data" 2>/dev/null | inferno-collapse-perf >"$TMP/$CUR_MODE-$label.folded" 2>/dev/null \
        && inferno-flamegraph --title "$label, mode $CUR_MODE ($REV)" <"$TMP/$CUR_MODE-$label.folded" \
          >"$FLAME/$CUR_MODE-$label.svg" 2>/dev/null \
        && say "  $label: flame graph $FLAME/$CUR_MODE-$label.svg"
    fi
    say "  $label: perf: self time by object, then the top symbols ($TMP/perf-$label.data)"
    { perf report -i "$TMP/perf-$label.data" --no-children --sort dso --stdio -g none 2>/dev/null \
        | grep -v '^#' | grep -v '^$' | head -6
      perf report -i "$TMP/perf-$label.data" --no-children --sort dso,sym --percent-limit 0.7 --stdio -g none 2>/dev/null \
        | grep -v '^#' | grep -v '^$' | head -30
    } | tee "$TMP/perf-$label.txt" >&2
  fi
}

# A short probe: one client id as fast as wrk can. Prints yes when some requests got a
# non-2xx answer (the limit is enforced), no otherwise.
probe_limit() { # PORT
  local out="$TMP/probe.txt" n
  timeout 30 taskset -c "$LOAD_CPU" wrk -t1 -c16 -d2s -H "x-device-id: probe-device" \
    "http://127.0.0.1:$1/" >"$out" 2>&1 || { echo "?"; return; }
  n=$(awk '/Non-2xx or 3xx responses:/{print $NF}' "$out")
  [ "${n:-0}" -gt 0 ] && echo yes || echo no
}

# ---------------------------------------------------------------------------- report
REPORT="$TMP/report.md"
: >"$REPORT"
out() { printf '%s\n' "$*" | tee -a "$REPORT"; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN{ if (b + 0 > 0 && a != "?") printf "%.2f", a / b; else print "-" }'; }

# Rows are "label|rps|p50|p99|cpu|eff|core0|non2xx|extra"
table() { # TITLE EXTRA_HEADER RATIO_LABEL ROW_A ROW_B  (ratio = B / A)
  local title=$1 extra=$2 rlabel=$3 a=$4 b=$5
  local la ra pa5 pa9 ca ea ka na xa lb rb pb5 pb9 cb eb kb nb xb
  IFS='|' read -r la ra pa5 pa9 ca ea ka na xa <<<"$a"
  IFS='|' read -r lb rb pb5 pb9 cb eb kb nb xb <<<"$b"
  out ""
  out "### $title"
  out ""
  out "| proxy | req/s | p50 ms | p99 ms | proxy CPU % (user+sys) | req/CPU-s | core $LOAD_CPU busy % | non-2xx |${extra:+ $extra |}"
  local xsep=""; [ -n "$extra" ] && xsep=$(awk -v e="$extra" 'BEGIN{ n = gsub(/\|/, "", e); for (i = 0; i <= n; i++) printf "---:|" }')
  out "|---|---:|---:|---:|---:|---:|---:|---:|$xsep"
  out "| $la | $ra | $pa5 | $pa9 | $ca | $ea | $ka | $na |${extra:+ $xa |}"
  out "| $lb | $rb | $pb5 | $pb9 | $cb | $eb | $kb | $nb |${extra:+ $xb |}"
  out "| **$rlabel** | **$(ratio "$rb" "$ra")** | $(ratio "$pb5" "$pa5") | $(ratio "$pb9" "$pa9") | | $(ratio "$eb" "$ea") | | |${extra:+ |}"
  if [ -n "$NOTES" ]; then out ""; printf '%s' "$NOTES" | tee -a "$REPORT"; NOTES=""; fi
}
row() { echo "$1|$R_RPS|$R_P50|$R_P99|$R_CPU ($R_USR+$R_SYS)|$R_EFF|$R_CORE0|$R_NON2XX|$2"; }
skipped() { out ""; out "### $1"; out ""; out "skipped: $2"; say "$1: skipped: $2"; NOTES=""; }
NOTES=""

# ---------------------------------------------------------------------------- levee
if [ -n "${LEVEE_BIN:-}" ]; then
  LEVEE=$LEVEE_BIN
  [ -x "$LEVEE" ] || die "LEVEE_BIN=$LEVEE is not an executable"
  say "using $LEVEE (LEVEE_BIN, no build)"
else
  command -v cargo >/dev/null 2>&1 || die "cargo not found (install Rust, or set LEVEE_BIN)"
  say "building levee: cargo build --release --bin levee (may take minutes; waits if another build holds the lock)"
  (cd "$ROOT" && cargo build --release --bin levee) >"$TMP/build.log" 2>&1 \
    || { tail -n 30 "$TMP/build.log" >&2
         die "cargo build --release failed (to measure an existing binary: LEVEE_BIN=target/release/levee)"; }
  LEVEE="$ROOT/target/release/levee"
fi
LEVEE_VERSION=$("$LEVEE" --version 2>/dev/null || echo "levee ?")

# Checks a levee config; on rejection sets CHECK_ERR and returns 1.
levee_check() { # FILE
  if "$LEVEE" check --config "$1" >"$TMP/check.log" 2>&1; then return 0; fi
  CHECK_ERR=$(grep -m1 -i 'error' "$TMP/check.log" || head -n1 "$TMP/check.log")
  return 1
}

start_levee() { # CONF PORT -> LAST_PID, or returns 1
  start levee "$PROXY_CPU" env LEVEE_WORKERS=1 LEVEE_LOG=warn "${WRAP[@]}" "$LEVEE" run --config "$1"
  wait_up levee "$LAST_PID" "$2" "$UP_WAIT"
}

# ---------------------------------------------------------------------------- backend
free_port; BACKEND_PORT=$PORT
free_port; FAIL_PORT=$PORT       # mode failing: a second endpoint that always answers 503
free_port; STATUS_PORT=$PORT     # stub_status: requests served by the backend nginx
free_port; SIEGE_BACKEND_PORT=$PORT  # mode siege: logs what the flood and rapid reset got through
nginx_conf "$TMP/backend.conf" backend "
    server {
        listen 127.0.0.1:$BACKEND_PORT;
        location / { return 200 \"ok\n\"; }
    }
    server {
        listen 127.0.0.1:$FAIL_PORT;
        access_log $TMP/backend/fail.log combined buffer=64k flush=200ms;
        location / { return 503 \"down\n\"; }
    }
    server {
        listen 127.0.0.1:$STATUS_PORT;
        location / { stub_status; }
    }
    map \$http_x_device_id \$siege_log { flood-dev 1; ~^rr- 1; default 0; }
    log_format siege '\$http_x_device_id \$request_uri';
    server {
        listen 127.0.0.1:$SIEGE_BACKEND_PORT;
        access_log $TMP/backend/siege.log siege if=\$siege_log;
        location / { return 200 \"ok\n\"; }
    }"
say "starting the backend (nginx, return 200) on 127.0.0.1:$BACKEND_PORT, core $LOAD_CPU"
start_nginx backend "$LOAD_CPU" "$TMP/backend.conf" "$BACKEND_PORT"
[ "$(http_status "$BACKEND_PORT")" = 200 ] || die "the backend does not answer 200"

REDIS_PORT=""
start_redis() {
  free_port; REDIS_PORT=$PORT
  say "starting redis-server on 127.0.0.1:$REDIS_PORT, core $LOAD_CPU (no persistence)"
  start redis "$LOAD_CPU" redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no
  wait_up redis "$LAST_PID" "$REDIS_PORT"
}

# ---------------------------------------------------------------------------- mode cluster
# A throwaway Redis Cluster: 3 masters + 3 replicas on LOAD_CPU, as tests/it/support/
# redis_cluster.rs starts it. A node's cluster bus listens 10,000 above its port, so
# both must be free: ports are drawn below the ephemeral range minus 10,000, where no
# port-0 bind (free_port, outgoing connections) can land on either.
CLUSTER_PORTS=()
CLUSTER_PIDS=()
CLUSTER_MASTERS=()
cluster_port() { # -> PORT: a port whose bus port (+10,000) is free too, not near a taken one
  PORT=$(python3 - "${CLUSTER_PORTS[@]}" <<'PY'
import random, socket, sys
taken = [int(p) for p in sys.argv[1:]]
lo = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
top = min(max(lo - 10000, 12000), 45535)
def free(p):
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", p)); return True
    except OSError:
        return False
    finally:
        s.close()
for _ in range(1000):
    p = random.randrange(10000, top)
    if all(abs(p - t) >= 2 for t in taken) and free(p) and free(p + 10000):
        print(p); break
PY
) || true
  [ -n "$PORT" ]
}

start_cluster() { # -> CLUSTER_PORTS, CLUSTER_PIDS, CLUSTER_MASTERS, or returns 1 (CLUSTER_ERR)
  local dir="$TMP/cluster" i try p ok n
  mkdir -p "$dir"
  for i in 1 2 3 4 5 6; do
    ok=0
    for try in 1 2 3 4 5; do
      cluster_port || { CLUSTER_ERR="no free port pair below the ephemeral range"; return 1; }
      p=$PORT
      start "redis-$p" "$LOAD_CPU" redis-server --port "$p" --bind 127.0.0.1 --cluster-enabled yes \
        --cluster-config-file "$dir/nodes-$p.conf" --cluster-node-timeout 2000 \
        --appendonly no --save "" --dir "$dir"
      if wait_up "redis-$p" "$LAST_PID" "$p"; then ok=1; break; fi
      forget "$LAST_PID"
    done
    [ "$ok" = 1 ] || { CLUSTER_ERR="redis-server --cluster-enabled yes did not start"; return 1; }
    CLUSTER_PORTS+=("$p"); CLUSTER_PIDS+=("$LAST_PID")
  done
  say "  cluster nodes on 127.0.0.1:${CLUSTER_PORTS[*]} (core $LOAD_CPU); redis-cli --cluster create"
  local addrs=()
  for p in "${CLUSTER_PORTS[@]}"; do addrs+=("127.0.0.1:$p"); done
  timeout 60 redis-cli --cluster create "${addrs[@]}" --cluster-replicas 1 --cluster-yes \
    >"$TMP/cluster-create.log" 2>&1 || { tail -n 5 "$TMP/cluster-create.log" >&2; CLUSTER_ERR="redis-cli --cluster create failed"; return 1; }
  # every node says cluster_state:ok, three masters, each replica's link up (30 s at most)
  for _ in $(seq 300); do
    n=0; CLUSTER_MASTERS=()
    for p in "${CLUSTER_PORTS[@]}"; do
      timeout 2 redis-cli -p "$p" cluster info 2>/dev/null | grep -q '^cluster_state:ok' && n=$((n + 1))
      case "$(timeout 2 redis-cli -p "$p" role 2>/dev/null | head -n1)" in master) CLUSTER_MASTERS+=("$p") ;; esac
    done
    local synced=0
    for p in "${CLUSTER_PORTS[@]}"; do
      timeout 2 redis-cli -p "$p" info replication 2>/dev/null | grep -q '^master_link_status:up' && synced=$((synced + 1))
    done
    [ "$n" = 6 ] && [ ${#CLUSTER_MASTERS[@]} = 3 ] && [ "$synced" = 3 ] && return 0
    sleep 0.1
  done
  CLUSTER_ERR="the cluster is not healthy after 30 s (cluster_state:ok on $n of 6, ${#CLUSTER_MASTERS[@]} masters)"
  return 1
}

cluster_cmds() { # "commands scripts" the masters have run so far (scripts: EVALSHA/EVAL/FCALL calls)
  local p
  for p in "${CLUSTER_MASTERS[@]}"; do
    timeout 2 redis-cli -p "$p" info stats 2>/dev/null; timeout 2 redis-cli -p "$p" info commandstats 2>/dev/null
  done | awk -F'[:=,]' '/^total_commands_processed/ { c += $2 }
      /^cmdstat_(evalsha|evalsha_ro|eval|eval_ro|fcall|fcall_ro):/ { s += $3 }
      END { print c + 0, s + 0 }'
}

CL_PORTS=()
CL_PIDS=()
start_replicas() { # LIMIT STORE -> CL_PORTS, CL_PIDS (three levees on PROXY_CPU), or returns 1 (SKIP_REASON)
  local limit=$1 store=$2 i port admin pid st tries
  CL_PORTS=(); CL_PIDS=()
  for i in 1 2 3; do
    free_port; port=$PORT; free_port; admin=$PORT
    levee_conf "$TMP/levee-$store-$limit-$i.toml" "$port" "$admin" "$limit" "$store"
    if ! levee_check "$TMP/levee-$store-$limit-$i.toml"; then SKIP_REASON="levee check rejects the config: $CHECK_ERR"; return 1; fi
    start "levee-$store-$i" "$PROXY_CPU" env LEVEE_WORKERS=1 LEVEE_LOG=warn "$LEVEE" run --config "$TMP/levee-$store-$limit-$i.toml"
    pid=$LAST_PID
    wait_up "levee-$store-$i" "$pid" "$port" || { SKIP_REASON="levee did not start: $(tail -n1 "$TMP/levee-$store-$i.log")"; return 1; }
    CL_PORTS+=("$port"); CL_PIDS+=("$pid")
  done
  say "  levee x3 (limit: $limit, store: $store) on 127.0.0.1:${CL_PORTS[*]}, core $PROXY_CPU"
  for port in "${CL_PORTS[@]}"; do
    tries=0
    while [ $tries -lt 50 ]; do
      st=$(http_status "$port" "x-device-id: check")
      [ "$st" = 200 ] && break
      tries=$((tries + 1)); sleep 0.1
    done
    [ "$st" = 200 ] || { SKIP_REASON="levee on $port answered '${st:-nothing}' instead of 200 for 5 s"; return 1; }
  done
}

stop_replicas() { local p; for p in "${CL_PIDS[@]}"; do forget "$p"; done; CL_PIDS=(); CL_PORTS=(); }

# Three wrk in parallel, one per replica, on LOAD_CPU. Sets C_* variables.
cluster_measure() { # LABEL SCRIPT
  local label=$1 script=$2 i pids=() out
  wait_idle
  say "  $label: warm-up $WARMUP (3 x wrk -c$CLUSTER_CONNECTIONS)"
  for i in 0 1 2; do
    timeout $(( $(secs "$WARMUP") + 30 )) taskset -c "$LOAD_CPU" wrk -t1 -c"$CLUSTER_CONNECTIONS" -d"$WARMUP" \
      -s "$script" "http://127.0.0.1:${CL_PORTS[$i]}/" >/dev/null 2>&1 &
    pids+=($!)
  done
  for i in "${pids[@]}"; do wait "$i" || die "wrk warm-up against $label failed"; done
  local r0 s0 r1 s1 c0a t0 c0b t0b c1a t1 c1b t1b lu=0 ls=0 lu2=0 ls2=0 ru=0 rs=0 ru2=0 rs2=0 x y p w0 w1 wall
  read -r r0 s0 < <(cluster_cmds)
  read -r c0a t0 < <(cpu_busy "$LOAD_CPU"); read -r c1a t1 < <(cpu_busy "$PROXY_CPU")
  for p in "${CL_PIDS[@]}"; do read -r x y < <(tree_ticks "$p"); lu=$((lu + x)); ls=$((ls + y)); done
  for p in "${CLUSTER_PIDS[@]}"; do read -r x y < <(tree_ticks "$p"); ru=$((ru + x)); rs=$((rs + y)); done
  say "  $label: measuring $DURATION (3 x wrk -t1 -c$CLUSTER_CONNECTIONS --latency -s $(basename "$script"))"
  w0=$EPOCHREALTIME; pids=()
  for i in 0 1 2; do
    timeout $(( DUR_S + 30 )) taskset -c "$LOAD_CPU" wrk -t1 -c"$CLUSTER_CONNECTIONS" -d"$DURATION" --latency \
      -s "$script" "http://127.0.0.1:${CL_PORTS[$i]}/" >"$TMP/wrk-$label-$i.txt" 2>&1 &
    pids+=($!)
  done
  for i in "${pids[@]}"; do wait "$i" || die "wrk against $label failed"; done
  w1=$EPOCHREALTIME
  for p in "${CL_PIDS[@]}"; do read -r x y < <(tree_ticks "$p"); lu2=$((lu2 + x)); ls2=$((ls2 + y)); done
  for p in "${CLUSTER_PIDS[@]}"; do read -r x y < <(tree_ticks "$p"); ru2=$((ru2 + x)); rs2=$((rs2 + y)); done
  read -r c0b t0b < <(cpu_busy "$LOAD_CPU"); read -r c1b t1b < <(cpu_busy "$PROXY_CPU")
  read -r r1 s1 < <(cluster_cmds)
  wall=$(awk -v a="$w0" -v b="$w1" 'BEGIN{printf "%.3f", b - a}')
  C_RPS=0; C_TOTAL=0; C_NON2XX=0; C_P50=0; C_P99=0; C_EACH=""; C_P99S=""
  local a2=0 a4=0 ao=0 v s
  for i in 0 1 2; do
    out="$TMP/wrk-$label-$i.txt"
    v=$(awk '/^Requests\/sec:/{printf "%.0f", $2}' "$out"); [ -n "$v" ] || { cat "$out" >&2; die "cannot read wrk's output for $label"; }
    C_RPS=$((C_RPS + v)); C_EACH+="${C_EACH:+ / }$v"
    C_TOTAL=$((C_TOTAL + $(awk '/requests in/{print $1; exit}' "$out")))
    v=$(awk '/Non-2xx or 3xx responses:/{print $NF}' "$out"); C_NON2XX=$((C_NON2XX + ${v:-0}))
    v=$(to_ms "$(awk '$1 == "50%" {print $2}' "$out")"); C_P50=$(awk -v a="$C_P50" -v b="$v" 'BEGIN{print (b + 0 > a + 0) ? b : a}')
    v=$(to_ms "$(awk '$1 == "99%" {print $2}' "$out")"); C_P99=$(awk -v a="$C_P99" -v b="$v" 'BEGIN{print (b + 0 > a + 0) ? b : a}')
    C_P99S+="${C_P99S:+ / }$v"
    s=$(awk '/^STATUS /{print $2, $3, $4}' "$out")
    if [ -n "$s" ]; then
      read -r x y p < <(echo "$s" | sed 's/[a-z0-9]*=//g')
      a2=$((a2 + x)); a4=$((a4 + y)); ao=$((ao + p))
    fi
    v=$(awk -F'Socket errors: ' '/Socket errors/{print $2}' "$out"); [ -n "$v" ] && say "  $label replica $i: socket errors: $v"
  done
  C_2XX=$a2; C_429=$a4; C_OTHER=$ao
  C_SHARE429=$(awk -v a="$a2" -v b="$a4" -v c="$ao" 'BEGIN{ t = a + b + c; if (t > 0) printf "%.1f%%", 100 * b / t; else print "-" }')
  C_CPU=$(pct_cpu "$((lu2 - lu + ls2 - ls))" "$wall")
  C_USR=$(pct_cpu "$((lu2 - lu))" "$wall")
  C_SYS=$(pct_cpu "$((ls2 - ls))" "$wall")
  C_RCPU=$(pct_cpu "$((ru2 - ru + rs2 - rs))" "$wall")
  C_EFF=$(awk -v r="$C_RPS" -v c="$C_CPU" 'BEGIN{ if (c > 0) printf "%.0f", r / (c / 100); else print "?" }')
  C_CORE0=$(pct_busy "$((c0b - c0a))" "$((t0b - t0))")
  C_CORE1=$(pct_busy "$((c1b - c1a))" "$((t1b - t1))")
  C_SPS=$(awk -v d="$((s1 - s0))" -v s="$wall" 'BEGIN{printf "%.0f", d / s}')
  C_SPR=$(awk -v d="$((s1 - s0))" -v n="$C_TOTAL" 'BEGIN{ if (n > 0) printf "%.3f", d / n; else print "-" }')
  C_CPR=$(awk -v d="$((r1 - r0))" -v n="$C_TOTAL" 'BEGIN{ if (n > 0) printf "%.3f", d / n; else print "-" }')
  if [ "$C_CORE1" != "?" ] && [ $(( C_CORE1 - C_CPU )) -gt 10 ]; then
    NOTES+="warning: during the $label run core $PROXY_CPU was ${C_CORE1}% busy but the levees used ${C_CPU}%: something else ran there."$'\n'
  fi
  say "  $label: $C_RPS decisions/s ($C_EACH), worst p50 $C_P50 ms, worst p99 $C_P99 ms, levee CPU ${C_CPU}%, redis CPU ${C_RCPU}%, core $LOAD_CPU ${C_CORE0}%, non-2xx $C_NON2XX, scripts $C_SPS/s ($C_SPR/request), commands $C_CPR/request${C_2XX:+, 2xx=$C_2XX 429=$C_429 other=$C_OTHER}"
}
crow() { echo "| $1 | $C_RPS | $C_EACH | $C_P50 | $C_P99 ($C_P99S) | $C_CPU ($C_USR+$C_SYS) | $C_EFF | $C_RCPU | $C_CORE0 | $C_NON2XX | $C_SPS | $C_SPR | $C_CPR |"; }

# ---------------------------------------------------------------------------- runs
run_nginx() { # LIMIT SCRIPT -> R_*
  local port; free_port; port=$PORT
  proxy_nginx_conf "$TMP/nginx.conf" "$port" "$1"
  say "  starting nginx (proxy, limit: $1) on 127.0.0.1:$port, core $PROXY_CPU"
  start_nginx nginx "$PROXY_CPU" "$TMP/nginx.conf" "$port"
  local pid=$LAST_PID
  [ "$(http_status "$port" "x-device-id: check")" = 200 ] || die "nginx does not proxy to the backend (no 200)"
  measure nginx "$port" "$pid" "$2"
  profile nginx "$port" "$pid" "$2"
  R_ENFORCED=""
  [ "$1" = clients ] && R_ENFORCED=$(probe_limit "$port")
  forget "$pid"
}

# Modes proxy, clients and hot: nginx and levee both up on PROXY_CPU (only the one being
# measured gets load), ROUNDS measurements of each in turn, so a slow minute of the
# machine hits both. Sets A and B (the rows of the round with the median levee/nginx
# req/s ratio) and RATIOS (every round's); EXTRA names a function whose output fills the
# extra column after each measurement. Returns 1 (with SKIP_REASON) when levee cannot run.
duel() { # LIMIT SCRIPT EXTRA
  local limit=$1 script=$2 extra=$3 ng_port ng_pid lv_port lv_admin lv_pid r na i
  free_port; ng_port=$PORT
  proxy_nginx_conf "$TMP/nginx.conf" "$ng_port" "$limit"
  say "  starting nginx (proxy, limit: $limit) on 127.0.0.1:$ng_port, core $PROXY_CPU"
  start_nginx nginx "$PROXY_CPU" "$TMP/nginx.conf" "$ng_port"; ng_pid=$LAST_PID
  [ "$(http_status "$ng_port" "x-device-id: check")" = 200 ] || die "nginx does not proxy to the backend (no 200)"
  free_port; lv_port=$PORT; free_port; lv_admin=$PORT
  levee_conf "$TMP/levee.toml" "$lv_port" "$lv_admin" "$limit" memory
  if ! levee_check "$TMP/levee.toml"; then
    forget "$ng_pid"; SKIP_REASON="levee check rejects the config: $CHECK_ERR"; return 1
  fi
  say "  starting levee (limit: $limit, store: memory) on 127.0.0.1:$lv_port, core $PROXY_CPU"
  if ! start_levee "$TMP/levee.toml" "$lv_port"; then
    forget "$ng_pid"; SKIP_REASON="levee did not start: $(tail -n1 "$TMP/levee.log")"; return 1
  fi
  lv_pid=$LAST_PID
  if [ "$(http_status "$lv_port" "x-device-id: check")" != 200 ]; then
    forget "$lv_pid"; forget "$ng_pid"; SKIP_REASON="levee does not answer 200 through the proxy"; return 1
  fi
  ENF_A="" ENF_B=""
  if [ "$limit" = clients ]; then ENF_A=$(probe_limit "$ng_port"); ENF_B=$(probe_limit "$lv_port"); fi
  local rows_a=() rows_b=() ratios=()
  for r in $(seq "$ROUNDS"); do
    say "  round $r of $ROUNDS"
    measure nginx "$ng_port" "$ng_pid" "$script"; rows_a+=("$(row nginx "$($extra A)")"); na=$R_RPS
    measure levee "$lv_port" "$lv_pid" "$script"; rows_b+=("$(row levee "$($extra B)")")
    ratios+=("$(ratio "$R_RPS" "$na")")
  done
  i=$(for r in "${!ratios[@]}"; do echo "$r ${ratios[$r]}"; done | sort -k2 -g | awk -v m=$(( (ROUNDS + 1) / 2 )) 'NR == m { print $1 }')
  A=${rows_a[$i]} B=${rows_b[$i]} RATIOS="${ratios[*]}"
  profile nginx "$ng_port" "$ng_pid" "$script"
  profile levee "$lv_port" "$lv_pid" "$script"
  forget "$lv_pid"; forget "$ng_pid"
}
no_extra() { :; }
enforced() { if [ "$1" = A ]; then echo "$ENF_A"; else echo "$ENF_B"; fi; }
rounds_note() { out ""; out "levee/nginx req/s in each of the $ROUNDS rounds: $RATIOS (the table shows the median round)."; }

# Returns 1 (with SKIP_REASON) when levee cannot run this config.
run_levee() { # LABEL LIMIT STORE SCRIPT -> R_*
  local label=$1 port admin; free_port; port=$PORT; free_port; admin=$PORT
  levee_conf "$TMP/$label.toml" "$port" "$admin" "$2" "$3"
  if ! levee_check "$TMP/$label.toml"; then SKIP_REASON="levee check rejects the config: $CHECK_ERR"; return 1; fi
  say "  starting $label (limit: $2, store: $3) on 127.0.0.1:$port, core $PROXY_CPU"
  if ! start_levee "$TMP/$label.toml" "$port"; then
    SKIP_REASON="levee did not start: $(tail -n1 "$TMP/levee.log")"; return 1
  fi
  # A Redis store connects in the background: give it up to 5 s to answer 200.
  local pid=$LAST_PID st first="" tries=0
  while [ $tries -lt 50 ]; do
    st=$(http_status "$port" "x-device-id: check")
    [ "$st" = 200 ] && break
    first=${first:-$st}; tries=$((tries + 1))
    sleep 0.1
  done
  if [ "$st" = 200 ] && [ $tries -gt 0 ]; then
    say "  $label answered '$first' for about $((tries * 100)) ms after it started listening, then 200"
    NOTES+="note: $label answered '$first' for about $((tries * 100)) ms after it started listening, then 200."$'\n'
  fi
  if [ "$st" != 200 ]; then
    forget "$pid"; SKIP_REASON="levee answered '${st:-nothing}' instead of 200 through the proxy for 5 s"; return 1
  fi
  measure "$label" "$port" "$pid" "$4"
  profile "$label" "$port" "$pid" "$4"
  R_ENFORCED=""
  [ "$2" = clients ] && R_ENFORCED=$(probe_limit "$port")
  forget "$pid"
}

# Mode instructions: one proxy under callgrind on PROXY_CPU (nginx without its master
# process, so that the process measured is the one serving), wrk -t1 -c8 on LOAD_CPU.
ir_measure() { # KIND LIMIT SCRIPT -> IR (instructions per request)
  local kind=$1 limit=$2 script=$3 port admin pid n tot f
  free_port; port=$PORT
  WRAP=(valgrind --tool=callgrind "--callgrind-out-file=$TMP/cg-$kind.%p") UP_WAIT=120
  [ "$CACHE_SIM" = 1 ] && WRAP+=(--cache-sim=yes)
  if [ "$kind" = nginx ]; then
    NGINX_MASTER=off proxy_nginx_conf "$TMP/nginx-ir.conf" "$port" "$limit"
    start_nginx nginx "$PROXY_CPU" "$TMP/nginx-ir.conf" "$port"
  else
    free_port; admin=$PORT
    levee_conf "$TMP/levee-ir.toml" "$port" "$admin" "$limit" memory
    levee_check "$TMP/levee-ir.toml" || die "mode instructions: levee check rejects the config: $CHECK_ERR"
    start_levee "$TMP/levee-ir.toml" "$port" || die "mode instructions: levee did not start under valgrind"
  fi
  pid=$LAST_PID WRAP=() UP_WAIT=15
  [ "$(http_status "$port" "x-device-id: check")" = 200 ] || die "mode instructions: $kind does not answer 200"
  say "  $kind under callgrind ($limit): warm-up 4 s, then 8 s counted (wrk -t1 -c8 -s $(basename "$script"))"
  timeout 120 taskset -c "$LOAD_CPU" wrk -t1 -c8 -d4s -s "$script" "http://127.0.0.1:$port/" >/dev/null 2>&1 \
    || die "mode instructions: wrk warm-up against $kind failed"
  callgrind_control -z "$pid" >/dev/null 2>&1
  timeout 120 taskset -c "$LOAD_CPU" wrk -t1 -c8 -d8s -s "$script" "http://127.0.0.1:$port/" >"$TMP/wrk-ir-$kind.txt" 2>&1 \
    || die "mode instructions: wrk against $kind failed"
  n=$(awk '/requests in/{print $1; exit}' "$TMP/wrk-ir-$kind.txt")
  callgrind_control -d "$pid" >/dev/null 2>&1
  f="$TMP/cg-$kind.$pid.1"
  for _ in $(seq 100); do [ -s "$f" ] && grep -q '^totals:' "$f" && break; sleep 0.1; done
  tot=$(grep -h '^summary:\|^totals:' "$f" 2>/dev/null | awk '{print $2}' | sort -n | tail -n1)
  [ -n "$tot" ] && [ "${n:-0}" -gt 0 ] || die "mode instructions: no callgrind count for $kind ($f)"
  IR=$(( tot / n ))
  say "  $kind: $n requests, $tot instructions: $IR per request"
  if [ "$CACHE_SIM" = 1 ]; then
    # events: Ir Dr Dw I1mr D1mr D1mw ILmr DLmr DLmw (one totals line per dump part)
    read -r I1 D1 LL < <(awk -v n="$n" '$1 == "events:" { for (i = 2; i <= NF; i++) col[$i] = i - 1 }
      $1 == "totals:" || $1 == "summary:" { i1 = $(col["I1mr"] + 1); d1 = $(col["D1mr"] + 1) + $(col["D1mw"] + 1)
        ll = $(col["ILmr"] + 1) + $(col["DLmr"] + 1) + $(col["DLmw"] + 1) }
      END { printf "%.0f %.0f %.0f\n", i1 / n, d1 / n, ll / n }' "$f")
    say "  $kind: $I1 L1 instruction misses, $D1 L1 data misses, $LL last-level misses per request"
  fi
  forget "$pid"
}

# The share of 429s in the hot run, from the Lua counters.
share429() {
  awk -v s="$R_STATUS" 'BEGIN{ n = split(s, f, /[ =]/); for (i = 1; i < n; i += 2) v[f[i]] = f[i+1]
    t = v["2xx"] + v["429"] + v["other"]; if (t > 0) printf "%.1f%%", 100 * v["429"] / t; else print "?" }'
}

START=$(date -u '+%Y-%m-%d %H:%M UTC')

say "modes: ${MODES[*]}; $DURATION per run after a $WARMUP warm-up; proxies on core $PROXY_CPU, wrk + backend on core $LOAD_CPU"

for mode in "${MODES[@]}"; do
  CUR_MODE=$mode
  case "$mode" in
  proxy)
    say "mode proxy: plain reverse proxy, no limits ($CLIENTS rotating client ids)"
    duel none "$TMP/clients.lua" no_extra || die "mode proxy: $SKIP_REASON"
    table "proxy: plain reverse proxy, no limits, $CLIENTS rotating client ids" "" "levee/nginx" "$A" "$B"
    rounds_note
    ;;
  clients)
    say "mode clients: $CLIENTS rotating x-device-id, limit 1000/s burst 1000 per client"
    if duel clients "$TMP/clients.lua" enforced; then
      table "clients: $CLIENTS rotating client ids, per-client limit 1000/s burst 1000 (never reached)" \
        "limit enforced" "levee/nginx" "$A" "$B"
      rounds_note
      [ "$ENF_B" = no ] && out "" && out "note: levee sent no 429 to a single client at full speed: this build does not enforce route limits, so its row measures no limiter work."
    else
      skipped "clients" "$SKIP_REASON"
    fi
    ;;
  hot)
    say "mode hot: one client id (rotating paths), limit 100/s burst 100"
    if duel hot "$TMP/hot.lua" share429; then
      table "hot: one client id on every request ($CLIENTS rotating paths), limit 100/s burst 100" "429 share" "levee/nginx" "$A" "$B"
      rounds_note
    else
      skipped "hot" "$SKIP_REASON"
    fi
    ;;
  redis)
    say "mode redis: levee with the Redis store vs levee in memory, in the clients scenario"
    if [ "$HAVE_REDIS" != 1 ]; then skipped "redis" "redis-server is not installed"; continue; fi
    start_redis || die "redis-server did not start"
    REDIS_PID=$LAST_PID
    # Check the Redis config first: no point measuring memory if Redis cannot be measured.
    free_port; free_port
    levee_conf "$TMP/levee-redis-check.toml" "$PORT" "$((PORT + 1))" clients redis
    if ! levee_check "$TMP/levee-redis-check.toml"; then
      skipped "redis" "levee check rejects store.kind = \"redis\": $CHECK_ERR"
    elif ! run_levee levee-memory clients memory "$TMP/clients.lua"; then
      skipped "redis" "$SKIP_REASON"
    else
      A=$(row "levee (memory)" "$R_ENFORCED")
      R_REDIS=1
      if ! run_levee levee-redis clients redis "$TMP/clients.lua"; then
        skipped "redis" "$SKIP_REASON"
      elif [ "$R_REDIS_PER_REQ" = "0.00" ] || [ "$R_REDIS_PER_REQ" = 0 ]; then
        skipped "redis" "levee accepts store.kind = \"redis\" but sent Redis no command during the run (the Redis store is not implemented in this build)"
      else
        B=$(row "levee (redis)" "$R_ENFORCED")
        table "redis: levee with store.kind = \"redis\" vs in memory ($CLIENTS rotating client ids, limit 1000/s burst 1000)" \
          "limit enforced" "redis/memory" "$A" "$B"
        out ""
        out "During the Redis run, per request: $R_SCRIPTS_PER_REQ script calls (EVALSHA/EVAL/FCALL), $R_REDIS_PER_REQ Redis commands counting those the script runs."
        [ "$R_NON2XX" -gt 0 ] && out "note: $R_NON2XX non-2xx answers with Redis (on_failure = \"deny\": 503 store_unavailable when a decision waits longer than store.timeout)."
      fi
      R_REDIS=0
    fi
    forget "$REDIS_PID"
    ;;
  failing)
    say "mode failing: two endpoints, one answers 200, the other always 503; retries on 503"
    R_BACKEND=1
    : >"$TMP/backend/fail.log"
    run_nginx failing ""; FA=$R_FAIL_ALL; A=$(row nginx "$(awk -v n="$R_NON2XX" -v t="$R_TOTAL" 'BEGIN{ if (t > 0) printf "%.1f%%", 100 * n / t; else print "?" }')|$R_UP_RPS|$R_UP_FAIL")
    : >"$TMP/backend/fail.log"
    if run_levee levee failing memory ""; then
      B=$(row levee "$(awk -v n="$R_NON2XX" -v t="$R_TOTAL" 'BEGIN{ if (t > 0) printf "%.1f%%", 100 * n / t; else print "?" }')|$R_UP_RPS|$R_UP_FAIL")
      table "failing: endpoints A (200) and B (always 503), one retry on 503" \
        "503 share at client | backend req/s (A+B) | of which B (503) req/s" "levee/nginx" "$A" "$B"
      out ""
      out "nginx: \`proxy_next_upstream error timeout http_503; proxy_next_upstream_tries 2\`, default max_fails=1 fail_timeout=10s. levee: retry attempts 2, budget 0.2, on connect/502/503/504; outlier consecutive_failures 5, default breaker; storm off. Backend requests counted at the backend nginx (stub_status; B's access log), after the ${WARMUP} warm-up. B's requests over the whole run (check, warm-up, measured): nginx $FA, levee $R_FAIL_ALL."
    else
      skipped "failing" "$SKIP_REASON"
    fi
    R_BACKEND=0
    ;;
  storm)
    say "mode storm: 1000 steady clients at 1/s, one bomb doubling 2/s -> 512/s, limit 100/s burst 100 per client"
    run_nginx storm storm; A=$(srow nginx)
    if run_levee levee storm memory storm; then
      B=$(srow levee)
      out ""
      out "### storm: 1,000 steady clients at 1/s + one bomb doubling 2/s -> 512/s for ${STORM_SECONDS} s, limit 100/s burst 100 per client"
      out ""
      out "| proxy | bomb's first refusal after | bomb's rate then (/s) | refusal | bomb accepted / sent | steady ok | steady p50 ms | steady p99 ms | proxy CPU % |"
      out "|---|---:|---:|---|---:|---:|---:|---:|---:|"
      out "$A"
      out "$B"
      out ""
      out "Load: \`storm.py\` (asyncio, one keep-alive connection per steady client, a pool for the bomb, open loop, all paths distinct) on core $LOAD_CPU. nginx: \`limit_req\` 100r/s burst 100 nodelay on \$http_x_device_id. levee: the same limit + storm as shipped (interval 1s, growth_factor 2, growth_intervals 3, min_rate 5/s, quarantine 60s)."
      if [ -n "$NOTES" ]; then out ""; printf '%s' "$NOTES" | tee -a "$REPORT"; NOTES=""; fi
    else
      skipped "storm" "$SKIP_REASON"
    fi
    ;;
  instructions)
    say "mode instructions: user-space instructions per request, each proxy under callgrind"
    out ""
    if [ "$CACHE_SIM" = 1 ]; then
      out "### instructions and simulated cache misses per request (callgrind --cache-sim=yes, wrk -t1 -c8, 8 s after a 4 s warm-up)"
      out ""
      out "| mode | nginx instructions | levee instructions | levee/nginx | nginx L1i misses | levee L1i misses | levee/nginx | nginx L1d misses | levee L1d misses | levee/nginx | nginx LL misses | levee LL misses | levee/nginx |"
      out "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    else
      out "### instructions per request (callgrind, wrk -t1 -c8, 8 s after a 4 s warm-up)"
      out ""
      out "| mode | nginx | levee | levee/nginx |"
      out "|---|---:|---:|---:|"
    fi
    for case_ in "proxy none clients" "clients clients clients" "hot hot hot"; do
      read -r label limit lua <<<"$case_"
      ir_measure nginx "$limit" "$TMP/$lua.lua"; ng_ir=$IR ng_i1=${I1:-} ng_d1=${D1:-} ng_ll=${LL:-}
      ir_measure levee "$limit" "$TMP/$lua.lua"; lv_ir=$IR lv_i1=${I1:-} lv_d1=${D1:-} lv_ll=${LL:-}
      if [ "$CACHE_SIM" = 1 ]; then
        out "| $label | $ng_ir | $lv_ir | $(ratio "$lv_ir" "$ng_ir") | $ng_i1 | $lv_i1 | $(ratio "$lv_i1" "$ng_i1") | $ng_d1 | $lv_d1 | $(ratio "$lv_d1" "$ng_d1") | $ng_ll | $lv_ll | $(ratio "$lv_ll" "$ng_ll") |"
      else
        out "| $label | $ng_ir | $lv_ir | $(ratio "$lv_ir" "$ng_ir") |"
      fi
    done
    ;;
  cluster)
    say "mode cluster: three levee replicas on core $PROXY_CPU sharing a 6-node Redis Cluster on core $LOAD_CPU"
    if [ "$HAVE_REDIS" != 1 ] || ! command -v redis-cli >/dev/null 2>&1; then skipped "cluster" "redis-server / redis-cli are not installed"; continue; fi
    if ! start_cluster; then skipped "cluster" "$CLUSTER_ERR"; continue; fi
    HDR="| run | decisions/s (3 replicas) | per replica req/s | p50 ms (worst) | p99 ms (worst; each) | levee CPU % (3, user+sys) | decisions/CPU-s | redis CPU % (6 nodes) | core $LOAD_CPU busy % | non-2xx | script calls/s (masters) | script calls / request | Redis commands / request |"
    SEP="|---|---:|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"
    CA="" CB="" CH=""
    if start_replicas clients cluster; then
      cluster_measure cluster-clients "$TMP/clients.lua"; CA=$(crow "cluster store (clients)"); A_RPS=$C_RPS A_P50=$C_P50 A_P99=$C_P99 A_EFF=$C_EFF
      A_NON2XX=$C_NON2XX
    else
      skipped "cluster" "$SKIP_REASON"
    fi
    stop_replicas
    if [ -n "$CA" ] && start_replicas clients memory; then
      cluster_measure memory-clients "$TMP/clients.lua"; CB=$(crow "memory store (clients)")
      B_RPS=$C_RPS B_P50=$C_P50 B_P99=$C_P99 B_EFF=$C_EFF
    fi
    stop_replicas
    if [ -n "$CA" ] && start_replicas hot cluster; then
      cluster_measure cluster-hot "$TMP/hot.lua"; CH=$(crow "cluster store (hot)")
    fi
    stop_replicas
    if [ -n "$CA" ]; then
      out ""
      out "### cluster: three levee replicas (LEVEE_WORKERS=1 each, all on core $PROXY_CPU) sharing a Redis Cluster (3 masters + 3 replicas on core $LOAD_CPU): three replicas on one core measure the cost per decision, not scaling"
      out ""
      out "$HDR"
      out "$SEP"
      out "$CA"
      [ -n "$CB" ] && out "$CB"
      [ -n "$CB" ] && out "| **cluster/memory** | **$(ratio "$A_RPS" "$B_RPS")** | | $(ratio "$A_P50" "$B_P50") | $(ratio "$A_P99" "$B_P99") | | $(ratio "$A_EFF" "$B_EFF") | | | | | | |"
      [ -n "$CH" ] && out "$CH"
      out ""
      out "Load: three \`wrk -t1 -c$CLUSTER_CONNECTIONS\` in parallel, one per replica, on core $LOAD_CPU with the backend nginx and the six redis-servers. clients: $CLIENTS rotating x-device-id values, limit 1000/s burst 1000 per client (never reached); hot: one x-device-id on every request, limit 100/s burst 100 (one bucket for the fleet with the cluster store). Cluster store: \`store.kind = \"redis\"\`, \`urls\` = the six nodes, \`on_failure = \"local\"\`; storm detector as shipped. Script calls: \`cmdstat_evalsha\`/\`evalsha_ro\`/\`eval\`/\`eval_ro\`/\`fcall\`/\`fcall_ro\` calls summed over the three masters (INFO commandstats, before and after the measured run); Redis commands: \`total_commands_processed\` on the masters (it counts those the scripts run, and this script's INFO calls)."
      [ -n "$CH" ] && out "" && out "hot: $C_2XX answered 2xx, $C_429 answered 429, $C_OTHER other over ${DURATION} (after a ${WARMUP} warm-up that spent the burst): 429 share $C_SHARE429, $C_SPR script calls per request (target ≤ 0.01: a refused client adds no Redis load)."
      if [ -n "$CB" ]; then
        T_RATIO=$(ratio "$A_RPS" "$B_RPS")
        T_MET=$(awk -v r="$T_RATIO" 'BEGIN{print (r + 0 >= 0.8) ? "**met**" : "**not met**"}')
        T_HOT=""
        if [ -n "$CH" ]; then
          T_HOT=$(awk -v r="$C_SPR" 'BEGIN{print (r + 0 <= 0.01) ? "**met**" : "**not met**"}')
          T_HOT="; hot client's script calls per request $C_SPR (target ≤ 0.01: $T_HOT)"
        fi
        out ""
        out "Targets: cluster/memory decisions/s $T_RATIO (target ≥ 0.8: $T_MET)$T_HOT."
      fi
      [ "${A_NON2XX:-0}" -gt 0 ] && out "" && out "note: $A_NON2XX non-2xx answers in the clients run with the cluster store (the limit is never reached: these are failures)."
      if [ -n "$NOTES" ]; then out ""; printf '%s' "$NOTES" | tee -a "$REPORT"; NOTES=""; fi
    fi
    for p in "${CLUSTER_PIDS[@]}"; do forget "$p"; done
    CLUSTER_PIDS=()
    ;;
  siege)
    say "mode siege: levee alone under every attack at once, ${SIEGE_QUIET}s quiet + ${SIEGE_SECONDS}s siege"
    free_port; SP=$PORT; free_port; SA=$PORT
    siege_conf "$TMP/levee-siege.toml" "$SP" "$SA"
    if ! levee_check "$TMP/levee-siege.toml"; then skipped "siege" "levee check rejects the config: $CHECK_ERR"; continue; fi
    say "  starting levee (siege config) on 127.0.0.1:$SP, core $PROXY_CPU"
    start_levee "$TMP/levee-siege.toml" "$SP" || die "mode siege: levee did not start"
    SPID=$LAST_PID
    # $SPID is levee itself: taskset and env exec it
    [ "$(http_status "$SP" "x-device-id: check")" = 200 ] || die "mode siege: levee does not answer 200 through the proxy"
    : >"$TMP/backend/siege.log"
    wait_idle
    say "  siege.py on core $LOAD_CPU (attackers under SCHED_IDLE, or at nice +5 with --no-sched-idle); levee pid $SPID"
    CAPTURE_PID=""
    if [ "$SIEGE_CAPTURE" = 1 ]; then
      [ "${SIEGE_QUIET%.*}" -ge 45 ] && [ "${SIEGE_SECONDS%.*}" -ge 95 ] || die "SIEGE_CAPTURE needs SIEGE_QUIET >= 45 and SIEGE_SECONDS >= 95"
      : >"$TMP/siege.err"
      { siege_capture "quiet run:" 20 20 "$TMP/quiet.pcap" "$SP"; siege_capture "siege:" 70 20 "$TMP/siege.pcap" "$SP"; } &
      CAPTURE_PID=$!
      PIDS+=("$CAPTURE_PID")
      say "  SIEGE_CAPTURE=1: tcpdump on core $LOAD_CPU for 20 s of the quiet run and 20 s of the siege's second minute"
    fi
    timeout $(( ${SIEGE_SECONDS%.*} + ${SIEGE_QUIET%.*} + 240 )) taskset -c "$LOAD_CPU" \
      python3 "$HERE/siege.py" "$SP" --pid "$SPID" --admin "$SA" --log "$TMP/levee.log" \
        --backend-log "$TMP/backend/siege.log" --seconds "$SIEGE_SECONDS" --quiet "$SIEGE_QUIET" \
        --max-connections "$SIEGE_MAX_CONNECTIONS" --max-clients "$SIEGE_MAX_CLIENTS" \
        --proxy-cpu "$PROXY_CPU" --load-cpu "$LOAD_CPU" ${SIEGE_ARGS} \
        --md "$TMP/siege.md" --json "$TMP/siege.json" 2> >(tee "$TMP/siege.err" >&2) \
      || { tail -n 20 "$TMP/siege.err" >&2; die "siege.py failed"; }
    out ""
    out "### siege: levee under every attack at once for ${SIEGE_SECONDS} s (quiet run: ${SIEGE_QUIET} s)"
    out ""
    out "Config: max_connections $SIEGE_MAX_CONNECTIONS, header_read_timeout 10s, idle_timeout 60s, body_read_timeout 15s (other server keys as shipped), upstream max_concurrency 200, store.max_clients $SIEGE_MAX_CLIENTS; 6 routes \`/v1/{device,account,orders,feed,search,media}\` keyed on x-device-id, 10/s burst 20 + 5000/h, storm and auth guard as shipped, plus an unlimited \`default\` route. Load (\`siege.py\`, on core $LOAD_CPU, its attackers under SCHED_IDLE unless SIEGE_ARGS has --no-sched-idle; levee alone on core $PROXY_CPU, LEVEE_WORKERS=1): 1,000 steady clients at 1/s over 100 keep-alive connections; $((SIEGE_MAX_CONNECTIONS * 9 / 10)) idle sockets (silent, \`P\`, a partial head, the h2 preface + SETTINGS) reopened as levee closes them; 36 PUTs announcing 20000 body bytes and sending 100; rapid reset on h2c (1000 HEADERS+RST_STREAM pairs/s, a new x-device-id per stream, reconnecting after GOAWAY); one device sending \`//v1/device/..\`, \`/v1/%64evice/..\`, \`/v1/x/../device/..\` at 100/s; a new x-device-id per request at min(5000, 1,000,000 / ${SIEGE_SECONDS})/s over the 6 routes. Nobody reads /metrics until the end. Latency is from send to the whole answer; \"from schedule\" counts from when the request was due (a stall shows there). \"Waiting for a CPU\" is the run-queue delay of levee's threads (schedstat): when other work shares levee's core it inflates latency that levee did not cause. Client connections: ESTABLISHED sockets on levee's port less its accept queue (/proc/net/tcp, sampled each second while connections churn, so approximate)."
    out ""
    tee -a "$REPORT" <"$TMP/siege.md"
    if [ -n "$CAPTURE_PID" ]; then
      wait "$CAPTURE_PID" 2>/dev/null || true
      forget "$CAPTURE_PID"
      out ""
      out "Where the steady fleet's time goes (SIEGE_CAPTURE=1, \`wire.py\`): tcpdump on core $LOAD_CPU recorded 20 s of the quiet run and 20 s of the siege's second minute; each steady request is followed by its path through levee's socket, the backend's and back, as the kernel stamped the packets. \"wire\" is levee and the backend together; the client's own measure above adds its wake-ups on the busy load core. The capture costs every packet some kernel time on both cores, so this run's verdicts above are not a clean measurement."
      out ""
      python3 "$HERE/wire.py" "$TMP/quiet.pcap" "$SP" "$SIEGE_BACKEND_PORT" --label quiet --header | tee -a "$REPORT"
      python3 "$HERE/wire.py" "$TMP/siege.pcap" "$SP" "$SIEGE_BACKEND_PORT" --label "siege, 2nd minute" | tee -a "$REPORT"
    fi
    [ -n "$NOTES" ] && { out ""; printf '%s' "$NOTES" | tee -a "$REPORT"; NOTES=""; }
    forget "$SPID"
    ;;
  esac
done

# ---------------------------------------------------------------------------- results
if [ -n "$FLAME" ]; then
  {
    echo "# System calls and context switches per request"
    echo
    echo "From \`$CMD\` on commit $REV ($START): \`perf stat\` over the ${PERF_DURATION} s profiling run after"
    echo "each measured run (the proxy's process tree; per request = count / wrk's requests). The"
    echo "flame graphs beside this file come from the same runs (\`perf record --call-graph dwarf\`)."
    echo
    echo "| mode | proxy | requests | syscalls | writev | write | recvfrom | read | readv | epoll_wait | epoll_ctl | futex | context switches | migrations |"
    echo "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    cat "$FLAME/syscalls.rows"
  } >"$FLAME/syscalls.md"
  rm -f "$FLAME/syscalls.rows"
  say "system calls per request: ${FLAME#"$ROOT"/}/syscalls.md"
fi
REV=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo "?")
[ -n "$(git -C "$ROOT" status --porcelain --untracked-files=no 2>/dev/null)" ] && REV+=" (with uncommitted changes)"
{
  echo ""
  echo "## $START"
  echo ""
  echo "- command: \`$CMD\`"
  echo "- machine: $NPROC cores, $CPU_MODEL, $(awk '/MemTotal/{printf "%.0f GiB", $2/1048576}' /proc/meminfo)"
  echo "- levee: $LEVEE_VERSION, commit $REV; $(nginx -v 2>&1 | sed 's/^nginx version: //'); $(wrk --version 2>&1 | head -n1 | awk '{print "wrk", $2}')"
  echo "- layout: proxy alone on core $PROXY_CPU (nginx worker_processes 1 / LEVEE_WORKERS=1), wrk + backend nginx (+ redis) on core $LOAD_CPU; wrk -t$THREADS -c$CONNECTIONS, $WARMUP warm-up, $DURATION measured"
  cat "$REPORT"
} >>"$RESULTS"
say "appended to ${RESULTS#"$ROOT"/}"
OK=1
