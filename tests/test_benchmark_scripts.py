"""`benchmarks/memory.py` runs end to end against the library as it is (a tiny random Llama saved
here stands in for SmolLM2): the script drives the trainers' own code paths, so an API change
must not leave it broken."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers")
from test_hf_policy import make_model, make_tokenizer  # noqa: E402  (tests/ is on sys.path)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("tiny-llama")
    model = make_model(seed=0)
    model.config.max_position_embeddings = 4096  # GSM8K prompts are long in characters
    model.save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("argv", [
    ["sft", "--mode", "full", "--batch", "2", "--seq-len", "48"],
    ["rl", "--mode", "lora", "--dtype", "float32", "--prompts", "1", "--group", "2", "--new-tokens", "6",
     "--micro-batch", "1"],
], ids=["sft", "rl"])
def test_memory_benchmark_runs_a_step_and_reports_its_phases(tiny_llama, argv):
    out = subprocess.run([sys.executable, "benchmarks/memory.py", *argv, "--model", tiny_llama, "--steps", "1"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "| step 1 |" in out.stdout and "process peak RSS (getrusage)" in out.stdout
