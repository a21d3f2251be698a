# clipsearch: `make help` lists the targets. Every target installs what it needs first.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CLI := $(VENV)/bin/clipsearch
STAMP := $(VENV)/.installed
APT_PACKAGES := tuxpaint-stamps-default fonts-noto-color-emoji chromium chromium-driver nginx-light
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

DATA ?=
OUT ?=
MODEL ?= default
PRETRAINED ?=
EPOCHS ?=
PYTEST_ARGS ?=
# MODEL=ViT-B-32 PRETRAINED=laion2b_s34b_b79k (a tag, needs the hub) or PRETRAINED=/models/vit-b-32.pt
PRETRAINED_FLAG = $(if $(PRETRAINED),--pretrained "$(PRETRAINED)")
# PRECISION=bf16: bf16 autocast on the CPU too (index, eval, serve, bench; training for model/train)
PRECISION_FLAG = $(if $(PRECISION),--precision $(PRECISION))

.DEFAULT_GOAL := help
.PHONY: help install apt test lint model pack train eval eval-default index serve demo bench bench-filters soak lb-test clean

help: ## list the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  \033[36m%-13s\033[0m %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q -e '.[dev,ray]'
	@touch $(STAMP)

apt: ## install the Debian packages: demo gallery + training data, Chromium for the browser test (when missing)
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:$$missing"; \
		SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing >/dev/null; \
	fi

install: $(STAMP) apt ## create .venv and install everything (idempotent, seconds when done)

test: install ## run the test suite (hermetic: no network, no GPU)
	$(PY) -m pytest -q -m "not gpu" $(PYTEST_ARGS)

lint: install ## ruff + mypy
	$(VENV)/bin/ruff check models app indexer tests
	$(VENV)/bin/mypy models app indexer

model: install ## retrain the embedded default model from scratch (47-93 min measured on 2 cores; [PRECISION=bf16] [EPOCHS=n] [DEVICE=cuda])
	$(CLI) model $(if $(EPOCHS),--epochs $(EPOCHS)) $(if $(PRECISION),--precision $(PRECISION)) $(if $(DEVICE),--device $(DEVICE))

train: install ## contrastive training: make train DATA=manifest-or-folder OUT=runs/x [MODEL=arch] [PRETRAINED=tag-or-file]
	@test -n "$(DATA)" || { echo "usage: make train DATA=path OUT=dir [MODEL=arch-or-dir]"; exit 2; }
	$(CLI) train "$(DATA)" --out "$(or $(OUT),runs/train)" --model "$(if $(filter default,$(MODEL)),clipsearch-tiny,$(MODEL))" $(PRETRAINED_FLAG) $(PRECISION_FLAG)

eval: install ## Recall@K: make eval DATA=manifest-or-folder [MODEL=default] [PRETRAINED=...]
	@test -n "$(DATA)" || { echo "usage: make eval DATA=path [MODEL=...]"; exit 2; }
	$(CLI) eval "$(DATA)" --model "$(MODEL)" $(PRETRAINED_FLAG) $(PRECISION_FLAG)

pack: install ## the default model's data as a portable 14 MB folder, build/default-pack (train with clipsearch model --data-dir build/default-pack)
	$(CLI) model --pack build/default-pack --quiet

eval-default: install ## the default model's held-out Recall@K as the README reports it (builds the data first, seconds)
	$(CLI) model --data-only --quiet
	$(CLI) eval build/default-data/eval.jsonl --held-out 0.2

index: install ## build a FAISS index: make index DATA=folder-or-manifest [OUT=indexes/default] [MODEL=default] [PRETRAINED=...]
	@test -n "$(DATA)" || { echo "usage: make index DATA=path [OUT=dir] [MODEL=...]"; exit 2; }
	$(CLI) index "$(DATA)" --out "$(or $(OUT),indexes/default)" --model "$(MODEL)" $(PRETRAINED_FLAG) $(PRECISION_FLAG)

