"""Can a policy finish from a BREAD anchor? Success per expert-trace style and anchor length.

BREAD learns only when some anchor short of the whole expert trace leaves the policy a rest it
can solve. This samples groups exactly as BREAD's probes do (`rollout.groups.sample_groups`: the
prompt, then the first k expert steps, then the policy's own tokens; the whole text is verified)
on `arithmetic` training problems, for each trace style (`pairs`, `rewrite`) and each k, and
counts right samples and groups with a success, and samples whose continuation starts with the
next expert step (does the policy write the step the anchor leaves it, e.g. the first partial
sum?). It also shows a few continuations: what the policy writes after the anchor.

`.venv/bin/python experiments/anchor_probe.py --policy runs/smollm2/grpo-arithmetic [--problems 12]
[--group 8] [--difficulty 3] [--anchors 0,1,2] [--traces pairs,rewrite] [--midline] [--max-new-tokens 48]`
(`--midline`: the task's `midline` steps, two per line, so k=1 is `93 + 88 + 99 =`.)
"""

from __future__ import annotations

from common import experiment_args, output_dir, write_results

from thinkling.models import load_policy
from thinkling.models.base import SamplingParams
from thinkling.rollout.groups import sample_groups
from thinkling.rollout.prompts import anchor_text
from thinkling.tasks import get_task


def extra(parser):
    parser.add_argument("--policy", required=True, help="a saved policy or run folder")
    parser.add_argument("--problems", type=int, default=12)
    parser.add_argument("--group", type=int, default=8, help="samples per problem and anchor (G)")
    parser.add_argument("--difficulty", type=int, default=3, help="number of operands")
    parser.add_argument("--anchors", default="0,1", help="anchor lengths k (expert steps), comma-separated")
    parser.add_argument("--traces", default="pairs,rewrite", help="trace styles, comma-separated")
    parser.add_argument("--midline", action="store_true", help="cut trace lines after ' =' (task option)")
    parser.add_argument("--seed", type=int, default=11, help="problem seed (the recipes' training seed)")
    parser.add_argument("--max-new-tokens", type=int, default=48,
                        help="rollout length (48: the 3-operand recipe's; a 4-operand rewrite trace needs ~75)")


def follows_trace(problem, k: int, text: str) -> bool:
    """Whether the continuation after the k-step anchor starts with expert step k+1 (spaces aside)."""
    if k >= len(problem.steps):
        return False
    return text[len(anchor_text(problem, k)):].lstrip().startswith(problem.steps[k].strip())


def main():
    args = experiment_args(__doc__.splitlines()[0], extra)
    out = output_dir("anchor_probe", args.out, args.quick)
    n = 2 if args.quick else args.problems
    policy = load_policy(args.policy)
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=0.7, seed=0)
    rows, results = [], {}
    for trace in args.traces.split(","):
        task = get_task("arithmetic", instruct=True, trace=trace, midline=args.midline)
        problems = task.problems(n, args.seed, [args.difficulty])
        for k in (int(a) for a in args.anchors.split(",")):
            groups = sample_groups(policy, task, [(p, None, k) for p in problems], args.group, params)
            right = sum(c.correct for g in groups for c in g.completions)
            solved = sum(g.has_success for g in groups)
            on_trace = sum(follows_trace(g.problem, k, c.text) for g in groups for c in g.completions)
            p, first = groups[0].problem, groups[0].completions[:3]
            shown = [c.text[len(anchor_text(p, k)):] for c in first]
            results[f"{trace} k={k}"] = {"right": right, "samples": n * args.group, "groups_solved": solved,
                                         "groups": n, "next_step_written": on_trace, "anchor": anchor_text(p, k), "continuations": shown}
            rows.append([trace, k, f"{right}/{n * args.group}", f"{solved}/{n}", f"{on_trace}/{n * args.group}", repr(anchor_text(p, k)), repr(shown[0])])
            print(rows[-1], flush=True)
    print(write_results(out, f"anchor probe: {args.policy}{', midline steps' if args.midline else ''}, {n} problems x G={args.group}, T=0.7",
                        ["trace", "k", "right samples", "groups with a success", "next step written", "anchor (problem 1)",
                         "a continuation"], rows, results))


if __name__ == "__main__":
    main()
