# Two commands do all set-up on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
LOCK   := requirements.lock
STAMP  := $(VENV)/.stamp-$(shell cat $(LOCK) pyproject.toml 2>/dev/null | sha1sum | cut -c1-12)
CONFIG ?=
HOST   ?= 127.0.0.1
PORT   ?= 8321

.PHONY: run test bootstrap lint typecheck bench clean node-deps schema

$(STAMP): $(LOCK) pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check pip==25.3
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r $(LOCK)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps -e .
	@rm -f $(VENV)/.stamp-* && touch $@

bootstrap: $(STAMP)

# The real OpenID provider used by the auth tests (npm package oidc-provider) and the IDE's real client
# (LangChain JS @langchain/openai), each pinned by its lock file.
node-deps:
	@for d in tests/oidc tests/ide; do \
		if [ -f $$d/package-lock.json ] && [ ! -d $$d/node_modules ]; then \
			(cd $$d && npm ci --no-audit --no-fund --loglevel=error) || exit 1; fi; done

# With CONFIG unset: dev mode (OpenAI if OPENAI_API_KEY is set, else the bundled emulator).
run: bootstrap
ifeq ($(CONFIG),)
	$(BIN)/llm-proxy serve --dev --host $(HOST) --port $(PORT)
else
	$(BIN)/llm-proxy serve --config $(CONFIG) --host $(HOST) --port $(PORT)
endif

test: bootstrap node-deps
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: bootstrap
	$(BIN)/ruff check src tests bench
	$(BIN)/mypy src

bench: bootstrap node-deps
	@command -v nginx >/dev/null && command -v wrk >/dev/null && command -v taskset >/dev/null || sh bench/setup.sh
	$(BIN)/python bench/run.py

schema: bootstrap
	$(BIN)/python -c "import json; from llm_proxy.config import json_schema; open('src/llm_proxy/schema/config.schema.json','w').write(json.dumps(json_schema(), indent=2, sort_keys=True)+'\\n')"

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache
