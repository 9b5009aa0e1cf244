"""`softprompt compare` on a tiny model: every method's row, the report's contents, the HTML
rendered in headless Chromium, and `softprompt inspect`."""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import write_reviews

from softprompt.cli import main
from softprompt.commands.compare import _estimate, run_compare
from softprompt.config import COMPARE_METHODS, CompareConfig, DataConfig, ModelConfig
from softprompt.loading import load_model
from softprompt.measure.inspection import CAVEAT

TEMPLATE = "review : {input} sentiment :"


@pytest.fixture(scope="module")
def compared(model_dirs, tmp_path_factory) -> Path:
    """One small comparison shared by the tests below (about ten seconds)."""
    root = tmp_path_factory.mktemp("compare")
    data = write_reviews(root / "train.jsonl")
    cfg = CompareConfig(
        model=ModelConfig(model=str(model_dirs["llama"])),
        data=DataConfig(
            data=str(data),
            input_field="review",
            target_field="label",
            template=TEMPLATE,
            val_fraction=0.25,
        ),
        test=str(data),
        output=str(root / "out"),
        choices="negative,positive",
        methods=",".join(COMPARE_METHODS),  # the default leaves prefix-tuning out
        steps=3,
        batch_size=4,
        shots=2,
        num_virtual_tokens=4,
        lora_r=2,
    )
    loaded = load_model(cfg.model)
    before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    console = io.StringIO()
    with contextlib.redirect_stderr(console):
        folder = run_compare(cfg, loaded)
    (root / "console.txt").write_text(console.getvalue())  # what the user saw, for a test
    after = loaded.model.state_dict()
    # LoRA is injected in place and removed again; full FT trains a copy: the base is intact.
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(p.requires_grad for p in loaded.model.parameters())
    return folder


def test_every_method_says_when_it_starts_with_elapsed_time_and_an_estimate(compared):
    """compare is never silent: a line per method (its place, the time so far, and once a
    method of its sort has run an estimate of what is left), and a bar for each training."""
    text = (compared.parent / "console.txt").read_text()
    n = len(COMPARE_METHODS)
    starts = re.findall(rf"compare: (\d)/{n} ([a-z-]+), (\S+) elapsed(.*)", text)
    assert [m for _, m, _, _ in starts] == list(COMPARE_METHODS)
    assert "left" not in starts[0][3] and "left" in starts[-1][3]  # full-ft: after prompt/lora
    for method in ("lora", "full-ft"):  # the references' own step bars
        assert re.search(rf"{method}: 100%.*3/3", text)


def test_the_estimate_assumes_each_method_left_takes_its_sorts_mean():
    took = {"zero-shot": 2.0, "prompt-tuning": 30.0, "lora": 50.0}
    assert (
        _estimate(took, ["few-shot", "full-ft"]) == ", about 42s left (from the methods run so far)"
    )
    assert _estimate({"zero-shot": 2.0}, ["prompt-tuning"]) == ""  # nothing trained yet


def _results(folder: Path) -> dict[str, dict]:
    records = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
    return {r["method"]: r for r in records if r["kind"] == "result"}


def test_every_method_reports_the_trade_off(compared, model_dirs):
    results = _results(compared)
    assert list(results) == list(COMPARE_METHODS)
    for r in results.values():
        assert 0 <= r["quality"]["accuracy"] <= 1 and r["quality"]["loss"] > 0
        assert r["seconds_per_example"] > 0 and r["peak_memory_mb"] >= 0
    assert results["zero-shot"]["trainable_params"] == 0 == results["few-shot"]["artifact_bytes"]
    assert results["few-shot"]["shots"] == 2
    assert results["prompt-tuning"]["trainable_params"] == 4 * 16  # N x hidden
    # N x layers x (key, value) x KV heads x head dim
    assert results["prefix-tuning"]["trainable_params"] == 4 * 2 * 2 * 1 * 8
    total = sum(p.numel() for p in _tiny_params(model_dirs["llama"]))
    assert results["full-ft"]["trainable_params"] == total
    assert 0 < results["lora"]["trainable_params"] < total
    assert 0 < results["prompt-tuning"]["artifact_bytes"] < results["full-ft"]["artifact_bytes"]
    assert (compared / "lora" / "adapter_model.safetensors").is_file()
    for method in ("prompt-tuning", "lora", "full-ft"):
        assert results[method]["train_seconds"] > 0


def _tiny_params(folder):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder)
    return {id(p): p for p in model.parameters()}.values()