serve: install ## run the search service: make serve [INDEX=indexes/default] [PORT=8000] [MODEL=... PRETRAINED=...]
	$(CLI) serve --index "$(or $(INDEX),indexes/default)" --model "$(MODEL)" $(PRETRAINED_FLAG) $(PRECISION_FLAG) --port "$(or $(PORT),8000)"

demo: install ## index the stamps gallery, start the server, show example queries (Ctrl-C stops)
	$(CLI) demo --model "$(MODEL)" $(if $(PORT),--port "$(PORT)")

BENCH_PORT ?= 8077
# load-generator processes for the 32-client run (one tops out near 260 requests/s on a fast machine)
BENCH_PROCESSES ?= 1
OVERLOAD_PORT ?= 8078
# $(call with_server,PORT,LOG[,ENV]) COMMAND: serve build/bench-index on PORT (stopped when the line
# ends), wait until it is ready, then run COMMAND against it. A server that exits (a taken port)
# stops the target with its log's end, rather than letting COMMAND measure whatever else answers there
with_server = $(3) $(CLI) serve --index build/bench-index $(PRECISION_FLAG) --port $(1) > $(2) 2>&1 & pid=$$!; \
	trap "kill $$pid 2>/dev/null" EXIT; \
	for i in $$(seq 1 120); do \
		kill -0 $$pid 2>/dev/null || { echo "the server on port $(1) did not start ($(2)):"; tail -3 $(2); exit 1; }; \
		curl -sf http://127.0.0.1:$(1)/readyz >/dev/null && break; sleep 0.5; done;

bench: install ## measure: indexing images/s, QPS/latency under 32 clients [BENCH_PROCESSES=n] [PRECISION=bf16], then overload shedding + recovery (stamps gallery)
	$(CLI) index /usr/share/tuxpaint/stamps --out build/bench-index --quiet --workers 2 $(PRECISION_FLAG)
	@$(call with_server,$(BENCH_PORT),build/bench-server.log) \
	$(CLI) bench --url http://127.0.0.1:$(BENCH_PORT) --clients 32 --duration 20 --processes $(BENCH_PROCESSES)
	@echo "overload: 96 clients against one server with MAX_QUEUE=8, then 8 clients (recovery)"
	@$(call with_server,$(OVERLOAD_PORT),build/bench-overload.log,CLIPSEARCH_MAX_QUEUE=8) \
	$(CLI) bench --url http://127.0.0.1:$(OVERLOAD_PORT) --clients 96 --duration 20 --allow-shed && \
	$(CLI) bench --url http://127.0.0.1:$(OVERLOAD_PORT) --clients 8 --duration 10

bench-filters: install ## new metadata filters over a million items: what they cost 8 clients' plain searches
	$(CLI) index /usr/share/tuxpaint/stamps --out build/bench-index --quiet --workers 2
	$(PY) -m app.bench_filters --kind eq
	$(PY) -m app.bench_filters --kind contains

SOAK_S ?= 600
soak: install ## memory under load: one server, 32 clients for SOAK_S seconds (default 600), texts of every length; RSS sampled from /metrics [PRECISION=bf16]
	$(CLI) index /usr/share/tuxpaint/stamps --out build/bench-index --quiet --workers 2
	@$(call with_server,$(BENCH_PORT),build/soak-server.log) \
	$(CLI) bench --url http://127.0.0.1:$(BENCH_PORT) --clients 32 --duration $(SOAK_S) --varied-texts

LB_DURATION ?= 60
lb-test: install ## nginx (docker/nginx.conf) + 3 replicas on loopback, load + SIGKILL/SIGTERM/restarts
	$(CLI) index /usr/share/tuxpaint/stamps --out build/bench-index --quiet --workers 2
	$(CLI) lb-test --index build/bench-index --duration $(LB_DURATION) --clients 32

clean: ## remove build outputs (keeps .venv and the committed default model)
	rm -rf build runs .pytest_cache
