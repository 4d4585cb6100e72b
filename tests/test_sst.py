"""Structured solution templates: plan traces, the weighted SFT loss, injection, self-correct traces."""

import glob
import math

import pytest
import torch

from thinkling.cli import main
from thinkling.config import SFTConfig, TaskConfig, load_recipe, load_yaml
from thinkling.errors import ThinklingError
from thinkling.rollout.prompts import prompt_text
from thinkling.tasks import get_task, problem_set
from thinkling.tasks.base import Problem, render_completion
from thinkling.tasks.templates import (
    TEMPLATES,
    inject_templates,
    retrieve_template,
    solution_lines,
)
from thinkling.train.sft import (
    collate,
    sft_examples,
    sft_loss,
    span_weights,
    template_weight_at,
)

TINY = "model.tiny={d_model: 16, n_layers: 1, n_heads: 2, max_seq_len: 160}"
FAST = [TINY, "train.size=16", "train.difficulty=1", "eval.size=2", "eval.difficulty=1", "sft.steps=2",
        "sft.batch_size=4", "eval.max_new_tokens=6"]


# ----------------------------------------------------------------------------- traces
def test_template_trace_is_plan_then_steps_then_answer():
    task = get_task("chain", template=True)
    p = task.problems(1, seed=0, difficulty=3)[0]
    lines = task.target(p).split("\n")
    assert lines[0] == "<plan>apply x3 > answer</plan>"
    assert lines[1:4] == list(p.steps) and lines[-1] == f"A:{p.answer}"
    assert task.verify(p, task.target(p)).correct
    # without the option the trace is exactly the old one
    plain = get_task("chain")
    assert plain.target(p) == render_completion(p.steps, p.answer)


@pytest.mark.parametrize("name, plan", [("countdown", "<plan>combine x2 > answer</plan>"),
                                        ("mnns", "<plan>sign x3 > answer</plan>")])
def test_other_families_have_templates_and_still_verify(name, plan):
    task = get_task(name, template=True)
    for p in task.problems(20, seed=0, difficulty=3):
        assert task.target(p).startswith(plan + "\n")
        assert task.verify(p, task.target(p)).correct


def test_word_problem_rule_set_names_each_step(tmp_path):
    data = tmp_path / "g.jsonl"
    data.write_text('{"question": "Tom has 3 bags of 4 apples and eats 2. How many are left?", '
                    '"answer": "Tom knows how many bags he has.\\nHe has 3 * 4 = 12 apples.\\n'
                    'After eating he has 12 - 2 = 10.\\n#### 10"}\n')
    task = get_task("jsonl", path=str(data), template=True)
    p = task.problems(1, 0)[0]
    target = task.target(p)
    assert target.startswith("<plan>relate > compute x2 > answer</plan>\n")
    assert target.endswith("The answer is \\boxed{10}.") and task.verify(p, target).correct


# ----------------------------------------------------------------------------- weighted loss
def test_weights_land_on_exactly_the_plan_and_boundary_tokens(tiny_policy):
    policy = tiny_policy
    task = get_task("chain", template=True)
    p = task.problems(1, seed=3, difficulty=2)[0]
    ex = sft_examples(policy, task, [p])[0]
    prompt_len = len(policy.encode_prompt(prompt_text(p)))
    target = task.target(p)  # the character tokenizer: one token per character
    plan_end = target.index("\n") + 1
    step_newlines = {i for i, c in enumerate(target) if c == "\n"}
    expected = [1.0 if (i < plan_end or i in step_newlines) else 0.0 for i in range(len(target))]
    assert ex.template[prompt_len:-1] == expected and ex.template[-1] == 0.0  # eos is not a template token
    assert ex.template[:prompt_len] == [0.0] * prompt_len

    w = 2.5
    ids, mask, weights = collate([ex], policy.pad_id, template_weight=w)
    with torch.no_grad():
        logits = policy.logits(ids, mask)
        ce = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="none")
    # by hand: position t predicts token t+1; completion token j sits at t+1 = prompt_len + j
    num = den = 0.0
    for j, is_template in enumerate(expected + [0.0]):
        wt = w if is_template else 1.0
        num += wt * float(ce[prompt_len + j - 1])
        den += wt
    with torch.no_grad():
        got = sft_loss(policy, ids, mask, weights)
    assert math.isclose(float(got), num / den, rel_tol=1e-5)
    # weight 1 is plain SFT: the unweighted mean over the completion
    ids1, mask1, weights1 = collate([ex], policy.pad_id, template_weight=1.0)
    with torch.no_grad():
        plain = sft_loss(policy, ids1, mask1, weights1)
    assert math.isclose(float(plain), float(ce[prompt_len - 1:].mean()), rel_tol=1e-5)