def test_report_markdown_holds_the_table_plots_and_inspection(compared):
    md = (compared / "report.md").read_text()
    for heading in (
        "Method",
        "Quality",
        "Trainable params",
        "Train time",
        "Peak memory",
        "Artifact",
        "Inference / example",
    ):
        assert heading in md
    for name in (
        "Zero-shot",
        "Few-shot (hard prompt), k=2",
        "Prompt tuning",
        "LoRA (PEFT)",
        "Full fine-tuning",
    ):
        assert name in md
    assert "accuracy" in md and "(weights, not written)" in md
    assert "![Training loss](loss_curves.png)" in md and (compared / "loss_curves.png").is_file()
    assert CAVEAT in md and md.count("\n| 3 |") == 1  # four virtual tokens: rows 0..3


def test_report_html_is_self_contained(compared):
    html = (compared / "report.html").read_text()
    assert html.count('src="data:image/png;base64,') == 2
    assert "http://" not in html and "https://" not in html
    assert "Full fine-tuning" in html and CAVEAT in html


def _chromium() -> str | None:
    return next(
        (
            shutil.which(n)
            for n in ("chromium", "chromium-browser", "google-chrome")
            if shutil.which(n)
        ),
        None,
    )


@pytest.mark.skipif(_chromium() is None, reason="no chromium binary (apt-get install chromium)")
def test_report_html_renders_its_plots_in_headless_chromium(compared, tmp_path):
    from PIL import Image

    flags = [
        _chromium(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--virtual-time-budget=5000",
    ]
    url = (compared / "report.html").resolve().as_uri()
    dom = subprocess.run([*flags, "--dump-dom", url], capture_output=True, text=True, timeout=120)
    assert 'data-plots-loaded="2/2"' in dom.stdout, dom.stderr[-2000:]
    shot = tmp_path / "report.png"
    subprocess.run(
        [*flags, f"--screenshot={shot}", "--window-size=1200,1600", url],
        capture_output=True,
        timeout=120,
        check=True,
    )
    image = Image.open(shot).convert("RGB")
    colours = image.getcolors(maxcolors=1_000_000)
    assert colours is not None and len(colours) > 50  # text, table lines and coloured plots


def test_inspect_cli_prints_tokens_norms_drift_and_caveat(compared, model_dirs, capsys):
    code = main(["inspect", str(compared / "prompt-tuning"), "--model", str(model_dirs["llama"])])
    out = capsys.readouterr().out
    assert code == 0
    lines = out.splitlines()
    assert "nearest vocabulary tokens" in lines[0] and "drift" in lines[0]
    assert len([x for x in lines if x[:3].strip().isdigit()]) == 4
    assert "real token norms" in out and CAVEAT in out


def test_compare_config_errors_are_one_line(pairs_file, capsys):
    code = main(
        [
            "compare",
            "--data",
            str(pairs_file),
            "--test",
            str(pairs_file),
            "--output",
            "x",
            "--methods",
            "zero-shot,magic",
        ]
    )
    assert code == 2 and "--methods: unknown magic" in capsys.readouterr().err


def test_peak_memory_is_the_same_for_the_same_work_measured_twice():
    """The second measurement does not reuse the first's freed pages (compare charged the
    first method for memory the next ones then got for free)."""
    import time

    import torch

    from softprompt.measure.compare import PeakMemory

    def work():
        big = [torch.ones(1024, 1024) for _ in range(75)]  # 300 MB in 4 MB pieces
        time.sleep(0.2)  # held long enough for the sampler to see it on a busy machine
        del big
        small = [torch.ones(256, 256) for _ in range(1000)]  # 250 MB in small pieces
        time.sleep(0.2)
        del small

    peaks = []
    for _ in range(2):
        with PeakMemory(torch.device("cpu")) as mem:
            work()
        peaks.append(mem.peak_mb)
    assert peaks[0] > 200 and abs(peaks[1] - peaks[0]) < 0.2 * peaks[0], peaks


def test_lora_starts_from_its_seed_whatever_ran_before(model_dirs):
    """LoRA's adapters start from the seed alone: compare and the suite run LoRA after other
    methods that draw random numbers, and the same seed must give the same LoRA whichever
    ran before it; the caller's generator is left as it was."""
    from softprompt.measure.finetune import add_lora, remove_lora

    loaded = load_model(model=str(model_dirs["llama"]))
    starts = []
    for earlier, seed in ((1, 7), (2, 7), (1, 8)):
        torch.manual_seed(earlier)  # where the methods before LoRA left the generator
        before = torch.get_rng_state()
        peft_model = add_lora(loaded.model, seed, r=2)
        assert torch.equal(torch.get_rng_state(), before)
        starts.append({k: v.clone() for k, v in peft_model.state_dict().items() if "lora_A" in k})
        remove_lora(peft_model)
    assert starts[0] and starts[0].keys() == starts[1].keys() == starts[2].keys()
    assert all(torch.equal(starts[0][k], starts[1][k]) for k in starts[0])
    assert not all(torch.equal(starts[0][k], starts[2][k]) for k in starts[0])
