# Everything runs inside .venv, created from nothing but python3.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: install test lint bench demo clean

install: $(STAMP)

# Re-installs only when pyproject.toml is newer than the last install. `plot`: the benchmarks' figures.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev,plot]' >$(VENV)/pip.log 2>&1 \
		|| { cat $(VENV)/pip.log; exit 1; }
	$(BIN)/python -c "import lact, lightning, webdataset, diffusers, torchmetrics"
	touch $(STAMP)

test: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: install
	$(BIN)/python benchmarks/lact_operator.py
	$(BIN)/python benchmarks/data.py
	$(BIN)/python benchmarks/lm_generation.py
	$(BIN)/python benchmarks/lm_long_step.py
	$(BIN)/python benchmarks/mqar.py
	$(BIN)/python benchmarks/structural_icl.py
	$(BIN)/python benchmarks/nvs_render.py

# Novel view synthesis end to end: procedural scenes, <= 10 min CPU training, held-out scores, figures.
demo: install
	$(BIN)/python scripts/demo_nvs.py

clean:
	rm -rf $(VENV) outputs .pytest_cache
