"""Native export: upcycled Llama-family MoEs written as MixtralForCausalLM / Qwen2MoeForCausalLM
load without hf_condcomp and without trust_remote_code, and give the same logits and greedy tokens;
what no native architecture expresses is refused before anything is written."""

import json
import re
import subprocess
import sys

import pytest
import torch

import hf_condcomp
from hf_condcomp.export import ExportError, choose_format

from conftest import VOCAB, run_clean_python, tiny_source

PROMPT = torch.tensor([[0, 0, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14]])  # left-padded, as generation batches are
PROMPT_MASK = (torch.arange(6) >= torch.tensor([[2], [0]])).long()


def export_cli(*args):
    return subprocess.run([sys.executable, "-m", "hf_condcomp.cli", "export", *map(str, args)], capture_output=True,
                          text=True, timeout=900)


def assert_native_matches(model, native_dir, tmp_path, architecture, ids, mask=None, max_new_tokens=8):
    """Load `native_dir` in a clean process (hf_condcomp blocked, trust_remote_code off) and compare
    its logits and greedy tokens with `model`'s."""
    model.eval()
    with torch.no_grad():
        logits = model(ids).logits
    greedy = model.generate(PROMPT, attention_mask=PROMPT_MASK, max_new_tokens=max_new_tokens, do_sample=False,
                            pad_token_id=0)
    torch.save({"ids": ids, "prompt": PROMPT, "mask": PROMPT_MASK}, tmp_path / "inputs.pt")
    assert not list(native_dir.glob("*.py")), "a native export carries no code"
    config = json.loads((native_dir / "config.json").read_text())
    assert config["architectures"] == [architecture] and "auto_map" not in config
    run_clean_python(
        f"""
import torch, transformers
inputs = torch.load({str(tmp_path / 'inputs.pt')!r})
model = transformers.AutoModelForCausalLM.from_pretrained({str(native_dir)!r}).eval()  # trust_remote_code off
assert (type(model).__name__ == {architecture!r}
        and type(model).__module__.startswith("transformers.models")), type(model)
with torch.no_grad():
    logits = model(inputs["ids"]).logits
greedy = model.generate(inputs["prompt"], attention_mask=inputs["mask"], max_new_tokens={max_new_tokens},
                        do_sample=False, pad_token_id=0)
torch.save({{"logits": logits, "greedy": greedy}}, {str(tmp_path / 'native.pt')!r})
""",
        cwd=tmp_path,
    )
    native = torch.load(tmp_path / "native.pt")
    torch.testing.assert_close(native["logits"], logits, atol=1e-4, rtol=0)
    assert torch.equal(native["greedy"], greedy)


@pytest.mark.parametrize("family,layers,architecture", [
    ("llama", "all", "MixtralForCausalLM"),
    ("llama", "every_other", "Qwen2MoeForCausalLM"),
    ("qwen2", "every_other", "Qwen2MoeForCausalLM"),  # q/k/v biases
    ("qwen2", "all", "Qwen2MoeForCausalLM"),  # Mixtral has no attention biases
    ("mistral", "all", "MixtralForCausalLM"),
    ("qwen3", "all", "Qwen3MoeForCausalLM"),  # per-head q/k norms
    ("qwen3", "every_other", "Qwen3MoeForCausalLM"),
])
def test_native_export_of_noisy_experts_matches(tmp_path, family, layers, architecture):
    # Noise makes the experts differ, so a router or expert mapped to the wrong place shows.
    model = hf_condcomp.upcycle(tiny_source(family), num_experts=4, top_k=2, init="noise", noise_std=0.3,
                                layers=layers)
    model.save_pretrained(tmp_path / "ours")
    proc = export_cli(tmp_path / "ours", tmp_path / "native")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout)["architecture"] == architecture
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    assert_native_matches(model, tmp_path / "native", tmp_path, architecture, ids)


