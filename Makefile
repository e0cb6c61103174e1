# psq-tvm: the two commands of the README, and the pieces they use.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
TVMC   := $(VENV)/bin/tvmc
MODEL  := psq_tvm/data/fashion_cnn.onnx
DATA   := psq_tvm/data/fashion_mnist_test.npz
OUT    := out

.PHONY: setup demo test bench mutation eval-setup clean

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

# mutation score + branch coverage of the core modules -> docs/results/mutation.md (CPU-heavy: niced,
# one worker; `make mutation MODULES="packing allocation"` for some of them); not part of CI
mutation: $(VENV)/.mutation-installed
	nice -n 19 $(PY) scripts/mutation.py $(MODULES)

$(VENV)/.mutation-installed: $(VENV)/.installed
	$(PY) -m pip install -q -e ".[test,mutation]"
	touch $@

# the evaluation's real models (torch CPU build from local disk, never plain torch); the data
# come from Debian (dataset-fashion-mnist, opencv-doc) and from wheels read by scripts/eval/workloads.py
eval-setup: $(VENV)/.eval-installed

$(VENV)/.eval-installed: $(VENV)/.installed
	@if [ ! -d /usr/share/fonts/truetype/dejavu ] || [ ! -d /usr/share/datasets/fashion-mnist ] || \
	    [ ! -d /usr/share/doc/opencv-doc/examples/data ]; then \
	  (apt-get update -q && apt-get install -y -q fonts-dejavu dataset-fashion-mnist opencv-doc) || \
	  echo "make eval-setup: install the Debian packages fonts-dejavu dataset-fashion-mnist opencv-doc (as root)"; fi
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[test,plot,eval]"
	$(PY) -m pip install -q --no-deps "ccexam==1.0.0"
	touch $@

clean:
	rm -rf $(OUT) .pytest_cache
