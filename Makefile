# metalign: make demo | test | lint | bench | build | world | evaluate TASK=cka | train BACKBONE=clip | paper | data | clean   (see README)
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
# the demo's SAE and meta settings ([sae], [meta] tables; paths are passed on the command line below)
CONFIG  ?= configs/demo.toml
EVAL    := evaluate.py representations.py geometry.py data.py   # every evaluation's result depends on these
# the README's "What the demo shows" is generated from the default demo's report (eval_report.demo_summary)
README_SUMMARY := $(if $(filter runs/demo|data/world|small|0,$(RUN)|$(WORLD)|$(SIZE)|$(SEED)),--readme README.md,)
, := ,
export TORCH_EXTENSIONS_DIR := $(CURDIR)/.cache/torch_extensions

.PHONY: demo test lint bench build nvcc world evaluate train paper paper-table data clean

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
	$(PY) extract.py --dataset synthetic --out $(WORLD) --size $(SIZE) --seed $(SEED) --overwrite$(if $(filter 1 true True yes,$(CONTROL)), --control True)

world: $(WORLD)/world_truth.h5

$(RUN)/things-ooo.json: $(WORLD)/world_truth.h5 $(EVAL) eval_behaviour.py choice.py $(CKPT)
	$(PY) evaluate.py --task things-ooo --features $(FEATURES) --data $(DATA) --ckpt $(CKPT) --out $@

$(RUN)/cka.json: $(WORLD)/world_truth.h5 $(EVAL) eval_geometry.py kernels.py $(CKPT)
	$(PY) evaluate.py --task cka --features $(FEATURES) --data $(DATA) --ckpt $(CKPT) --spose-dims 0,1,2 --out $@

# representational geometry: one file target per task, each with the aligned checkpoint
GEOMETRY = rsa class-separation tsne probe
$(GEOMETRY:%=$(RUN)/%.json): $(RUN)/%.json: $(WORLD)/world_truth.h5 $(EVAL) eval_geometry.py geometry.py $(CKPT)
	$(PY) evaluate.py --task $* --features $(FEATURES) --data $(DATA) --ckpt $(CKPT) --out $@

$(RUN)/similarity.json: $(WORLD)/world_truth.h5 $(EVAL) eval_geometry.py geometry.py
	$(PY) evaluate.py --task similarity --models "$(WORLD)/features/{dataset}.h5,$(WORLD)/features/{dataset}_b1.h5,$(WORLD)/features/{dataset}_b2.h5,$(WORLD)/features/{dataset}_b3.h5" --datasets things,levels,coco --data $(DATA) --out $@

$(RUN)/fmri.json: $(WORLD)/world_truth.h5 $(EVAL) eval_fmri.py kernels.py $(CKPT)
	$(PY) evaluate.py --task fmri --features $(FEATURES) --data $(DATA) --ckpt $(CKPT) --out $@

$(RUN)/levels-ooo.json: $(WORLD)/world_truth.h5 $(EVAL) eval_behaviour.py choice.py $(CKPT)
	$(PY) evaluate.py --task levels-ooo --levels-features $(WORLD)/features/levels.h5 --data $(DATA) --ckpt $(CKPT) --out $@

$(RUN)/category-learning.json: $(WORLD)/world_truth.h5 $(EVAL) eval_behaviour.py choice.py $(CKPT)
	$(PY) evaluate.py --task category-learning --features $(FEATURES) --data $(DATA) --ckpt $(CKPT) --out $@

$(RUN)/reward-learning.json: $(WORLD)/world_truth.h5 $(EVAL) eval_behaviour.py choice.py $(CKPT)
	$(PY) evaluate.py --task reward-learning --features $(FEATURES) --data $(DATA) --ckpt $(CKPT) --out $@

$(RUN)/icl.json: $(WORLD)/world_truth.h5 $(EVAL) eval_behaviour.py choice.py $(CKPT)
	$(PY) evaluate.py --task icl --data $(DATA) --ckpt $(CKPT) --out $@