@pytest.mark.parametrize("name,layers,architecture", [
    ("mistral", "all", "MixtralForCausalLM"),  # sliding window 4 < the 9 tokens and the 14 generated
    ("qwen3", "every_other", "Qwen3MoeForCausalLM"),
])
def test_native_family_models_export_too(tmp_path, name, layers, architecture):
    """Models of Llama-family sources: transformers' own weights under their own names, our MoE settings,
    a Mistral's sliding window kept."""
    from test_native import dense_model

    model = hf_condcomp.upcycle(dense_model(name), num_experts=4, top_k=2, init="noise", noise_std=0.3, layers=layers)
    assert model.config.model_type == "condcomp"
    model.save_pretrained(tmp_path / "ours")
    proc = export_cli(tmp_path / "ours", tmp_path / "native")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout)["architecture"] == architecture
    if name == "mistral":
        assert json.loads((tmp_path / "native" / "config.json").read_text())["sliding_window"] == 4
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    assert_native_matches(model, tmp_path / "native", tmp_path, architecture, ids)


@pytest.mark.parametrize("name,layers,feature", [
    ("mistral", "every_other", "a sliding window of 4 in every layer"),
    ("qwen2", "all", "'qwen2' sliding-window attention in some layers"),
    ("phi3", "all", "upcycled from 'phi3'"),
])
def test_native_family_models_no_native_moe_expresses_are_refused(name, layers, feature):
    from test_native import dense_model

    model = hf_condcomp.upcycle(dense_model(name), num_experts=4, top_k=2, layers=layers)
    with pytest.raises(ExportError, match=f"cannot export natively: .*{re.escape(feature)}"):
        choose_format(model.config)


def test_top_k_weights_not_renormalised_go_to_qwen2_moe(tmp_path):
    model = hf_condcomp.upcycle(tiny_source("llama"), num_experts=4, top_k=2, init="noise", noise_std=0.3,
                                layers="all", norm_topk_prob=False)
    assert choose_format(model.config) == "qwen2_moe"
    with pytest.raises(ExportError, match="norm_topk_prob"):
        choose_format(model.config, "mixtral")
    model.save_pretrained(tmp_path / "ours")
    assert export_cli(tmp_path / "ours", tmp_path / "native").returncode == 0
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    assert_native_matches(model, tmp_path / "native", tmp_path, "Qwen2MoeForCausalLM", ids)


@pytest.mark.slow
@pytest.mark.parametrize("layers,architecture", [("all", "MixtralForCausalLM"), ("every_other", "Qwen2MoeForCausalLM")])
def test_native_export_of_copy_upcycled_smollm2(tmp_path, smollm2_path, layers, architecture):
    ours = tmp_path / "ours"
    up = subprocess.run([sys.executable, "-m", "hf_condcomp.cli", "upcycle", str(smollm2_path), str(ours),
                         "--num-experts", "4", "--top-k", "2", "--layers", layers], capture_output=True, text=True,
                        timeout=900)
    assert up.returncode == 0, up.stderr[-3000:]
    proc = export_cli(ours, tmp_path / "native")
    assert proc.returncode == 0, proc.stderr[-3000:]
    native_dir = tmp_path / "native"
    for needed in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "model.safetensors"):
        assert (native_dir / needed).exists(), needed
    from transformers import AutoTokenizer

    model = hf_condcomp.CondCompForCausalLM.from_pretrained(ours)
    text = ["The capital of France is Paris, and the capital of Germany is", "Experts route each token to a few"]
    ids = AutoTokenizer.from_pretrained(native_dir)(text, return_tensors="pt", padding=True).input_ids[:, :7]
    assert_native_matches(model, native_dir, tmp_path, architecture, ids, max_new_tokens=6)
    ours_generation = json.loads((ours / "generation_config.json").read_text())
    native_generation = json.loads((native_dir / "generation_config.json").read_text())
    assert {k: v for k, v in ours_generation.items() if k != "transformers_version"} == \
        {k: v for k, v in native_generation.items() if k != "transformers_version"}


