# Two commands a newcomer needs: `make test` and `make demo`. Both build (or reuse) the isolated
# environment first: .venv with a real ComfyUI 0.3.75 under .cache/ComfyUI (scripts/setup.sh).
PY := .venv/bin/python
PYTEST_ARGS ?= -q -rs --durations=15
# ComfyUI runs on the GPU when there is one, else on the CPU.
SERVE_FLAGS ?= $(if $(shell command -v nvidia-smi 2>/dev/null),--gpu,)

.PHONY: setup test demo serve workflows

setup:
	bash scripts/setup.sh

test: setup
	$(PY) -m pytest tests/ -p no:cacheprovider --timeout=900 $(PYTEST_ARGS)

demo: setup
	$(PY) scripts/demo.py

# Interactive use: http://127.0.0.1:8188 with the pack installed and the tiny models in .cache/base.
serve: setup
	$(PY) scripts/comfy_harness.py serve .cache/base --port 8188 $(SERVE_FLAGS)

# Regenerate example_workflows/ (UI format via the real frontend in chromium, plus api/ twins).
workflows: setup
	$(PY) scripts/make_workflows.py
