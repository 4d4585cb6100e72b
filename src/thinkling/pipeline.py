"""Staged pipelines (CLGRPO's incremental training, docs/methods.md#clgrpo-pipeline): one recipe, many stages.

A pipeline recipe holds the shared run keys plus `stages:`, a list of
`{name, kind: sft|rl|dpo, <section overrides>}`. Stage i runs in
`<output_dir>/<i>-<name>` and starts from stage i-1's final policy. A stage with a
final policy is done; rerunning with --resume continues the first unfinished one.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import yaml
from rich.table import Table

from thinkling import jobs
from thinkling.config import RunConfig, apply_overrides, build, load_yaml
from thinkling.errors import ThinklingError
from thinkling.eval.report import write_report
from thinkling.files import atomic_write_text
from thinkling.progress import console

KINDS = ("sft", "rl", "dpo")


def deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def stage_configs(data: dict) -> list[tuple[str, str, RunConfig]]:
    """Validate every stage before any runs: (name, kind, config) in order."""
    data = dict(data)
    stages = data.pop("stages", None)
    if not isinstance(stages, list) or not stages:
        raise ThinklingError("pipeline recipe: 'stages' must be a non-empty list of {name, kind, ...}")
    root = Path(data.get("output_dir", "runs/pipeline"))
    out, seen = [], set()
    for i, stage in enumerate(stages):
        where = f"stages[{i}]"
        if not isinstance(stage, dict):
            raise ThinklingError(f"pipeline recipe: '{where}' must be a mapping")
        stage = dict(stage)
        name, kind = stage.pop("name", None), stage.pop("kind", None)
        if not isinstance(name, str) or not name or name in seen:
            raise ThinklingError(f"pipeline recipe: '{where}.name' must be a unique non-empty string")
        if kind not in KINDS:
            raise ThinklingError(f"pipeline recipe: '{where}.kind' must be one of {KINDS}, got {kind!r}")
        seen.add(name)
        merged = deep_merge(data, stage)
        merged["output_dir"] = str(root / f"{i + 1}-{name}")
        if out:  # every stage after the first starts from the previous stage's final policy
            merged.setdefault("model", {})
            merged["model"] = {**merged["model"], "init": str(Path(out[-1][2].output_dir) / "final")}
        try:
            cfg = build(RunConfig, merged)
        except ThinklingError as e:
            raise ThinklingError(f"pipeline recipe {where} ({name}): {e}") from None
        out.append((name, kind, cfg))
    return out


def run_pipeline(recipe: str, overrides: list[str] = (), resume: bool = False) -> list[dict]:
    data = apply_overrides(load_yaml(recipe), list(overrides))
    stages = stage_configs(data)
    for i, (name, kind, cfg) in enumerate(stages):  # every stage is checked before the first one runs
        try:
            jobs.check_recipe(cfg, kind, init_from_earlier_stage=i > 0)
        except ThinklingError as e:
            raise ThinklingError(f"pipeline recipe stages[{i}] ({name}): {e}") from None
    root = Path(data.get("output_dir", "runs/pipeline"))
    if root.exists() and any(root.iterdir()) and not resume:
        raise ThinklingError(f"pipeline folder {root} already exists; pass --resume to continue it or choose another output_dir=...")
    root.mkdir(parents=True, exist_ok=True)
    atomic_write_text(root / "pipeline.yaml", yaml.safe_dump(data, sort_keys=False))
    results = []
    for i, (name, kind, cfg) in enumerate(stages):
        folder = Path(cfg.output_dir)
        if (folder / "final" / "policy.json").exists() and (folder / "eval.json").exists():
            console.print(f"stage {i + 1}/{len(stages)} '{name}' is done; skipping")
            summary = json.loads((folder / "eval.json").read_text())
        else:
            console.rule(f"stage {i + 1}/{len(stages)}: {name} ({kind})")
            stage_resume = folder.exists() and any(folder.iterdir())
            summary = {"sft": jobs.run_sft, "rl": jobs.run_rl, "dpo": jobs.run_dpo}[kind](cfg, resume=stage_resume)
        results.append({"stage": name, "kind": kind, "accuracy": summary["accuracy"],
                        "format_rate": summary["format_rate"], "mean_tokens": summary["mean_tokens"]})
        atomic_write_text(root / "summary.json", json.dumps(results, indent=2))
    _print(results, root)
    write_report({name: Path(cfg.output_dir) for name, _, cfg in stages}, root, title=f"pipeline {root}: every stage")
    return results


def _print(results: list[dict], root: Path) -> None:
    table = Table(title=f"pipeline {root}")
    for col in ("stage", "kind", "accuracy", "format rate", "mean tokens"):
        table.add_column(col)
    for r in results:
        table.add_row(r["stage"], r["kind"], f"{r['accuracy']:.3f}", f"{r['format_rate']:.3f}", f"{r['mean_tokens']:.1f}")
    console.print(table)
