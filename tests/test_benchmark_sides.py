"""The llama.cpp side of benchmarks/rollout.py: what it asks `llama-batched-bench` for and what it
reads back (a fake binary stands in for llama.cpp, which is not a dependency)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_llama_cpp_side_asks_for_the_batch_and_times_prefill_plus_decode(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import rollout

    calls = tmp_path / "argv.json"
    fake = tmp_path / "llama-batched-bench"
    fake.write_text(f"#!{sys.executable}\nimport json, sys\n"
                    f"open({str(calls)!r}, 'w').write(json.dumps(sys.argv[1:]))\n"
                    "print('| a table llama.cpp also prints |')\n"
                    "print(json.dumps({'pl': 3, 't_pp': 0.25, 't_tg': 1.5, 'speed_tg': 12.0}))\n")
    fake.chmod(0o755)
    run = rollout.llama_cpp(str(fake), "model.gguf", threads=1, new_tokens=7)
    timing = run([[1] * 5, [1] * 9, [1] * 6], params=None)
    assert timing["seconds"] == 1.75 and timing["cpu_seconds"] >= 0
    argv = json.loads(calls.read_text())
    flag = lambda name: argv[argv.index(name) + 1]  # noqa: E731
    assert (flag("-m"), flag("-npl"), flag("-npp"), flag("-ntg"), flag("-t")) == ("model.gguf", "3", "6", "7", "1")
    assert int(flag("-c")) >= 3 * (6 + 7)  # room in the KV cache for every row
