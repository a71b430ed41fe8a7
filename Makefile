# Horde: the one entry point. Every target works from a fresh clone (it runs setup when needed).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PROTO_SRC := $(wildcard protos/horde/v1/*.proto)
NODE_BIN := build/node/node_modules/.bin

.PHONY: setup protos protos-check lint test bench demo images clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip "setuptools>=77" wheel
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

protos: $(STAMP)
	$(BIN)/python scripts/gen_protos.py

# Regenerates into a scratch folder and fails on any difference with what is committed.
protos-check: $(STAMP)
	$(BIN)/python scripts/gen_protos.py --check

$(NODE_BIN)/buf:
	mkdir -p build/node
	cd build/node && npm install --silent --no-audit --no-fund --prefix . @bufbuild/buf@1 >/dev/null

lint: $(STAMP) $(NODE_BIN)/buf
	$(BIN)/ruff check horde_services tests scripts benchmarks
	$(BIN)/ruff format --check horde_services tests scripts benchmarks
	$(BIN)/mypy horde_services benchmarks
	$(BIN)/python scripts/gen_protos.py --check
	cd protos && ../$(NODE_BIN)/buf lint

images:
	bash deploy/images/build.sh

test: $(STAMP) images
	$(BIN)/python -m pytest -q

bench: $(STAMP) images
	$(BIN)/python -m benchmarks.run

demo: $(STAMP) images
	$(BIN)/python scripts/demo.py

clean:
	rm -rf $(VENV) build .pytest_cache .mypy_cache .ruff_cache
