# metalign: make demo | test | bench | build | world | evaluate TASK=cka | train BACKBONE=clip | data | clean   (see README)
PY      ?= .venv/bin/python
WORLD   ?= data/world
SIZE    ?= small
SEED    ?= 0
CONTROL ?=
RUN     ?= runs/demo
TASK    ?= things-ooo
STAGE   ?= sae
FEATURES?= $(WORLD)/features/things.h5
DATA    ?= $(WORLD)/data
CKPT    ?= $(RUN)/meta/world.pt
META_STEPS ?= 600
EVAL    := evaluate.py representations.py   # every evaluation's result depends on these
export TORCH_EXTENSIONS_DIR := $(CURDIR)/.cache/torch_extensions

.PHONY: demo test bench build nvcc world evaluate train data clean

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

# CONTROL=1: the negative-control world (same features; people use a code of the dense nuisance), e.g. WORLD=data/control
$(WORLD)/world_truth.h5: .venv/ok world.py extract.py data.py
	$(PY) extract.py --dataset synthetic --out $(WORLD) --size $(SIZE) --seed $(SEED)$(if $(filter 1 true True yes,$(CONTROL)), --control True)

world: $(WORLD)/world_truth.h5

$(RUN)/things-ooo.json: $(WORLD)/world_truth.h5 $(EVAL) behaviour.py choice.py $(CKPT)
	$(PY) evaluate.py --task things-ooo --features $(FEATURES) --data $(DATA) --ckpt $(CKPT) --out $@

$(RUN)/cka.json: $(WORLD)/world_truth.h5 $(EVAL) geometry_tasks.py kernels.py $(CKPT)
	$(PY) evaluate.py --task cka --features $(FEATURES) --data $(DATA) --ckpt $(CKPT) --spose-dims 0,1,2 --out $@

# representational geometry (issue 7): one file target per task, each with the aligned checkpoint
GEOMETRY = rsa class-separation tsne probe
$(GEOMETRY:%=$(RUN)/%.json): $(RUN)/%.json: $(WORLD)/world_truth.h5 $(EVAL) geometry_tasks.py geometry.py $(CKPT)
	$(PY) evaluate.py --task $* --features $(FEATURES) --data $(DATA) --ckpt $(CKPT) --out $@

$(RUN)/similarity.json: $(WORLD)/world_truth.h5 $(EVAL) geometry_tasks.py geometry.py
	$(PY) evaluate.py --task similarity --models "$(WORLD)/features/{dataset}.h5,$(WORLD)/features/{dataset}_b1.h5,$(WORLD)/features/{dataset}_b2.h5,$(WORLD)/features/{dataset}_b3.h5" --datasets things,levels,coco --data $(DATA) --out $@

$(RUN)/fmri.json: $(WORLD)/world_truth.h5 $(EVAL) fmri.py kernels.py $(CKPT)
	$(PY) evaluate.py --task fmri --features $(FEATURES) --data $(DATA) --ckpt $(CKPT) --out $@

$(RUN)/levels-ooo.json: $(WORLD)/world_truth.h5 $(EVAL) behaviour.py choice.py $(CKPT)
	$(PY) evaluate.py --task levels-ooo --levels-features $(WORLD)/features/levels.h5 --data $(DATA) --ckpt $(CKPT) --out $@

$(RUN)/category-learning.json: $(WORLD)/world_truth.h5 $(EVAL) behaviour.py choice.py $(CKPT)
	$(PY) evaluate.py --task category-learning --features $(FEATURES) --data $(DATA) --ckpt $(CKPT) --out $@

$(RUN)/reward-learning.json: $(WORLD)/world_truth.h5 $(EVAL) behaviour.py choice.py $(CKPT)
	$(PY) evaluate.py --task reward-learning --features $(FEATURES) --data $(DATA) --ckpt $(CKPT) --out $@

$(RUN)/icl.json: $(WORLD)/world_truth.h5 $(EVAL) behaviour.py choice.py $(CKPT)
	$(PY) evaluate.py --task icl --data $(DATA) --ckpt $(CKPT) --out $@

# SAE on the world's unlabelled pool, then its codes in a separate file (the world's features stay as written)
$(RUN)/sae/world.pt: $(WORLD)/world_truth.h5 train.py models.py kernels.py
	$(PY) train.py --stage sae --features $(WORLD)/features/coco.h5 --n-latents 4x --k 16 --epochs 30 --rows-per-step 256 --sae-lr 0.003 --no-progress --out $@