REFUSED = [
    ("llama", dict(routing="expert_choice"), "`moe_routing`='expert_choice'"),
    ("llama", dict(capacity_factor=1.25), "`moe_capacity_factor`=1.25"),
    ("llama", dict(variant="mod", layers="all"), "`mod_layers`"),
    ("llama", dict(mod_layers="all"), "`mod_layers`"),
    ("llama", dict(variant="gate", layers="all"), "`gate_layers`"),
    ("llama", dict(init="split-random", num_experts=4, top_k=2), "`router_unit_weights`"),
    ("gpt2", dict(), "upcycled from 'gpt2'"),
    ("bert", dict(), "upcycled from 'bert'"),
]


@pytest.mark.parametrize("family,kwargs,feature", REFUSED)
def test_unsupported_features_exit_2_and_write_nothing(tmp_path, family, kwargs, feature):
    model = hf_condcomp.upcycle(tiny_source(family), **{"num_experts": 4, **kwargs})
    model.save_pretrained(tmp_path / "ours")
    out = tmp_path / "native"
    proc = export_cli(tmp_path / "ours", out)
    assert proc.returncode == 2, proc.stderr
    message = proc.stderr.strip()
    assert len(message.splitlines()) == 1 and "Traceback" not in message, message
    assert "cannot export natively" in message and feature in message, message
    assert not out.exists()
    # An existing, empty OUTPUT_DIR stays empty.
    out.mkdir()
    assert export_cli(tmp_path / "ours", out).returncode == 2
    assert not any(out.iterdir())


def test_qwen3_moe_needs_a_qwen3_source_and_mixtral_no_attention_bias():
    llama = hf_condcomp.upcycle(tiny_source("llama"), num_experts=4, layers="all")
    with pytest.raises(ExportError, match="`qwen3_moe` needs a Qwen3 source"):
        choose_format(llama.config, "qwen3_moe")
    qwen3 = hf_condcomp.upcycle(tiny_source("qwen3"), num_experts=4, layers="all")
    with pytest.raises(ExportError, match="no per-head query/key norms.*Use --format qwen3_moe"):
        choose_format(qwen3.config, "mixtral")
    qwen2 = hf_condcomp.upcycle(tiny_source("qwen2"), num_experts=4, layers="all")
    with pytest.raises(ExportError, match="attention biases.*Use --format qwen2_moe"):
        choose_format(qwen2.config, "mixtral")
    with pytest.raises(ExportError, match="`--format` must be one of"):
        choose_format(llama.config, "deepseek")


def test_a_format_registered_outside_the_package_is_offered_by_the_cli_and_exports(tmp_path, capsys):
    """A new format is one `ExportFormat` subclass and one register call: here Mixtral's config and key
    map under another name, as a module of its own would bring them."""
    from hf_condcomp.cli import main as cli_main
    from hf_condcomp.exporters import EXPORT_FORMATS, register_export_format
    from hf_condcomp.exporters.mixtral import MixtralFormat

    @register_export_format
    class ToyMixtral(MixtralFormat):
        name = "toy_mixtral"

    try:
        with pytest.raises(SystemExit):
            cli_main(["export", "--help"])
        assert "toy_mixtral" in capsys.readouterr().out
        model = hf_condcomp.upcycle(tiny_source("llama"), num_experts=4, top_k=2, init="noise", noise_std=0.3,
                                    layers="all")
        model.save_pretrained(tmp_path / "ours")
        assert choose_format(model.config) == "mixtral"  # `auto` tries the built-in formats first
        assert cli_main(["export", str(tmp_path / "ours"), str(tmp_path / "native"), "--format", "toy_mixtral"]) == 0
        assert json.loads(capsys.readouterr().out)["format"] == "toy_mixtral"
        from transformers import AutoModelForCausalLM, MixtralForCausalLM

        native = AutoModelForCausalLM.from_pretrained(tmp_path / "native").eval()  # trust_remote_code off
        assert type(native) is MixtralForCausalLM
        ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            torch.testing.assert_close(native(ids).logits, model.eval()(ids).logits, atol=1e-4, rtol=0)
    finally:
        EXPORT_FORMATS.pop("toy_mixtral")
