import pytest

from thinkling.config import RunConfig, apply_overrides, build, load_recipe
from thinkling.errors import ThinklingError


def test_overrides_reach_nested_sections():
    cfg = load_recipe(None, ["rl.steps=5", "sft.lr=1e-3", "rl.bread.enabled=true", "train.difficulty=[2,3]"])
    assert cfg.rl.steps == 5 and cfg.sft.lr == 1e-3 and cfg.rl.bread.enabled and cfg.train.difficulty == [2, 3]


@pytest.mark.parametrize("override, key", [
    ("rl.stepz=5", "rl.stepz"),
    ("rl.steps=abc", "rl.steps"),
    ("model=3", "model"),
    ("rl.bread.enabled=3", "rl.bread.enabled"),
    ("rl.bread.early_stop=3", "rl.bread.early_stop"),
    ("sft.lr=fast", "sft.lr"),
])
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ThinklingError, match=f"'{key}'"):
        load_recipe(None, [override])


@pytest.mark.parametrize("section", ["sft", "rl", "dpo"])
@pytest.mark.parametrize("key, value, rule", [
    ("lr", 0, "> 0"), ("grad_clip", -1, "> 0"), ("warmup_steps", -1, ">= 0"), ("weight_decay", -0.1, ">= 0"),
])
def test_optimizer_keys_are_checked_alike_in_every_training_section(section, key, value, rule):
    """sft, rl and dpo share their optimizer keys (config.OptimizerConfig): same rule, same message."""
    with pytest.raises(ThinklingError, match=f"^config key '{section}.{key}': must be {rule}, got "):
        load_recipe(None, [f"{section}.{key}={value}"])
    cfg = load_recipe(None, [f"{section}.{key}=0.5" if key != "warmup_steps" else f"{section}.{key}=5"])
    assert getattr(getattr(cfg, section), key) in (0.5, 5)


def test_override_must_have_equals():
    with pytest.raises(ThinklingError, match="key=value"):
        apply_overrides({}, ["rl.steps"])


def test_missing_recipe_and_bad_yaml(tmp_path):
    with pytest.raises(ThinklingError, match="not found"):
        load_recipe(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("seed: 1\nrl: [unclosed\n")
    with pytest.raises(ThinklingError, match=r"bad.yaml:\d+"):
        load_recipe(bad)


def test_shipped_recipes_validate():
    from pathlib import Path

    for path in sorted(Path(__file__).parents[1].glob("recipes/**/*.yaml")):
        data = __import__("yaml").safe_load(path.read_text())
        if "stages" in data:
            from thinkling.pipeline import stage_configs

            stage_configs(data)
        else:
            build(RunConfig, data)


def test_unknown_or_unavailable_generator_is_one_clear_error():
    from thinkling.config import ModelConfig
    from thinkling.errors import ThinklingError
    from thinkling.models import build_policy

    with pytest.raises(ThinklingError, match="model.generator': must be engine or vllm, got 'fast'"):
        load_recipe(None, ["model.generator=fast"])
    with pytest.raises(ThinklingError, match="vllm"):  # no vLLM / GPU here: refused before any weights load
        build_policy(ModelConfig(backend="hf", name="smollm2-135m", generator="vllm"), seed=0)


def test_rollout_dtype_is_checked():
    from thinkling.config import ModelConfig
    from thinkling.errors import ThinklingError
    from thinkling.models import build_policy

    with pytest.raises(ThinklingError, match="model.rollout_dtype.*float32 or bfloat16"):
        load_recipe(None, ["model.rollout_dtype=fp8"])
    with pytest.raises(ThinklingError, match="model.rollout_dtype' applies to hf"):
        build_policy(ModelConfig(rollout_dtype="bfloat16", tiny={"d_model": 16, "n_layers": 1, "n_heads": 2}), seed=0)
