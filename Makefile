# metalign: make demo | test | bench | build | world | evaluate TASK=cka | clean   (see README)
PY      ?= .venv/bin/python
WORLD   ?= data/world
SIZE    ?= small
SEED    ?= 0
RUN     ?= runs/demo
TASK    ?= things-ooo
STAGE   ?= sae
FEATURES?= $(WORLD)/features/things.h5
DATA    ?= $(WORLD)/data
export TORCH_EXTENSIONS_DIR := $(CURDIR)/.cache/torch_extensions

.PHONY: demo test bench build nvcc world evaluate train clean

.venv/ok: requirements.txt
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q -r requirements.txt
	touch $@

build: .venv/ok
	$(PY) setup.py -q build_ext --inplace
	KERNELS_REQUIRE=1 $(PY) kernels.py

build/nvcc/ok: .venv/ok kernels.py $(wildcard csrc/*.cu csrc/*.h)
	$(PY) kernels.py --nvcc-check
	touch $@

nvcc: build/nvcc/ok

$(WORLD)/world_truth.h5: .venv/ok world.py extract.py data.py
	$(PY) extract.py --dataset synthetic --out $(WORLD) --size $(SIZE) --seed $(SEED)

world: $(WORLD)/world_truth.h5

$(RUN)/things-ooo.json: $(WORLD)/world_truth.h5 evaluate.py
	$(PY) evaluate.py --task things-ooo --features $(FEATURES) --data $(DATA) --out $@

$(RUN)/cka.json: $(WORLD)/world_truth.h5 evaluate.py kernels.py
	$(PY) evaluate.py --task cka --features $(FEATURES) --data $(DATA) --out $@

demo: build $(RUN)/things-ooo.json $(RUN)/cka.json
	$(PY) evaluate.py --task report --results $(RUN) --out $(RUN)/report.md
	@cat $(RUN)/report.md

evaluate: .venv/ok
	$(PY) evaluate.py --task $(TASK) --features $(FEATURES) --data $(DATA) --out $(RUN)/$(TASK).json

train: .venv/ok
	$(PY) train.py --stage $(STAGE)

test: build nvcc
	KERNELS_REQUIRE=1 $(PY) -m pytest -q tests --benchmark-skip

bench: build
	KERNELS_REQUIRE=1 $(PY) -m pytest tests/test_bench*.py --benchmark-only --benchmark-group-by=group --benchmark-columns=min,mean,median,rounds --benchmark-json=runs/bench.json

clean:
	rm -rf build .cache metalign_ops*.so $(RUN) $(WORLD)