$(RUN)/coco_codes.h5: $(RUN)/sae/world.pt
	$(PY) train.py --stage sae --encode --ckpt $< --features $(WORLD)/features/coco.h5 --codes-out $@

$(RUN)/things_codes.h5: $(RUN)/sae/world.pt
	$(PY) train.py --stage sae --encode --ckpt $< --features $(WORLD)/features/things.h5 --codes-out $@

# meta-learning on the pool's SAE functions, held-out evaluation on the THINGS images' own codes
$(RUN)/meta/world.pt: $(RUN)/coco_codes.h5 $(RUN)/things_codes.h5 models.py
	$(PY) train.py --stage meta --features $(WORLD)/features/coco.h5 --codes $(RUN)/coco_codes.h5 --eval-features $(FEATURES) --eval-codes $(RUN)/things_codes.h5 --min-nonzero 40 --length 32 --batch 32 --steps $(META_STEPS) --d-model 64 --lr 2e-3 --input-pca 0.95 --eval-every 100 --no-progress --out $@


demo: build $(RUN)/things-ooo.json $(RUN)/levels-ooo.json $(RUN)/category-learning.json $(RUN)/reward-learning.json $(RUN)/icl.json $(RUN)/cka.json $(RUN)/fmri.json $(RUN)/coco_codes.h5 $(GEOMETRY:%=$(RUN)/%.json) $(RUN)/similarity.json
	$(PY) evaluate.py --task report --results $(RUN) --out $(RUN)/report.md
	@cat $(RUN)/report.md

evaluate: .venv/ok
	$(PY) evaluate.py --task $(TASK) --features $(FEATURES) --data $(DATA) --out $(RUN)/$(TASK).json

# real data: features of a backbone under data/features/$(BACKBONE)/{coco,things}.h5 -> SAE -> codes -> meta
BACKBONE ?= clip
FEAT     ?= data/features/$(BACKBONE)
TRAIN    ?= runs/$(BACKBONE)
.PRECIOUS: $(TRAIN)/%_codes.h5 $(FEAT)/%.h5  # user data and finished codes are never intermediates

$(FEAT)/%.h5:
	@echo "make train: missing $@ (features of the $* images for backbone $(BACKBONE))."; \
	 echo "  Write it with: $(PY) extract.py --dataset $* --backbone $(BACKBONE) --out $@"; \
	 echo "  (images and human data: make data; on SLURM: bash slurm/extract_array.sbatch $* $(BACKBONE) 16 $@),"; \
	 echo "  or put an HDF5 file with /features and /image_ids there (README, Extraction)."; \
	 exit 2

$(TRAIN)/sae.pt: $(FEAT)/coco.h5
	$(PY) train.py --stage sae --features $< --n-latents 16x --k 64 --out $@

$(TRAIN)/%_codes.h5: $(TRAIN)/sae.pt $(FEAT)/%.h5
	$(PY) train.py --stage sae --encode --ckpt $< --features $(FEAT)/$*.h5 --codes-out $@

$(TRAIN)/meta.pt: $(TRAIN)/coco_codes.h5 $(TRAIN)/things_codes.h5
	$(PY) train.py --stage meta --features $(FEAT)/coco.h5 --codes $(TRAIN)/coco_codes.h5 --eval-features $(FEAT)/things.h5 --eval-codes $(TRAIN)/things_codes.h5 --out $@

train: .venv/ok $(TRAIN)/meta.pt

# public data sets into data/external (fetch_data.py; ONLY=human | images | weights, comma-separated)
ONLY ?= human,images
data: .venv/ok
	$(PY) fetch_data.py --only $(ONLY)

test: build nvcc
	KERNELS_REQUIRE=1 $(PY) -m pytest -q tests --benchmark-skip

bench: build
	THP_MEM_ALLOC_ENABLE=1 KERNELS_REQUIRE=1 $(PY) -m pytest tests/test_bench*.py --benchmark-only --benchmark-group-by=group --benchmark-columns=min,mean,median,rounds --benchmark-json=runs/bench.json

clean:
	rm -rf build .cache metalign_ops*.so $(RUN) $(WORLD)
