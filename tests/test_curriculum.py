import json
import shutil
from collections import Counter

import pytest
import torch

from thinkling.config import CurriculumConfig, load_recipe
from thinkling.data.curriculum import (
    LFR,
    Bandit,
    Ordered,
    PassRateFilter,
    Uniform,
    difficulty_buckets,
    make_sampler,
)
from thinkling.errors import ThinklingError
from thinkling.tasks import get_task
from thinkling.train.common import step_generator


def _g(step, seed=0):
    return step_generator(seed, step)


def test_buckets_split_by_count_and_keep_equal_difficulties_together():
    assert difficulty_buckets([3, 1, 2, 1, 3, 2], 3) == [2, 0, 1, 0, 2, 1]
    assert difficulty_buckets([1, 1, 1, 1, 1, 9], 3) == [0, 0, 0, 0, 0, 1]  # ties never split: 2 buckets
    assert difficulty_buckets([0.1, 0.9, 0.5, 0.7], 2) == [0, 1, 0, 1]


def test_uniform_is_the_plain_draw_the_trainers_made():
    assert Uniform(50).pick(8, 3, _g(3)) == torch.randint(50, (8,), generator=_g(3)).tolist()


def test_ordered_picks_easy_first_then_harder():
    difficulty = [1, 2, 3] * 10
    s = Ordered(difficulty_buckets(difficulty, 3), steps=9)
    phases = [{difficulty[i] for step in steps for i in s.pick(16, step, _g(step))}
              for steps in (range(3), range(3, 6), range(6, 9))]
    assert phases == [{1}, {2}, {3}]


def test_filter_skips_problems_all_solved_or_all_failed_in_the_last_visits():
    s = PassRateFilter(4, window=2)
    s.observe([(0, 4, 4), (1, 0, 4), (2, 4, 4), (3, 2, 4)])
    assert set(s.pick(64, 0, _g(0))) == {0, 1, 2, 3}  # one visit is not enough to judge
    s.observe([(0, 4, 4), (1, 0, 4), (2, 1, 4), (3, 4, 4)])
    assert set(s.pick(64, 1, _g(1))) == {2, 3}  # 0 solved twice, 1 failed twice: skipped
    assert s.stats() == {"curriculum/skipped": 2}
    s.observe([(2, 4, 4), (2, 4, 4), (3, 0, 4), (3, 0, 4)])
    assert set(s.pick(8, 2, _g(2))) == {0, 1, 2, 3}  # all skipped: draw from all rather than stop


def test_bandit_shifts_mass_to_the_improving_cluster():
    buckets = [0] * 5 + [1] * 5
    s = Bandit(buckets, temperature=0.1, explore=0.1)
    assert s.probs() == pytest.approx([0.5, 0.5])
    for t in range(6):  # cluster 0 stays at 50 %, cluster 1 climbs from 0 to 100 %
        s.observe([(0, 4, 8), (7, [0, 2, 4, 5, 7, 8][t], 8)])
    assert s.probs()[1] > 0.75
    picks = s.pick(200, 6, _g(6))
    assert sum(buckets[i] for i in picks) > 130


def test_lfr_revisits_forgotten_problems_most_and_reviews_solved_ones():
    s = LFR(4, review_every=5)
    s.observe([(0, 4, 4), (1, 4, 4), (2, 0, 4)])  # 0 and 1 solved, 2 failed, 3 unseen
    s.observe([(1, 0, 4)])  # 1 solved before, failed now: forgotten
    counts = Counter(s.pick(4000, 0, _g(0)))
    assert counts[0] == 0  # solved: out of the draw until review
    assert counts[1] > counts[2] > counts[3] > 0  # forgotten > hard > unseen
    assert set(s.pick(32, 4, _g(4))) == {0}  # every 5th step reviews the solved ones
    assert s.stats() == {"curriculum/reviewing": 1, "curriculum/forgotten": 1}


@pytest.mark.parametrize("name", ["uniform", "ordered", "filter", "bandit", "lfr"])
def test_state_round_trips_through_json(name):
    problems = get_task("chain").problems(20, 0, [1, 2, 3])
    a = make_sampler(CurriculumConfig(sampler=name), problems, steps=10)
    a.observe([(i, i % 3, 2) for i in range(0, 20, 2)])
    b = make_sampler(CurriculumConfig(sampler=name), problems, steps=10)
    b.load_state(json.loads(json.dumps(a.state())))
    assert [a.pick(8, s, _g(s)) for s in range(4)] == [b.pick(8, s, _g(s)) for s in range(4)]