def test_injected_wrong_result_is_never_a_target(tiny_policy):
    task = get_task("chain", template=True, self_correct=1.0)
    p = task.problems(1, seed=0, difficulty=4)[0]
    text, weights, template = span_weights(tiny_policy, task.target_spans(p))
    lines = text.split("\n")
    check = next(i for i, line in enumerate(lines) if line.startswith("<check>"))
    wrong_line, fixed = lines[check - 1], lines[check][len("<check>"):-len("</check>")]
    start = text.index(wrong_line + "\n<check>") + wrong_line.index("=") + 1
    end = start + len(wrong_line.split("=")[1])
    assert fixed.split("=")[0] == wrong_line.split("=")[0] and fixed != wrong_line
    assert weights[start:end] == [0.0] * (end - start) and template[start:end] == [0.0] * (end - start)
    assert all(w == 1.0 for i, w in enumerate(weights) if not start <= i < end)


def test_template_weight_anneals_to_one_by_the_last_step():
    lin = SFTConfig(steps=5, template_weight=3.0, template_weight_anneal="linear")
    assert [template_weight_at(s, lin) for s in range(5)] == [3.0, 2.5, 2.0, 1.5, 1.0]
    cos = SFTConfig(steps=5, template_weight=3.0, template_weight_anneal="cosine")
    values = [template_weight_at(s, cos) for s in range(5)]
    assert values[0] == 3.0 and math.isclose(values[2], 2.0) and math.isclose(values[-1], 1.0)
    assert values[1] > 2.5  # cosine holds the weight up longer than linear
    const = SFTConfig(steps=5, template_weight=0.5)
    assert {template_weight_at(s, const) for s in range(5)} == {0.5}


def test_training_logs_the_annealed_weight(tmp_path):
    out = tmp_path / "r"
    assert main(["sft", "recipes/chain-sft.yaml", f"output_dir={out}", *FAST, "sft.steps=3", "sft.log_every=1",
                 "train.options={template: true, self_correct: 0.5}", "sft.template_weight=3",
                 "sft.template_weight_anneal=linear"]) == 0
    import json

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert [r["template_weight"] for r in rows] == [3.0, 2.0, 1.0]


# ----------------------------------------------------------------------------- injection
def test_injection_puts_the_retrieved_template_in_the_prompt():
    cfg = TaskConfig(name="chain", size=3, difficulty=2, inject_template="tag")
    _, problems = problem_set(cfg, "eval")
    hint = TEMPLATES["chain"].hint()
    assert hint.startswith("template: apply(")
    for p in problems:
        assert prompt_text(p) == f"{hint}\n{p.prompt}\n"
        assert p.prompt == p.prompt.strip() and hint not in p.prompt  # the verifier still sees the bare problem
    _, plain = problem_set(TaskConfig(name="chain", size=3, difficulty=2), "eval")
    assert all("template:" not in prompt_text(p) for p in plain)


def test_retrieval_by_similarity_without_a_tag():
    untagged = [Problem("a", "5 9 2 -> 43", "43"), Problem("b", "61 -3 +8 -2", "64"),
                Problem("c", "A shop sells 4 pens for $3. How much do 12 pens cost?", "9")]
    assert [retrieve_template(p, "bow").name for p in untagged] == ["countdown", "chain", "gsm8k"]
    assert [retrieve_template(p, "tag").name for p in untagged] == ["countdown", "chain", "gsm8k"]
    tagged = Problem("d", "5 9 2 -> 43", "43", tags=("mnns",))
    assert retrieve_template(tagged, "tag").name == "mnns"  # the tag wins over the shape
    assert inject_templates(untagged, "none") == untagged


# ----------------------------------------------------------------------------- self-correct traces
@pytest.mark.parametrize("name, options", [("chain", {"strict": True}), ("countdown", {}), ("mnns", {})])
def test_check_traces_verify(name, options):
    task = get_task(name, template=True, self_correct=0.5, **options)
    problems = task.problems(60, seed=0, difficulty=4)
    targets = [task.target(p) for p in problems]
    assert 15 < sum("<check>" in t for t in targets) < 45
    assert all(task.verify(p, t).correct for p, t in zip(problems, targets))


def test_a_slip_without_its_check_fails_the_strict_verifier():
    task = get_task("chain", strict=True, template=True, self_correct=1.0)
    p = task.problems(1, seed=0, difficulty=4)[0]
    target = task.target(p)
    without = "\n".join(line for line in target.split("\n") if not line.startswith("<check>"))
    assert task.verify(p, target).correct and not task.verify(p, without).correct
    assert solution_lines(target) == list(p.steps)