# SAE on the world's unlabelled pool, then its codes in a separate file (the world's features stay as written);
# SEED seeds the world and both trainings, so each seed is a different world and a different training run
$(RUN)/sae/world.pt: $(WORLD)/world_truth.h5 train.py models.py kernels.py $(CONFIG)
	$(PY) train.py --stage sae --config $(CONFIG) --seed $(SEED) --features $(WORLD)/features/coco.h5 --out $@ --overwrite

$(RUN)/coco_codes.h5: $(RUN)/sae/world.pt
	$(PY) train.py --stage sae --encode --ckpt $< --features $(WORLD)/features/coco.h5 --codes-out $@

$(RUN)/things_codes.h5: $(RUN)/sae/world.pt
	$(PY) train.py --stage sae --encode --ckpt $< --features $(WORLD)/features/things.h5 --codes-out $@

$(RUN)/coco_eval_codes.h5: $(RUN)/sae/world.pt
	$(PY) train.py --stage sae --encode --ckpt $< --features $(WORLD)/features/coco_eval.h5 --codes-out $@

# meta-learning on the pool's SAE functions; checkpoints selected on the pool's held-out split (coco_eval),
# never on the THINGS or Levels images the evaluations score (train.py refuses those)
$(RUN)/meta/world.pt: $(RUN)/coco_codes.h5 $(RUN)/coco_eval_codes.h5 models.py $(CONFIG)
	$(PY) train.py --stage meta --config $(CONFIG) --seed $(SEED) --features $(WORLD)/features/coco.h5 --codes $(RUN)/coco_codes.h5 --eval-features $(WORLD)/features/coco_eval.h5 --eval-codes $(RUN)/coco_eval_codes.h5 --out $@ --overwrite


demo: build $(RUN)/things-ooo.json $(RUN)/levels-ooo.json $(RUN)/category-learning.json $(RUN)/reward-learning.json $(RUN)/icl.json $(RUN)/cka.json $(RUN)/fmri.json $(RUN)/coco_codes.h5 $(GEOMETRY:%=$(RUN)/%.json) $(RUN)/similarity.json
	$(PY) evaluate.py --task report --results $(RUN) --out $(RUN)/report.md $(README_SUMMARY)
	@cat $(RUN)/report.md

evaluate: .venv/ok
	$(PY) evaluate.py --task $(TASK) --features $(FEATURES) --data $(DATA) --out $(RUN)/$(TASK).json

# real data: features of a backbone under data/features/$(BACKBONE)/{coco,coco_eval}.h5 (COCO train; val+test for
# checkpoint selection) -> SAE -> codes -> meta. FUNCTIONS=clip: the functions come from another backbone's SAE
# (its codes of the same images, matched by image id), as the original study did for every backbone.
# CONFIG=paper/main: a preset's [sae] and [meta] tables (configs/paper/main.toml). SAE=FILE: encode with that SAE
# checkpoint (own or ViT-Prisma) instead of training one.
BACKBONE ?= clip
FUNCTIONS?= $(BACKBONE)
FEAT     ?= data/features/$(BACKBONE)
TRAIN    ?= runs/$(BACKBONE)
FN_FEAT  ?= $(if $(filter $(FUNCTIONS),$(BACKBONE)),$(FEAT),data/features/$(FUNCTIONS))
FN_RUN   ?= $(if $(filter $(FUNCTIONS),$(BACKBONE)),$(TRAIN),runs/$(FUNCTIONS))
META     ?= $(TRAIN)/meta$(if $(filter $(FUNCTIONS),$(BACKBONE)),,_$(FUNCTIONS)-functions).pt
SAE_CKPT := $(or $(SAE),$(FN_RUN)/sae.pt)
PRESET   := $(if $(filter-out file default undefined,$(origin CONFIG)),--config configs/$(patsubst configs/%,%,$(CONFIG:.toml=)).toml)
.PRECIOUS: $(FN_RUN)/%_codes.h5 $(FEAT)/%.h5 $(FN_FEAT)/%.h5  # user data and finished codes are never intermediates

