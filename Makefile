# psq-tvm: the two commands of the README, and the pieces they use.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
TVMC   := $(VENV)/bin/tvmc
MODEL  := psq_tvm/data/fashion_cnn.onnx
DATA   := psq_tvm/data/fashion_mnist_test.npz
OUT    := out

.PHONY: setup demo test bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test,plot]"
	touch $@

# main job: compile the bundled Fashion-MNIST CNN for the pim-psq target, run it on the
# bundled labelled test images through the crossbar simulator (verified against the
# fake-quantised golden model), and print the crossbar report
demo: setup
	mkdir -p $(OUT)
	$(TVMC) compile --target pim-psq $(MODEL) -o $(OUT)/fashion_cnn.tar
	$(TVMC) run $(OUT)/fashion_cnn.tar --inputs $(DATA) --mode sim --verify --print-top 1
	$(TVMC) report $(OUT)/fashion_cnn.tar

test: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) scripts/bench_search.py

clean:
	rm -rf $(OUT) .pytest_cache