def test_check_outcomes_tell_a_fix_from_a_miss_and_a_needless_check():
    from thinkling.tasks.chain import check_outcomes

    fixed = "<plan>apply x3 > answer</plan>\n37+5=41\n<check>37+5=42</check>\n42-8=34\n34+9=44\nA:44"
    assert check_outcomes(fixed) == {"steps": 3, "wrong": 2, "checks": 1, "fixed": 1, "not_fixed": 0,
                                      "unneeded": 0, "broke": 0, "missed": 1}
    still_wrong = check_outcomes("37+5=41\n<check>37+5=40</check>\nA:40")
    assert (still_wrong["fixed"], still_wrong["not_fixed"], still_wrong["missed"]) == (0, 1, 0)
    needless = check_outcomes("37+5=42\n<check>37+5=42</check>\n42-8=34\n<check>42-8=33</check>\nA:33")
    assert (needless["unneeded"], needless["broke"], needless["wrong"]) == (2, 1, 0)
    # with the problem, a line that applies the wrong operation is wrong, and a check with the right one fixes it
    p = Problem(id="x", prompt="49 +7 -3", answer="53")
    wrong_op = "49+8=57\n<check>49+7=56</check>\n56-3=53\nA:53"
    alone = check_outcomes(wrong_op)  # read alone, both sums are right: a needless check
    assert (alone["wrong"], alone["unneeded"], alone["broke"]) == (0, 1, 0)
    assert check_outcomes(wrong_op, p) == {"steps": 2, "wrong": 1, "checks": 1, "fixed": 1, "not_fixed": 0,
                                           "unneeded": 0, "broke": 0, "missed": 0}
    assert check_outcomes("49+7=56\n56-4=52\nA:52", p)["missed"] == 1
    # every check in the library's own self-correct traces fixes the slip before it
    task = get_task("chain", template=True, self_correct=1.0)
    for q in task.problems(20, seed=0, difficulty=[2, 4]):
        for o in (check_outcomes(task.target(q)), check_outcomes(task.target(q), q)):
            assert o["checks"] == o["fixed"] == o["wrong"] == 1 and o["missed"] == 0


def test_problem_stream_is_the_same_with_or_without_scaffolding():
    a = get_task("chain").problems(20, seed=5, difficulty=[2, 5])
    b = get_task("chain", template=True, self_correct=0.4).problems(20, seed=5, difficulty=[2, 5])
    assert [(p.prompt, p.steps) for p in a] == [(p.prompt, p.steps) for p in b]


# ----------------------------------------------------------------------------- recipes and bad input
def test_sst_recipes_load():
    from thinkling.pipeline import stage_configs

    paths = sorted(glob.glob("recipes/sst/*.yaml"))
    assert len(paths) >= 4
    for path in paths:
        data = load_yaml(path)
        if "stages" in data:
            stages = stage_configs(data)
            assert [kind for _, kind, _ in stages] == ["sft", "rl"]
            assert stages[0][2].train.options["self_correct"] > 0
        else:
            load_recipe(path)


def _one_line(capsys, argv, needle):
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert needle in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("override, needle", [
    ("sft.template_weight=0", "sft.template_weight"),
    ("sft.template_weight=-1.5", "sft.template_weight"),
    ("sft.template_weight_anneal=exp", "sft.template_weight_anneal"),
    ("train.options={template: nosuch}", "task 'chain' option 'template': unknown solution template 'nosuch'"),
    ("train.options={template: 3}", "template"),
    ("train.options={self_correct: 2}", "self_correct"),
    ("eval.inject_template=embedding", "eval.inject_template"),
    ("train.inject_template=maybe", "train.inject_template"),
])
def test_bad_sst_input_is_one_line_and_writes_nothing(capsys, tmp_path, override, needle):
    _one_line(capsys, ["sft", "recipes/chain-sft.yaml", f"output_dir={tmp_path}/r", *FAST, override], needle)
    assert not (tmp_path / "r").exists()


def test_bad_inject_flag_of_eval_is_one_line(capsys):
    _one_line(capsys, ["eval", "--model", "smollm2-135m", "--inject-template", "nearest"], "--inject-template")


def test_unknown_template_name_from_the_library():
    with pytest.raises(ThinklingError, match="unknown solution template 'algebra'.*chain"):
        get_task("countdown", template="algebra")


class _PairTokens:
    """A tokenizer of two-character pieces: tokens straddle span edges, as BPE tokens do."""

    eos_id = 0

    def __init__(self):
        self.vocab: list[str] = ["<eos>"]

    def encode_text(self, text):
        ids = []
        for i in range(0, len(text), 2):
            piece = text[i:i + 2]
            if piece not in self.vocab:
                self.vocab.append(piece)
            ids.append(self.vocab.index(piece))
        return ids

    def decode(self, ids):
        return "".join(self.vocab[i] for i in ids if i)


def test_tokens_that_straddle_spans_take_the_strictest_weight():
    from thinkling.tasks.templates import Span

    spans = (Span("<p>\n", "plan"), Span("12+3="), Span("9", "error"), Span("\n", "boundary"), Span("A:15"))
    text, weights, template = span_weights(_PairTokens(), spans)
    pieces = [text[i:i + 2] for i in range(0, len(text), 2)]
    assert pieces == ["<p", ">\n", "12", "+3", "=9", "\nA", ":1", "5"]
    assert template == [1, 1, 0, 0, 0, 1, 0, 0]  # "\nA" holds a boundary newline
    assert weights == [1, 1, 1, 1, 0, 1, 1, 1]  # "=9" holds a wrong digit: never a target
