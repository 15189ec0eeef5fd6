# One task runner for people and CI. `make run` starts NOA; `make test` is what CI runs.
CARGO ?= cargo
NOA_LISTEN ?= 127.0.0.1:7070

.PHONY: run build test lint fmt bench setup clean

setup:
	@scripts/setup.sh

build: setup
	$(CARGO) build --release -p noa

## Installs what is missing, builds, installs the bundled model, and runs `noa up` in the foreground (Ctrl-C stops it).
run: build
	$(CARGO) run --release --locked -p noa -- model pull smollm2
	$(CARGO) run --release --locked -p noa -- up --listen $(NOA_LISTEN)

## Formatting, lints, and every test (unit, property, integration against the real daemon).
test: setup lint
	$(CARGO) test --workspace --lib --bins --tests --examples --locked

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings

fmt:
	$(CARGO) fmt --all

## Benchmarks, each printed beside its peer from the same run (see BENCHMARKS.md).
bench: setup
	$(CARGO) bench --locked -p noa-bus --bench bus
	$(CARGO) bench --locked -p noa-policy --bench policy
	$(CARGO) bench --locked -p noa-sandbox --bench spawn
	$(CARGO) bench --locked -p noa-store --bench trust
	$(CARGO) bench --locked -p noa-infer --bench generate
	$(CARGO) bench --locked -p noa --bench api_overhead
	$(CARGO) bench --locked -p noa-workflow --bench workflow
	$(CARGO) build --release --locked -p noa
	bench/llama_peers.sh
	bench/startup.sh

clean:
	$(CARGO) clean
