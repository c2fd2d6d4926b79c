# Two commands set everything up: `make serve` and `make test`. Each builds its own virtual environment.
PYTHON ?= python3
VENV := .venv
SERVE_VENV := .venv-serve
PIP_FLAGS := -q --disable-pip-version-check -c constraints.txt
HOST ?= 127.0.0.1
PORT ?= 8000
# CLINC150 and the Wikipedia out-of-scope sentences: the copy at ../shared, else what `make data` downloaded.
SHARED_DATA := ../shared/data/clinc150
DATA ?= $(firstword $(wildcard $(SHARED_DATA)/clinc150_plus_train_val.json data/clinc150/data_oos_plus.json) \
  $(SHARED_DATA)/clinc150_plus_train_val.json)
WIKI ?= $(firstword $(wildcard $(SHARED_DATA)/wiki_sents.txt data/clinc150/wiki_sents.txt) $(SHARED_DATA)/wiki_sents.txt)
export INTENT_HOST ?= $(HOST)
export INTENT_PORT ?= $(PORT)

.PHONY: audit serve test data-check lint model bench loadtest compare stress soak scaleout data docker-build docker-run clean venv serve-venv

$(SERVE_VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(SERVE_VENV)
	$(SERVE_VENV)/bin/pip install $(PIP_FLAGS) -e .
	touch $@

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install $(PIP_FLAGS) -e '.[train,loadtest,dev]'
	touch $@

serve-venv: $(SERVE_VENV)/.installed
venv: $(VENV)/.installed

serve: $(SERVE_VENV)/.installed  ## serve the committed model on HOST:PORT
	$(SERVE_VENV)/bin/python -m app

test: data-check $(VENV)/.installed $(SERVE_VENV)/.installed  ## the whole test suite
	CLINC_DATA=$(DATA) CLINC_WIKI=$(WIKI) $(VENV)/bin/python -m pytest $(PYTEST_ARGS)

data-check:  ## one clear line, before anything is installed, when the data the tests read is missing
	@for f in $(DATA) $(WIKI); do if [ ! -f "$$f" ]; then \
	  echo "error: $$f not found: the tests read CLINC150 from $(SHARED_DATA)/ (clinc150_plus_train_val.json," \
	    "wiki_sents.txt); put it there, or run 'make data' to download it into data/clinc150/"; exit 2; fi; done

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check app compression loadtest tests
	$(VENV)/bin/ruff format --check app compression loadtest tests
	$(VENV)/bin/mypy app compression loadtest
	$(MAKE) --no-print-directory audit

audit: $(VENV)/.installed  ## known vulnerabilities in the pinned dependencies (needs PyPI's JSON API)
	@mkdir -p reports; $(VENV)/bin/pip-audit --progress-spinner off -r constraints.txt --no-deps --disable-pip \
	  > reports/pip-audit.txt 2>&1; rc=$$?; tail -n 3 reports/pip-audit.txt; exit $$rc

# RECIPE=served (default) rebuilds what models/clinc150 serves: the teacher's 6 layers with 8 of 12 heads and FFNs
# pruned to a quarter, recovered from 3 teachers, with its own sentence geometry, int8, its OOS rule and cascade
# (105 minutes on 2 AMD EPYC cores); RECIPE=two-encoder is the model served before it (the teacher, its OOS rule on the
# pretrained encoder); RECIPE=chapter8 adds the book's search, distillation and pruning to it, each measured;
# RECIPE=quick builds a linear head on the frozen pretrained encoder in minutes; RECIPE=student is issue 23's 3-layer
# student, unpruned; RECIPE=pruned is the served recipe with 1 teacher, every head and its own first-stage threshold.
# Each recipe's stages and settings: compression.pipeline.RECIPES.
RECIPE ?= served
RECIPES := served two-encoder chapter8 quick student pruned

# DATA=intents.csv (or .jsonl: text and intent) OUT=models/my-intents builds a team's own model; its stage
# outputs go to artifacts/<name of OUT>, so the CLINC150 stages are kept (the first OUT built there owns them:
# compression.pipeline refuses another with the same name).
OUT_ARGS = $(if $(OUT),--model-dir $(OUT) --artifacts artifacts/$(notdir $(patsubst %/,%,$(OUT))))
# make splits every value at whitespace: OUT="models/my intents" would reach the build as two paths.
ifneq ($(word 2,$(OUT)),)
$(error OUT="$(OUT)" holds a space, which make splits paths at: name it without spaces)
endif
ifneq ($(word 2,$(DATA)),)
$(error DATA="$(DATA)" holds a space, which make splits paths at: rename the file without spaces)
endif
# Without OUT the defaults apply, so a team's file (anything but CLINC150's .json) would replace models/clinc150:
# refused while the Makefile is read, before the virtual environment or anything else runs.
ifneq ($(filter model,$(MAKECMDGOALS)),)
ifeq ($(OUT),)
ifneq ($(filter-out %.json,$(DATA)),)
$(error DATA=$(DATA) needs OUT=dir: without it the build replaces models/clinc150)
endif
endif
endif

model: $(VENV)/.installed  ## rebuild models/clinc150 from scratch (RECIPE=served|two-encoder|chapter8|quick|student|pruned; DATA=file.csv OUT=dir)
	@[ -n "$(filter $(RECIPE),$(RECIPES))" ] || { echo "error: RECIPE must be one of: $(RECIPES)"; exit 2; }
	$(VENV)/bin/python -m compression $(RECIPE) --data $(DATA) --wiki $(WIKI) $(OUT_ARGS) $(MODEL_ARGS)

bench: $(VENV)/.installed $(SERVE_VENV)/.installed  ## stage table, plus the serving footprint
	$(VENV)/bin/python -m compression bench --data $(DATA) --wiki $(WIKI) $(BENCH_ARGS)
	$(VENV)/bin/python -m loadtest.footprint --serve-venv $(SERVE_VENV)

data: $(SERVE_VENV)/.installed  ## download CLINC150 and the Wikipedia oos sentences into data/clinc150 (needs the internet; no torch)
	$(SERVE_VENV)/bin/python -m compression data --dest data/clinc150

loadtest: $(VENV)/.installed $(SERVE_VENV)/.installed
	$(VENV)/bin/python -m loadtest.run $(LOADTEST_ARGS)

# Optimum's ORT integration pins transformers < 4.58, so its baseline gets its own environment.
.venv-optimum/.installed: loadtest/baselines/optimum-constraints.txt
	$(PYTHON) -m venv .venv-optimum
	.venv-optimum/bin/pip install -q --disable-pip-version-check -c loadtest/baselines/optimum-constraints.txt \
	  torch==2.13.0 'optimum-onnx[onnxruntime]' fastapi 'uvicorn[standard]'
	touch $@

compare: $(VENV)/.installed $(SERVE_VENV)/.installed .venv-optimum/.installed
	$(VENV)/bin/python -m loadtest.compare $(COMPARE_ARGS)

stress: $(SERVE_VENV)/.installed $(VENV)/.installed  ## 3x saturation for 30 s, then recovery
	$(VENV)/bin/python -m loadtest.stress $(STRESS_ARGS)

soak: $(SERVE_VENV)/.installed $(VENV)/.installed  ## 1 hour at half the measured capacity (SOAK_ARGS="--minutes N", "--host URL" for a service already running): RSS, p50, p99, errors, the load driver's own loop lag, the hypervisor's steal, the p99 of the service's time, of the time outside it, of the driver's wait before writing and of the model path, CPU per request and a fixed-work canary, per minute; fails on any error, RSS +5% after 5 min, or p99 +20% (last 10 min vs first 10); reports/soak.{json,png}
	$(VENV)/bin/python -m loadtest.soak $(SOAK_ARGS)

scaleout: $(SERVE_VENV)/.installed $(VENV)/.installed  ## 3 replicas behind HAProxy at half their measured capacity: 5 kills, then restart each; fails if any request fails
	$(VENV)/bin/python -m loadtest.scaleout $(SCALEOUT_ARGS)

# Besides `latest`, a tag that names what the image holds, the served model's version and the commit (`-dirty` with
# uncommitted changes): under `latest` a node kept the first image it pulled, and a local cluster (kind) needs a
# fixed tag to use an image loaded into it. Set IMAGE_TAG to choose another.
IMAGE_TAG ?= $(shell $(PYTHON) -c 'import json; print(json.load(open("models/clinc150/card.json"))["version"])' \
  2>/dev/null || echo model)-$(shell git describe --always --dirty 2>/dev/null || echo local)

docker-build:
	docker build -t clinc-intent:latest -t clinc-intent:$(IMAGE_TAG) .

# A stop waits out the image's worst-case drain, INTENT_SHUTDOWN_DELAY_S (2) + 2 x INTENT_GRACEFUL_TIMEOUT_S (20: open
# connections, then the queue) = 42 s, with a margin: docker's default of 10 s killed it mid-drain.
docker-run:
	docker run --rm --stop-timeout 50 -p $(PORT):8000 clinc-intent:latest

clean:
	rm -rf $(VENV) $(SERVE_VENV) artifacts reports .pytest_cache .mypy_cache .ruff_cache .hypothesis