def test_samplers_needing_difficulty_refuse_a_task_without_it():
    flat = get_task("chain").problems(10, 0, 3)  # every problem k = 3
    with pytest.raises(ThinklingError, match="'ordered' needs problems of different difficulty.*difficulty 3"):
        make_sampler(CurriculumConfig(sampler="ordered"), flat, steps=10)
    with pytest.raises(ThinklingError, match="'lfr' learns from rollout outcomes.*SFT"):
        make_sampler(CurriculumConfig(sampler="lfr"), flat, steps=10, kind="sft")
    make_sampler(CurriculumConfig(sampler="filter"), flat, steps=10)  # per-problem outcomes need no difficulty


def test_measured_difficulty_file_replaces_the_tasks(tmp_path):
    problems = get_task("chain").problems(4, 0, 3)
    f = tmp_path / "d.jsonl"
    f.write_text("".join(json.dumps({"id": p.id, "difficulty": d}) + "\n" for p, d in zip(problems, [0.9, 0, 0.1, 1])))
    s = make_sampler(CurriculumConfig(sampler="ordered", buckets=2, difficulty_file=str(f)), problems, steps=2)
    assert set(s.pick(16, 0, _g(0))) == {1, 2}
    f.write_text(json.dumps({"id": problems[0].id, "difficulty": 0.5}) + "\n")
    with pytest.raises(ThinklingError, match=f"no difficulty for 3 training problems \\(first: {problems[1].id}\\)"):
        make_sampler(CurriculumConfig(sampler="ordered", difficulty_file=str(f)), problems, steps=2)


def test_bad_curriculum_key_is_one_error_and_writes_nothing(tmp_path, capsys):
    from thinkling.cli import main

    def one_line(argv, needle):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and needle in err and "Traceback" not in err, err

    out = tmp_path / "run"
    one_line(["rl", "recipes/quickstart/grpo.yaml", f"output_dir={out}", "curriculum.sampler=spiral"], "spiral")
    one_line(["rl", "recipes/quickstart/grpo.yaml", f"output_dir={out}", "model.init=null",
              "curriculum.sampler=bandit"], "'bandit' needs problems of different difficulty")  # [8] only
    # a task that carries no difficulty at all (plain question/answer rows)
    rows = tmp_path / "qa.jsonl"
    rows.write_text("".join(json.dumps({"question": f"{i} +1", "answer": str(i + 1)}) + "\n" for i in range(12)))
    one_line(["sft", "recipes/curriculum/sft-ordered.yaml", f"output_dir={out}", "train.name=jsonl",
              f"train.options={{path: {rows}}}", "train.difficulty=null", "train.size=12"],
             "'ordered' needs problems of different difficulty")
    assert list(tmp_path.iterdir()) == [rows]


TINY = "model.tiny={d_model: 32, n_layers: 2, n_heads: 2, max_seq_len: 128}"


def _overrides(tmp, name, sampler):
    return [f"output_dir={tmp}/{name}", TINY, "model.init=null", "train.size=24", "train.difficulty=[1,2,3]",
            "eval.size=2", "eval.difficulty=2", "rl.steps=4", "rl.prompts_per_step=3", "rl.group_size=2",
            "rl.max_new_tokens=10", "rl.save_every=2", "rl.lr=1e-3", "eval.max_new_tokens=10", "rl.kl_to_start=false",
            "train.options={strict: false}", f"curriculum.sampler={sampler}", "curriculum.window=1",
            "curriculum.review_every=2"]


@pytest.mark.parametrize("sampler", ["filter", "bandit", "lfr"])
def test_rl_resume_with_a_sampler_equals_uninterrupted_run(tmp_path, sampler):
    from thinkling import jobs
    from thinkling.models import load_policy

    recipe = "recipes/quickstart/grpo.yaml"
    jobs.run_rl(load_recipe(recipe, _overrides(tmp_path, "a", sampler)))
    jobs.run_rl(load_recipe(recipe, _overrides(tmp_path, "b", sampler)))
    b = tmp_path / "b"
    shutil.rmtree(b / "checkpoints" / "step_000004")
    shutil.rmtree(b / "final")
    (b / "checkpoints" / "latest").write_text("step_000002")
    saved = json.loads((b / "checkpoints" / "step_000002" / "state.json").read_text())["sampler"]
    assert saved  # the state after two steps is in the checkpoint
    jobs.run_rl(load_recipe(recipe, _overrides(tmp_path, "b", sampler)), resume=True)
    wa, wb = load_policy(tmp_path / "a").model.state_dict(), load_policy(b).model.state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    rows = [[json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()] for d in (tmp_path / "a", b)]
    key = [[(r["step"], r.get("reward_mean"), *(v for k, v in sorted(r.items()) if k.startswith("curriculum/")))
            for r in rs] for rs in rows]
    assert key[0] == key[1]
    assert any(k.startswith("curriculum/") for r in rows[0] for k in r)
