"""Every YAML in recipes/configs/ loads and is valid: recipe configs parse with their recipe's
own argument parser (unknown keys are errors), their upcycling section has known keys and values
`upcycle` accepts, local data paths exist, and each file is headed by its launch command.
Accelerate configs (FSDP, DeepSpeed) load with accelerate's own config class."""

import importlib.util
from pathlib import Path

import pytest
import yaml

from hf_condcomp import training
from hf_condcomp.modeling.configuration_condcomp import ROUTING_TYPES
from hf_condcomp.spec import INITS, VARIANTS

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = sorted((ROOT / "recipes" / "configs").glob("*.yaml"))
RECIPES = ("classification", "translation", "dialogue")


def recipe_of(path):
    return next((r for r in RECIPES if path.name.startswith(r)), None)


def load_recipe(name):
    spec = importlib.util.spec_from_file_location(f"recipe_{name}", ROOT / "recipes" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_config_is_covered():
    assert len(CONFIGS) >= 7
    assert {recipe_of(p) for p in CONFIGS} >= set(RECIPES) | {None}
    assert {p.name for p in CONFIGS} >= {"accelerate_fsdp.yaml", "accelerate_deepspeed.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_is_headed_by_its_launch_command(path):
    first = path.read_text().splitlines()[0]
    assert first.startswith("# accelerate launch "), first
    assert f"recipes/configs/{path.name}" in first


@pytest.mark.parametrize("path", [p for p in CONFIGS if recipe_of(p)], ids=lambda p: p.name)
def test_recipe_config_is_valid(path, tmp_path):
    recipe = recipe_of(path)
    args = training.parse_args(load_recipe(recipe).build_parser(),
                               ["--config", str(path), "--output_dir", str(tmp_path)])
    assert args.model_name_or_path
    up = args.upcycling
    assert up, "every recipe config has an `upcycling:` section for dense checkpoints"
    assert up.get("variant", "moe") in VARIANTS
    assert up.get("init", "copy") in INITS
    assert up.get("routing", "token_choice") in ROUTING_TYPES
    assert 1 <= up.get("top_k", 2) <= up.get("num_experts", 8)
    # A config runs from a clone of this repository alone: its data is a Hub dataset (or the
    # chitchat PyPI package), never a path outside the repository.
    assert args.dataset_name and not any(getattr(args, f) for f in ("train_file", "validation_file", "test_file"))
    if recipe == "dialogue":
        assert args.dataset_name == "chitchat"


def _values(node):
    if isinstance(node, dict):
        for value in node.values():
            yield from _values(value)
    elif isinstance(node, list):
        for value in node:
            yield from _values(value)
    else:
        yield node


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_no_config_refers_to_a_path_outside_the_repository(path):
    for value in _values(yaml.safe_load(path.read_text())):
        if isinstance(value, str) and ("../" in value or value.startswith(("/", "~"))):
            raise AssertionError(f"{path.name}: {value!r} points outside the repository")


def test_offline_hub_dataset_without_local_files_exits_2_with_one_line(tmp_path):
    import os
    import subprocess
    import sys

    config = ROOT / "recipes" / "configs" / "classification_banking77.yaml"
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    proc = subprocess.run([sys.executable, str(ROOT / "recipes" / "classification.py"), "--config", str(config),
                           "--output_dir", str(tmp_path / "out")], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "'PolyAI/banking77'" in lines[0] and "`--train_file`" in lines[0], lines[0]
    assert not (tmp_path / "out").exists()


def test_null_override_resets_an_optional_setting(tmp_path):
    path = ROOT / "recipes" / "configs" / "classification_banking77.yaml"
    parser = load_recipe("classification").build_parser()
    for word in ("null", "none", "None"):
        args = training.parse_args(parser, ["--config", str(path), f"checkpointing_steps={word}",
                                            "max_train_steps=5", "--output_dir", str(tmp_path)])
        assert args.checkpointing_steps is None and args.max_train_steps == 5


def test_overrides_beat_config(tmp_path):
    path = ROOT / "recipes" / "configs" / "classification_banking77.yaml"
    args = training.parse_args(load_recipe("classification").build_parser(), [
        "--config", str(path), "max_train_steps=7", "upcycling.num_experts=4", "--learning_rate", "1e-3",
        "--output_dir", str(tmp_path),
    ])
    assert args.max_train_steps == 7 and args.learning_rate == 1e-3 and args.upcycling["num_experts"] == 4
    assert args.upcycling["top_k"] == 2  # the rest of the section is kept


def test_unknown_config_key_names_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model_name_or_path: x\nlearning_rte: 1.0\n")
    with pytest.raises(training.RecipeError, match=r"bad\.yaml.*learning_rte"):
        training.parse_args(load_recipe("classification").build_parser(), ["--config", str(bad), "--output_dir", "o"])


@pytest.mark.parametrize("path", [p for p in CONFIGS if not recipe_of(p)], ids=lambda p: p.name)
def test_accelerate_config_is_valid(path):
    from accelerate.commands.config.config_args import ClusterConfig
    from accelerate.utils import DistributedType

    config = ClusterConfig.from_yaml_file(str(path))
    assert config.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
    assert config.mixed_precision == "bf16" and config.num_processes >= 2
    raw = yaml.safe_load(path.read_text())
    if config.distributed_type == DistributedType.FSDP:
        # no class named: accelerate wraps the model's `_no_split_modules` (test_fsdp_wraps_...)
        assert raw["fsdp_config"]["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
        assert "fsdp_transformer_layer_cls_to_wrap" not in raw["fsdp_config"]
    else:
        assert raw["deepspeed_config"]["zero_stage"] in (0, 1, 2, 3)


@pytest.mark.parametrize("recipe", RECIPES)
def test_parallel_sizes_are_flags_and_yaml_keys_of_every_recipe(recipe, tmp_path):
    config = tmp_path / "sharded.yaml"
    config.write_text("model_name_or_path: x\ntrain_file: t.csv\nfsdp_size: 4\nep_size: 2\n")
    args = training.parse_args(load_recipe(recipe).build_parser(), ["--config", str(config), "--output_dir", "o"])
    training.validate_args(args)
    assert training.parallel_sizes(args) == {"fsdp_size": 4, "ep_size": 2}
    args = training.parse_args(load_recipe(recipe).build_parser(),
                               ["--config", str(config), "--fsdp_size", "1", "--ep_size", "1", "--output_dir", "o"])
    assert training.parallel_sizes(args) == {} and training.distributed_config(args) is None


@pytest.mark.parametrize("flags, message", [
    (["--tp_size", "2"], r"`--tp_size` 2: the ranks of a tensor-parallel group must read the same batch"),
    (["--fsdp_size", "2", "--ep_size", "4"], r"`--ep_size` 4 must divide `--fsdp_size` 2"),
    (["--fsdp_size", "2", "--lora_r", "8"], r"`--lora_r` 8 with \['--fsdp_size'\]"),
    (["--fsdp_size", "2", "--checkpointing_steps", "5"], r"`--checkpointing_steps`.* with \['--fsdp_size'\]"),
    (["--fsdp_size", "0"], r"`--fsdp_size` must be >= 1, got 0"),
])
def test_parallel_sizes_the_recipes_cannot_run_are_refused_in_one_line(flags, message):
    args = training.parse_args(load_recipe("classification").build_parser(),
                               ["--model_name_or_path", "x", "--train_file", "t.csv", "--output_dir", "o", *flags])
    with pytest.raises(training.RecipeError, match=message) as err:
        training.validate_args(args)
    assert "\n" not in str(err.value)
