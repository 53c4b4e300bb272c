# Two commands set everything up on a fresh machine: `make demo` and `make test`.
# The install includes the `tpu` extra (libtpu): the tests compile small programs for a TPU slice ahead of time,
# which needs no TPU. Everything else runs on CPU (the tests set JAX_PLATFORMS=cpu).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test test-fast install clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade "pip==26.3"
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[test,tpu]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/mtgrpo train --config configs/demo.yaml

test: $(STAMP)
	$(BIN)/python -m pytest -n 2 --dist loadgroup -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -n 2 -q -m "not slow"

clean:
	rm -rf $(VENV)
