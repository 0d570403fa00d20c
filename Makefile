# `make test` and `make serve` work on a fresh machine: they create .venv and install first.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

# Prometheus + promtool for tests/deploy/: from PATH when installed, else Debian's package unpacked here.
PROM_DIR := .tools/prometheus
PROM_BIN := $(CURDIR)/$(PROM_DIR)/usr/bin

.PHONY: install tools lint format serve test test-fast clean demo-model proto

install: $(STAMP)

tools:  ## system tools the tests drive: Prometheus (tests/deploy), chromium + chromedriver and PostgreSQL (tests/collect)
	@command -v prometheus >/dev/null && command -v promtool >/dev/null || deploy/prometheus/fetch-prometheus.sh $(PROM_DIR)
	@scripts/install-test-tools.sh

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

serve: install  ## start the server on the bundled demo model (gRPC :8001, HTTP :8000, metrics :8002; all interfaces); settings via PICKSCORE_*
	$(BIN)/pickscore serve $(SERVE_FLAGS)

lint: install  ## ruff: lint rules and formatting (pyproject.toml [tool.ruff]); `make format` applies both
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

test: install tools lint  ## lint, then the whole suite, slow full-size tests included
	PATH="$(PROM_BIN):$$PATH" $(BIN)/python -m pytest -q

test-fast: install tools  ## everything but the full-size model tests
	PATH="$(PROM_BIN):$$PATH" $(BIN)/python -m pytest -q -m "not slow"

proto: install  ## regenerate pickscore/v1 from proto/ (a test fails when they drift)
	$(BIN)/python -m grpc_tools.protoc -I proto --python_out=. --pyi_out=. --grpc_python_out=. proto/pickscore/v1/scoring.proto

clean:
	rm -rf $(VENV) .tools build dist *.egg-info .pytest_cache

# Rebuild the bundled demo model from scratch (~70 min on 2 CPU cores). Stage 1: the `demo` preset from
# scratch with in-batch negatives on 60,000 synthetic pairs (seed 7). Stage 2: 2000 more steps at a lower
# peak rate. Stages 3 and 4: 3000 steps each with the pairwise loss alone (what the tie-aware accuracy
# measures), each on freshly drawn pairs (seeds 9, 10). The end of stage 4 (learning rate decayed to 0) is
# bundled. Then the README's evaluation: 20,000 held-out pairs (seed 20261122), half the prompts in each of
# validation and test, against the untrained starting point (the preset's initial weights: train --init-only).
DEMO_RUN ?= runs/demo
DEMO_DATA = $(BIN)/pickscore data synthetic --image-size 64 --pairs
DEMO_TRAIN = $(BIN)/pickscore train --preset demo
DEMO_FILES = open_clip_config.json open_clip_model.safetensors preprocessor_config.json
demo-model: install
	$(DEMO_DATA) 60000 --seed 7 --out $(DEMO_RUN)/data
	$(DEMO_TRAIN) --data $(DEMO_RUN)/data --out $(DEMO_RUN)/train
	$(DEMO_TRAIN) --model $(DEMO_RUN)/train/best --data $(DEMO_RUN)/data --out $(DEMO_RUN)/stage2 \
		--max-steps 2000 --lr 2e-4 --warmup-steps 50 --seed 8
	$(DEMO_DATA) 60000 --seed 9 --out $(DEMO_RUN)/data9
	$(DEMO_TRAIN) --model $(DEMO_RUN)/stage2/best --data $(DEMO_RUN)/data9 --out $(DEMO_RUN)/stage3 \
		--max-steps 3000 --lr 2e-4 --warmup-steps 50 --seed 9 --no-in-batch-negatives
	$(DEMO_DATA) 60000 --seed 10 --out $(DEMO_RUN)/data10
	$(DEMO_TRAIN) --model $(DEMO_RUN)/stage3/last --data $(DEMO_RUN)/data10 --out $(DEMO_RUN)/stage4 \
		--max-steps 3000 --lr 1.5e-4 --warmup-steps 50 --seed 10 --no-in-batch-negatives
	rm -rf pickscore/demo && mkdir -p pickscore/demo
	cd $(DEMO_RUN)/stage4/last && cp $(DEMO_FILES) $(CURDIR)/pickscore/demo/
	$(DEMO_TRAIN) --out $(DEMO_RUN)/train --init-only
	$(DEMO_DATA) 20000 --seed 20261122 --held-out 0.5 --out $(DEMO_RUN)/heldout
	$(BIN)/pickscore eval --model demo --baseline $(DEMO_RUN)/train/init --data $(DEMO_RUN)/heldout \
		--plot benchmarks/results/demo-threshold.png
