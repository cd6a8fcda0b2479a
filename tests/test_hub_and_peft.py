"""Saved models load without hf_condcomp through trust_remote_code; PEFT LoRA fits the experts."""

import json

import pytest
import torch

import hf_condcomp

from conftest import VOCAB, run_clean_python, tiny_source

CASES = [
    ("bert", "sequence-classification", "AutoModelForSequenceClassification"),
    ("bert", "masked-lm", "AutoModelForMaskedLM"),
    ("gpt2", None, "AutoModelForCausalLM"),
    ("llama", None, "AutoModelForCausalLM"),
]


@pytest.mark.parametrize("family,task,auto", CASES)
def test_saved_model_loads_in_a_clean_process_without_hf_condcomp(tmp_path, family, task, auto):
    moe = hf_condcomp.upcycle(tiny_source(family, task), num_experts=4, top_k=2, init="noise", noise_std=0.3)
    folder = tmp_path / "model"
    moe.save_pretrained(folder)
    files = sorted(p.name for p in folder.iterdir())
    assert "model.safetensors" in files and "configuration_condcomp.py" in files
    config = json.loads((folder / "config.json").read_text())
    assert auto in config["auto_map"] and "AutoConfig" in config["auto_map"]

    ids = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(0))
    torch.save(ids, tmp_path / "ids.pt")
    with torch.no_grad():
        expected = moe(ids).logits
    run_clean_python(
        f"""
import torch, transformers
model = transformers.{auto}.from_pretrained({str(folder)!r}, trust_remote_code=True).eval()
assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
with torch.no_grad():
    torch.save(model(torch.load({str(tmp_path / 'ids.pt')!r})).logits, {str(tmp_path / 'out.pt')!r})
try:
    transformers.{auto}.from_pretrained({str(folder)!r}, trust_remote_code=False)
except ValueError as err:
    assert "trust_remote_code" in str(err), err
else:
    raise SystemExit("loaded without trust_remote_code")
""",
        cwd=tmp_path,
    )
    assert torch.equal(torch.load(tmp_path / "out.pt"), expected)


def test_saved_decoder_generates_in_a_clean_process(tmp_path):
    moe = hf_condcomp.upcycle(tiny_source("llama"), init="noise", noise_std=0.3)
    moe.save_pretrained(tmp_path / "m")
    prompt = torch.tensor([[5, 6, 7, 8]])
    expected = moe.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)
    run_clean_python(
        f"""
import torch, transformers
m = transformers.AutoModelForCausalLM.from_pretrained({str(tmp_path / 'm')!r}, trust_remote_code=True)
out = m.generate(torch.tensor([[5, 6, 7, 8]]), max_new_tokens=8, do_sample=False, pad_token_id=0)
assert out.tolist() == {expected.tolist()!r}, out.tolist()
""",
        cwd=tmp_path,
    )


def test_local_registration_loads_without_remote_code(tmp_path):
    from transformers import AutoModelForCausalLM

    moe = hf_condcomp.upcycle(tiny_source("gpt2"))
    moe.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)  # hf_condcomp is imported: its classes serve
    assert type(loaded) is hf_condcomp.CondCompForCausalLM
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():  # same weights; BLAS may block differently on other memory, hence 1e-6
        torch.testing.assert_close(loaded(ids).logits, moe(ids).logits, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("family,attention,experts", [
    ("bert", ["query", "value"], ["intermediate.experts.up_proj", "intermediate.experts.down_proj"]),
    ("llama", ["q_proj", "v_proj"], ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]),
])
def test_peft_lora_on_attention_and_experts(family, attention, experts):
    from peft import LoraConfig, get_peft_model

    moe = hf_condcomp.upcycle(tiny_source(family), num_experts=4, layers="all")
    ids = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(0))

    def out(m):
        with torch.no_grad():
            o = m(input_ids=ids)
        return o.logits if getattr(o, "logits", None) is not None else o.last_hidden_state

    reference = out(moe)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=attention, target_parameters=experts,
                        modules_to_save=["gate"])
    peft_model = get_peft_model(moe, config)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert any("lora_A" in n and "experts" in n for n in trainable)
    assert any("lora_A" in n and attention[0] in n for n in trainable)
    assert any(".gate." in n and "experts" not in n for n in trainable)
    torch.testing.assert_close(out(peft_model), reference)  # an adapter at init changes nothing

    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    adapted = out(peft_model)
    assert (adapted - reference).abs().max() > 1e-3
    with peft_model.disable_adapter():
        torch.testing.assert_close(out(peft_model), reference)
    merged = peft_model.merge_and_unload()
    torch.testing.assert_close(out(merged), adapted, rtol=1e-4, atol=1e-4)
