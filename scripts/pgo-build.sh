#!/usr/bin/env bash
# Builds levee's release binary with profile-guided optimization (PGO):
# an instrumented build serves real traffic, and the profile it writes tells
# the compiler which code is hot (what to inline, how to lay out each
# function's blocks so the hot path is dense in the instruction cache).
#
#   bash scripts/pgo-build.sh            # -> target/pgo/release/levee
#
# Why: `cargo build --release` lays code out without knowing which paths are
# hot. callgrind's cache simulation (`CACHE_SIM=1 bash benches/load/run.sh
# instructions`) shows levee at 2-3x nginx's L1 instruction misses per request
# with about the same instruction count; the PGO build serves 12% more
# proxied requests per second than the plain one on the same machine (README,
# "Benchmarks").
#
# The training traffic is not the traffic the load bench measures: the
# `storm` mode (1,000 steady clients and a callback bomb) and a 60 s `siege`
# (the steady fleet, idle sockets, stalled bodies, rapid reset, a path
# spelling flood, a new client key per request), from benches/load/run.sh,
# which installs what it needs (nginx, wrk) itself. The `proxy`, `clients`
# and `hot` modes then measure a binary that never saw them.
#
# Needs llvm-profdata of the LLVM major version rustc was built with
# (`rustc -vV`); when missing, it is installed from Debian's packages
# (llvm-N), as root or through sudo. Takes about 8 minutes on 2 cores.
# Environment: OUT (target/pgo: the optimized build's target dir).
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-target/pgo}
GEN=target/pgo-generate
RAW=$PWD/target/pgo-profiles
say() { echo "pgo-build: $*" >&2; }

major=$(rustc -vV | awk '/^LLVM version:/ { split($3, v, "."); print v[1] }')
[ -n "$major" ] || { say "cannot tell rustc's LLVM version from 'rustc -vV'"; exit 1; }
profdata=llvm-profdata-$major
# A plain `llvm-profdata` of the same major version does as well.
if ! command -v "$profdata" >/dev/null 2>&1 \
  && llvm-profdata --version 2>/dev/null | grep -q "LLVM version $major\."; then
  profdata=llvm-profdata
fi
if ! command -v "$profdata" >/dev/null 2>&1; then
  say "installing llvm-$major for $profdata (rustc uses LLVM $major; a profile from another major version is refused)"
  scripts/apt-install.sh "llvm-$major" \
    || { say "could not install llvm-$major: install llvm-profdata of LLVM $major by hand and run again"; exit 1; }
fi

say "1/4 instrumented build ($GEN)"
rm -rf "$RAW"
RUSTFLAGS="-Cprofile-generate=$RAW" cargo build --release --target-dir "$GEN"

say "2/4 training: benches/load/run.sh storm siege (about 3 minutes)"
train=$(mktemp -d)
trap 'rm -rf "$train"' EXIT
STORM_SECONDS=20 SIEGE_SECONDS=60 SIEGE_QUIET=10 IDLE_WAIT=30 LEVEE_BIN="$PWD/$GEN/release/levee" \
  RESULTS="$train/results.md" bash benches/load/run.sh storm siege >"$train/run.log" 2>&1 \
  || { tail -n 20 "$train/run.log" >&2; say "the training run failed (its log's end is above)"; exit 1; }
ls "$RAW"/*.profraw >/dev/null 2>&1 || { say "the training run wrote no profile under $RAW"; exit 1; }

say "3/4 merging the profile"
"$profdata" merge -o "$RAW/levee.profdata" "$RAW"

say "4/4 optimized build ($OUT)"
# Functions the training never ran (admin, config errors, Redis) have no
# profile: that is expected, not worth a warning each.
RUSTFLAGS="-Cprofile-use=$RAW/levee.profdata -Cllvm-args=-pgo-warn-missing-function=false" \
  cargo build --release --target-dir "$OUT"
say "done: $OUT/release/levee (measure it: LEVEE_BIN=$OUT/release/levee bash benches/load/run.sh)"
