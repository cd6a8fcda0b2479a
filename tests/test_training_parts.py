"""The recipes' training parts: which parameters are routing parameters, what LoRA leaves trainable,
what gets weight decay."""

import types

import pytest
import torch

import hf_condcomp
from hf_condcomp import training

from conftest import VOCAB, tiny_source

VARIANTS = {
    "moe": dict(variant="moe", num_experts=4, top_k=2, init="noise", layers="all"),
    "mod": dict(variant="mod", capacity=0.5, layers="all"),
    "gate": dict(variant="gate", layers="all", gate_init_bias=0.0),
}
# What each routing parameter's module is called in each variant (checked against the type-based set).
ROUTING_NAMES = {"moe": ("mlp.gate.weight", "intermediate.gate.weight"),
                 "mod": ("mod_router.weight", "mod_predictor."), "gate": ("compute_gate.weight", "compute_gate.bias")}


def upcycled(family, variant):
    task = "sequence-classification" if family == "bert" else None
    return hf_condcomp.upcycle(tiny_source(family, task), **VARIANTS[variant]).train()


def loss_of(model, family):
    ids = torch.randint(1, VOCAB, (4, 9), generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 2, 0]) if family == "bert" else ids
    return model(input_ids=ids, labels=labels).loss


def lora_args(family, variant, weight_decay=0.0):
    # PEFT cannot put LoRA on GPT-2's Conv1D attention and on parameters at once: one target there.
    targets = ("experts" if variant == "moe" else "attention") if family == "gpt2" else "attention,experts"
    return types.SimpleNamespace(lora_r=4, lora_alpha=8, lora_dropout=0.0, lora_targets=targets,
                                 lora_trainable="classifier,score", learning_rate=1e-2, router_learning_rate=None,
                                 weight_decay=weight_decay)


LORA_TARGETS = {  # what each source's attention and experts are named
    "bert": (["attention.output.dense", "attention.self.key", "attention.self.query", "attention.self.value"],
             ["intermediate.experts.down_proj", "intermediate.experts.up_proj"]),
    "gpt2": (["attn.c_attn", "attn.c_proj"], ["mlp.experts.down_proj", "mlp.experts.up_proj"]),
    "llama": (["self_attn.k_proj", "self_attn.o_proj", "self_attn.q_proj", "self_attn.v_proj"],
              ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"]),
}


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_lora_targets_are_read_off_the_modules(family, variant):
    attention, experts = LORA_TARGETS[family]
    model = upcycled(family, variant)
    assert training.lora_targets(model, {"attention", "experts"}) == (attention, experts if variant == "moe" else [])
    assert training.lora_targets(model, {"attention"}) == (attention, [])


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_lora_keeps_every_routing_parameter_trainable_and_they_learn(family, variant):
    model = training.apply_lora(upcycled(family, variant), lora_args(family, variant))
    routing = training.routing_parameter_names(model)
    expected = {n for n, _ in model.named_parameters() if any(part in n for part in ROUTING_NAMES[variant])}
    if family == "bert" and variant == "mod":  # encoders route by their router alone: no causal predictor
        expected = {n for n in expected if "mod_predictor" not in n}
    assert routing and routing == expected, (routing ^ expected)
    params = dict(model.named_parameters())
    assert all(params[n].requires_grad for n in routing)
    lora = [n for n, p in params.items() if "lora_" in n and p.requires_grad]
    assert lora, "LoRA adapters are applied"
    if variant == "moe" and lora_args(family, variant).lora_targets != "attention":
        assert any("experts" in n for n in lora)

    before = {n: params[n].detach().clone() for n in routing}
    optimizer = training.make_optimizer(model, lora_args(family, variant))
    for _ in range(2):
        loss_of(model, family).backward()
        optimizer.step()
        optimizer.zero_grad()
    unchanged = [n for n in routing if torch.equal(params[n], before[n])]
    assert not unchanged, unchanged


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_no_bias_or_norm_gets_weight_decay(family, variant):
    model = upcycled(family, variant)
    optimizer = training.make_optimizer(model, lora_args(family, variant, weight_decay=0.1))
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = [names[id(p)] for g in optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]]
    not_decayed = [names[id(p)] for g in optimizer.param_groups if g["weight_decay"] == 0 for p in g["params"]]
    assert decayed and not_decayed
    for name in decayed:
        leaf = name.rsplit(".", 1)[-1]
        assert not leaf.endswith("bias") and not leaf.startswith("b_") and "norm" not in name.lower(), name
    if variant == "moe" and family in ("bert", "gpt2"):  # (E, out) expert biases: 2-D, yet biases
        expert_biases = [n for n in not_decayed if "experts." in n and n.endswith("_bias")]
        assert len(expert_biases) == 2 * len(model.config.moe_layers), expert_biases
    # The dense parts follow the same rule as in the dense parent.
    assert any(n.endswith("bias") for n in not_decayed) or family == "llama"
    assert sorted(decayed + not_decayed) == sorted(names.values())
