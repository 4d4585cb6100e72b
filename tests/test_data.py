import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import ClassVar

import pytest

from thinkling.cli import main
from thinkling.tasks import Verdict, get_task


def _rows(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_difficulty_is_one_minus_pass_rate_and_a_rerun_continues(tmp_path, tiny_policy, monkeypatch):
    from thinkling.data import difficulty

    tiny_policy.save(str(tmp_path / "m"))
    out = tmp_path / "d.jsonl"
    args = ["difficulty", "--model", str(tmp_path / "m"), "--task", "chain", "--difficulty", "1,2",
            "--limit", "6", "--samples", "3", "--max-new-tokens", "8", "--out", str(out)]
    # a verifier right on even problems only: their difficulty is 0, the others' 1
    monkeypatch.setattr(type(get_task("chain")), "verify", lambda self, p, c: Verdict(p.id.endswith(("0", "2", "4")), None))
    assert main(args) == 0
    rows = _rows(out)
    assert [r["difficulty"] for r in rows] == [0.0, 1.0] * 3
    assert {r["task_difficulty"] for r in rows} <= {1.0, 2.0} and all(r["samples"] == 3 for r in rows)
    out.write_text("".join(json.dumps(r) + "\n" for r in rows[:4]) + '{"id": "chain-0-4", "diffic')  # killed mid-row
    calls = []
    real = difficulty.sample_groups
    monkeypatch.setattr(difficulty, "sample_groups", lambda *a, **k: calls.append(k["keys"]) or real(*a, **k))
    assert main(args) == 0
    assert calls == [[4, 5]]  # only the two missing problems, from their own streams
    assert _rows(out) == rows
    assert main([*args[:-2], "--samples", "2", "--out", str(out)]) == 2  # other settings: refused, not mixed


def test_difficulty_file_feeds_the_ordered_sampler(tmp_path, tiny_policy):
    from thinkling.config import CurriculumConfig
    from thinkling.data.curriculum import make_sampler

    tiny_policy.save(str(tmp_path / "m"))
    out = tmp_path / "d.jsonl"
    assert main(["difficulty", "--model", str(tmp_path / "m"), "--task", "chain", "--limit", "5", "--samples", "2",
                 "--max-new-tokens", "8", "--out", str(out)]) == 0
    problems = get_task("chain").problems(5, 0)
    with pytest.raises(Exception, match="different difficulty"):  # an untrained model solves nothing: all 1.0
        make_sampler(CurriculumConfig(sampler="ordered", difficulty_file=str(out)), problems, steps=4)
    assert all(r["difficulty"] == 1.0 for r in _rows(out))


class _Teacher(BaseHTTPRequestHandler):
    """A fake OpenAI chat endpoint: right on '10 +5', wrong on anything else."""

    asked: ClassVar[list] = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        question = body["messages"][-1]["content"]
        type(self).asked.append((body["model"], question))
        trace = "10+5=15\nA:15" if question == "10 +5" else "20+3=24\nA:24"
        data = json.dumps({"choices": [{"message": {"role": "assistant", "content": trace}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def endpoint():
    _Teacher.asked = []
    server = HTTPServer(("127.0.0.1", 0), _Teacher)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/v1"
    server.shutdown()


def test_distill_keeps_only_traces_that_verify(tmp_path, tiny_policy, endpoint):
    tiny_policy.save(str(tmp_path / "m"))
    questions = tmp_path / "q.jsonl"
    questions.write_text('{"id": "q1", "question": "10 +5", "answer": "15"}\n'
                         '{"id": "q2", "question": "20 +3", "answer": "23"}\n')
    out = tmp_path / "cot.jsonl"
    args = ["distill", "--input", str(questions), "--task", "chain", "--teacher", str(tmp_path / "m"),
            "--teacher", endpoint + "#fake", "--tries", "2", "--max-new-tokens", "8", "--out", str(out)]
    assert main(args) == 0
    kept = _rows(out)
    assert [(r["id"], r["teacher"], r["solution"], r["tries"]) for r in kept] == [
        ("q1", endpoint + "#fake", "10+5=15\nA:15", 1)]  # the wrong trace (24) is rejected
    rejected = {(r["id"], r["teacher"]): r["tries"] for r in _rows(tmp_path / "cot.rejected.jsonl")}
    assert rejected == {("q1", str(tmp_path / "m")): 2, ("q2", str(tmp_path / "m")): 2, ("q2", endpoint + "#fake"): 2}
    assert _Teacher.asked == [("fake", "10 +5"), ("fake", "20 +3"), ("fake", "20 +3")]
    assert main(args) == 0  # a restart skips every (question, teacher) already tried
    assert len(_Teacher.asked) == 3 and _rows(out) == kept
    problems = get_task("jsonl", path=str(out)).problems(None, 0)  # the output is SFT data for the jsonl task
    assert [(p.prompt, p.answer, p.steps) for p in problems] == [("10 +5", "15", ("10+5=15", "A:15"))]


def test_unreachable_teacher_is_one_line_and_writes_nothing(tmp_path, capsys):
    from thinkling.train.distributed import free_port

    port = free_port()  # a port nothing listens on
    questions = tmp_path / "q.jsonl"
    questions.write_text('{"question": "1 +1", "answer": "2"}\n')
    out = tmp_path / "cot.jsonl"
    assert main(["distill", "--input", str(questions), "--teacher", f"http://127.0.0.1:{port}/v1",
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cannot reach" in err and str(port) in err
    assert list(tmp_path.iterdir()) == [questions]
