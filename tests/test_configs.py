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
from hf_condcomp.upcycle import INITS, VARIANTS

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
    args = training.parse_args(load_recipe(recipe).build_parser(), ["--config", str(path), "--output_dir", str(tmp_path)])
    assert args.model_name_or_path
    up = args.upcycling
    assert up, "every recipe config has an `upcycling:` section for dense checkpoints"
    assert up.get("variant", "moe") in VARIANTS
    assert up.get("init", "copy") in INITS
    assert up.get("routing", "token_choice") in ROUTING_TYPES
    assert 1 <= up.get("top_k", 2) <= up.get("num_experts", 8)
    for flag in ("train_file", "validation_file", "test_file"):
        value = getattr(args, flag)
        if value:  # line-aligned text pairs are given by their stem
            candidates = [ROOT / value] + [ROOT / f"{value}.{lang}" for lang in ("en", "de")]
            assert any(c.is_file() for c in candidates), f"{path.name}: `{flag}` {value} does not exist"
    if recipe == "dialogue":
        assert args.dataset_name == "chitchat" or args.train_file


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
        layer = raw["fsdp_config"]["fsdp_transformer_layer_cls_to_wrap"]
        from hf_condcomp.modeling import modeling_condcomp_llama

        assert hasattr(modeling_condcomp_llama, layer), f"{layer} is not a decoder layer class"
    else:
        assert raw["deepspeed_config"]["zero_stage"] in (0, 1, 2, 3)
