#!/usr/bin/env bash
# `noa up` to healthy, and idle memory, beside their peers from the same run:
# - the floor of starting any process here: `noa --version` (exec, dynamic linking, exit);
# - one /healthz round trip to a daemon that is already up (the cost of the readiness probe itself).
# The probe is bash's /dev/tcp, so polling starts no process.
# Run: bench/startup.sh   (after `cargo build --release -p noa`)
set -euo pipefail
cd "$(dirname "$0")/.."
noa="${CARGO_TARGET_DIR:-target}/release/noa"
[ -x "$noa" ] || { echo "build first: cargo build --release -p noa" >&2; exit 1; }
runs=15
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
now_us() { date +%s%6N; }
# One GET /healthz; succeeds when the answer is 200.
probe() {
  local addr=$1 line
  exec 3<>"/dev/tcp/${addr%:*}/${addr##*:}" 2>/dev/null || return 1
  printf 'GET /healthz HTTP/1.0\r\n\r\n' >&3
  IFS= read -r line <&3 || { exec 3<&-; return 1; }
  exec 3<&-
  [[ $line == *" 200 "* ]]
}

ups=(); versions=(); rss=(); curls=()
for i in $(seq $runs); do
  dir=$(mktemp -d)
  t0=$(now_us)
  "$noa" up --listen 127.0.0.1:0 --data-dir "$dir" >/dev/null 2>&1 &
  pid=$!
  # Ready when the address file exists and /healthz answers.
  until [ -s "$dir/noa.addr" ] && probe "$(<"$dir/noa.addr")"; do :; done
  t1=$(now_us)
  ups+=($(( t1 - t0 )))
  t2=$(now_us); probe "$(<"$dir/noa.addr")"; t3=$(now_us)
  curls+=($(( t3 - t2 )))
  sleep 1
  rss+=($(awk '/VmRSS/ {print $2}' /proc/$pid/status))
  kill -TERM $pid; wait $pid || true
  rm -rf "$dir"
  t4=$(now_us); "$noa" --version >/dev/null; t5=$(now_us)
  versions+=($(( t5 - t4 )))
done
up=$(printf '%s\n' "${ups[@]}" | median)
ver=$(printf '%s\n' "${versions[@]}" | median)
cu=$(printf '%s\n' "${curls[@]}" | median)
mem=$(printf '%s\n' "${rss[@]}" | median)
awk -v up="$up" -v ver="$ver" -v cu="$cu" -v mem="$mem" 'BEGIN {
  printf "noa up to healthy (fresh data dir, first 200 from /healthz): median %.1f ms | exec floor (noa --version) %.1f ms + one /healthz probe %.1f ms | ratio %.1f\n", up/1000, ver/1000, cu/1000, up/(ver+cu)
  printf "idle RSS 1 s after start, no processes: median %.1f MB\n", mem/1024
}'