$(sort $(FEAT)/%.h5 $(FN_FEAT)/%.h5): DSET = $*
$(sort $(FEAT)/%.h5 $(FN_FEAT)/%.h5): SPLIT = $(if $(filter coco_eval,$*), --split val2017$(,)test2017)
$(sort $(FEAT)/%.h5 $(FN_FEAT)/%.h5):
	@echo "make train: missing $@ (features of the $* images)."; \
	 echo "  Write it with: $(PY) extract.py --dataset $(DSET:coco_eval=coco) --backbone $(notdir $(@D)) --out $@$(SPLIT)"; \
	 echo "  (images and human data: make data; on SLURM: bash slurm/extract_array.sbatch $(DSET:coco_eval=coco) $(notdir $(@D)) 16 $@$(SPLIT)),"; \
	 echo "  or put an HDF5 file with /features and /image_ids there (README, Extraction)."; \
	 exit 2

# the SAE's width, k and epochs follow the sizing rule (models.sae_size: pool size, d, --min-nonzero 120) unless the
# CONFIG preset's [sae] sets them (paper/main: 64x, k 64); flags on the command line would override the preset
$(FN_RUN)/sae.pt: $(FN_FEAT)/coco.h5
	$(PY) train.py --stage sae $(or $(PRESET),--n-latents auto --k 0 --epochs 0) --features $< --out $@

$(FN_RUN)/%_codes.h5: $(SAE_CKPT) $(FN_FEAT)/%.h5
	$(PY) train.py --stage sae --encode --ckpt $(SAE_CKPT) --features $(FN_FEAT)/$*.h5 --codes-out $@

$(META): $(FN_RUN)/coco_codes.h5 $(FN_RUN)/coco_eval_codes.h5 $(FEAT)/coco.h5 $(FEAT)/coco_eval.h5
	$(PY) train.py --stage meta $(PRESET) --features $(FEAT)/coco.h5 --codes $(FN_RUN)/coco_codes.h5 --eval-features $(FEAT)/coco_eval.h5 --eval-codes $(FN_RUN)/coco_eval_codes.h5 --out $@

train: .venv/ok $(META)

# the original study's grid (configs/paper: main + ablations x clip, dinov3, mae, siglip2) as a SLURM array;
# DRY=1 prints every cell's commands. paper-table: runs/paper/table.md, the original's published numbers beside
paper: .venv/ok
	$(if $(DRY),DRY=1 )PY=$(PY) bash slurm/paper_array.sbatch

paper-table: .venv/ok
	$(PY) evaluate.py --task paper-table --results runs/paper --out runs/paper/table.json

# public data sets into data/external (fetch_data.py; ONLY=human | images | weights, comma-separated)
ONLY ?= human,images
data: .venv/ok
	$(PY) fetch_data.py --only $(ONLY)

test: build nvcc
	KERNELS_REQUIRE=1 $(PY) -m pytest -q tests --benchmark-skip

# ruff (pyproject.toml) and the issue-reference check; make test runs the same through tests/test_lint.py
lint: .venv/ok
	$(PY) -m pytest -q tests/test_lint.py

bench: build
	THP_MEM_ALLOC_ENABLE=1 KERNELS_REQUIRE=1 $(PY) -m pytest tests/test_bench*.py --benchmark-only --benchmark-group-by=group --benchmark-columns=min,mean,median,rounds --benchmark-json=runs/bench.json

clean:
	rm -rf build .cache metalign_ops*.so $(RUN) $(WORLD)

# GPU check (README "GPU check"): make gpu-wheels where pip works, then make gpu-check PY=python3 on the GPU machine
.PHONY: gpu-check gpu-wheels
gpu-check:
	$(PY) gpu_check.py --out runs/gpu
gpu-wheels:
	$(PY) gpu_check.py --wheels --wheel-dir wheels
