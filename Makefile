# star-edge: `make demo` runs the main job on the bundled default model, `make test` runs the tests.
# Each target installs what it needs into .venv first (idempotent: a stamp file records the install).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
EXTRAS ?= torch,onnx,export,train,dev
TORCH_PIN := torch==2.13.0

.PHONY: install test demo demo-model demo-model-grpo bench clean

install: $(STAMP)

# pip's output goes to .venv/install.log and is shown only when the install fails.
$(STAMP): pyproject.toml Makefile
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "installing star-edge into $(VENV) (log: $(VENV)/install.log)"
	@{ $(BIN)/python -m pip install --upgrade pip setuptools wheel \
	  && $(BIN)/python -m pip install "$(TORCH_PIN)" \
	  && $(BIN)/python -m pip install -e ".[$(EXTRAS)]" \
	  && SAM2_BUILD_CUDA=0 $(BIN)/python -m pip install --no-deps --no-build-isolation \
	     --require-hashes -r tests/requirements-sam2.txt; } > $(VENV)/install.log 2>&1 \
	  || { tail -n 40 $(VENV)/install.log; exit 1; }
	@touch $(STAMP)

test: install
	@$(BIN)/pytest

# The demo model knows only the synthetic world it was trained on: held-out scenes of the test split.
demo: install
	@$(BIN)/python examples/demo_scenes.py out/scenes
	@while IFS="$$(printf '\t')" read -r image query; do \
	  name=$$(basename "$$image" .png); \
	  $(BIN)/star-edge segment "$$image" "$$query" --samples 8 --seed 0 \
	    --json "out/$$name.json" --out "out/$$name.png" || exit 1; \
	done < out/scenes/queries.tsv

# The demo model's whole pipeline from scratch, in resumable pieces (hours on a CPU; not in CI):
# rerun to continue where it stopped. The reasoner's SFT runs DEMO_SFT's schedule (cosine over
# 20,000 steps) to SFT_ANNEAL_FROM, then anneals: the same run resumed with --total-steps
# SFT_STEPS, which puts the cosine's tail (lr 3.6e-4 -> 5e-5) on its last 3,612 steps. These are
# the shipped reasoner's steps (it restarted its optimiser at steps 2951, 3600 and 5500, when it
# moved machines and sessions; this is one uninterrupted run); SFT_ARGS e.g. "--device cuda
# --num-workers 14" on a GPU machine.
DEMO_RUNS ?= runs/demo
SFT_ANNEAL_FROM ?= 5834
SFT_STEPS ?= 9446
SFT_ARGS ?= --threads 1 --num-workers 1
demo-model: install
	$(BIN)/python -m star_edge.train.sam_train --run-dir $(DEMO_RUNS)/sam --resume --threads 1 $(SAM_ARGS)
	$(BIN)/python -m star_edge.train.sam_train --run-dir $(DEMO_RUNS)/sam --export $(DEMO_RUNS)/sam-export
	$(BIN)/python -m star_edge.train.demo --run-dir $(DEMO_RUNS)/sft --until-step $(SFT_ANNEAL_FROM) $(SFT_ARGS)
	$(BIN)/python -m star_edge.train.demo --run-dir $(DEMO_RUNS)/sft --until-step $(SFT_STEPS) \
	  --total-steps $(SFT_STEPS) $(SFT_ARGS)
	$(BIN)/python -m star_edge.train.demo_bundle --sam-dir $(DEMO_RUNS)/sam-export --out $(DEMO_RUNS)/bundle \
	  --reasoner-weights $(DEMO_RUNS)/sft/checkpoint/reasoner/model.safetensors

# The recipe's GRPO stages on top of the SFT bundle that demo-model writes (train/configs/demo.yaml
# reads runs/demo/bundle): Stage 1, then Stage 2 with REST and, for the comparison at equal compute,
# without (demo_vanilla.yaml), and Stage 1 with full fine-tuning instead of LoRA (demo_full.yaml).
# The shipped model has not had them. Resumable like the rest.
demo-model-grpo: install
	$(BIN)/star-edge train --config demo --stage 1 --out runs/demo/grpo --resume
	$(BIN)/star-edge train --config demo --stage 2 --out runs/demo/grpo --resume
	$(BIN)/star-edge train --config demo_vanilla --out runs/demo/grpo-vanilla --resume
	$(BIN)/star-edge train --config demo_full --out runs/demo/grpo-full --resume

bench: install
	@$(BIN)/python benchmarks/kernels.py
	@$(BIN)/python benchmarks/vote.py
	@$(BIN)/python benchmarks/sam_decode.py --threads 1 --onnx --bf16 --clock cpu
	@$(BIN)/python benchmarks/reasoner_sampling.py --threads 1
	@$(BIN)/python benchmarks/adaptive.py
	@$(BIN)/python benchmarks/rewards.py
	@$(BIN)/python benchmarks/backends.py --threads 1
	@$(BIN)/python benchmarks/onnx_accuracy.py --threads 1
	@$(BIN)/python benchmarks/soak.py

clean:
	rm -rf $(VENV) build *.egg-info
