# `make test` and `make serve` work on a fresh machine: they create .venv and install first.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

# Prometheus + promtool for tests/deploy/: from PATH when installed, else Debian's package unpacked here.
PROM_DIR := .tools/prometheus
PROM_BIN := $(CURDIR)/$(PROM_DIR)/usr/bin

.PHONY: install tools serve test test-fast clean demo-model proto

install: $(STAMP)

tools:
	@command -v prometheus >/dev/null && command -v promtool >/dev/null || deploy/prometheus/fetch-prometheus.sh $(PROM_DIR)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

serve: install  ## start the server on the bundled demo model (gRPC :8001, metrics :9090); settings via PICKSCORE_*
	$(BIN)/pickscore serve $(SERVE_FLAGS)

test: install tools  ## run the whole suite, slow full-size tests included
	PATH="$(PROM_BIN):$$PATH" $(BIN)/python -m pytest -q

test-fast: install tools  ## everything but the full-size model tests
	PATH="$(PROM_BIN):$$PATH" $(BIN)/python -m pytest -q -m "not slow"

proto: install  ## regenerate pickscore/v1 from proto/ (a test fails when they drift)
	$(BIN)/python -m grpc_tools.protoc -I proto --python_out=. --pyi_out=. --grpc_python_out=. proto/pickscore/v1/scoring.proto

clean:
	rm -rf $(VENV) .tools build *.egg-info .pytest_cache

# Rebuild the bundled demo model from scratch: synthetic data (seed 7), the `demo` preset (3000 steps), then
# 2000 more steps at a lower peak learning rate from its best checkpoint; the best of those is bundled.
DEMO_RUN ?= runs/demo
demo-model: install
	$(BIN)/pickscore data synthetic --out $(DEMO_RUN)/data --pairs 60000 --seed 7 --image-size 64
	$(BIN)/pickscore train --preset demo --data $(DEMO_RUN)/data --out $(DEMO_RUN)/train
	$(BIN)/pickscore train --preset demo --model $(DEMO_RUN)/train/best --data $(DEMO_RUN)/data --out $(DEMO_RUN)/stage2 \
		--max-steps 2000 --lr 2e-4 --warmup-steps 50 --seed 8
	rm -rf pickscore/demo && mkdir -p pickscore/demo
	cp $(DEMO_RUN)/stage2/best/*.json $(DEMO_RUN)/stage2/best/*.safetensors pickscore/demo/
	$(BIN)/pickscore data synthetic --out $(DEMO_RUN)/heldout --pairs 20000 --seed 20261122 --image-size 64
	$(BIN)/pickscore eval --model demo --data $(DEMO_RUN)/heldout --plot $(DEMO_RUN)/threshold.png
