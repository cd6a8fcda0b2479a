"""Writes the folders next to this file: models saved by release ab4d721 of hf_condcomp, one per
hand-written family (BERT, GPT-2, Llama) and variant (MoE, MoD, gates, MoE + MoD), each with the
outputs that release computed (`expected.safetensors`). tests/test_legacy_folders.py loads them
through their saved remote code and through the installed package and compares.

It must run with THAT release's package, not this checkout's. From the checkout's root:

    git worktree add /tmp/legacy_ab4d721 ab4d721
    PYTHONPATH=/tmp/legacy_ab4d721 .venv/bin/python tests/data/legacy_ab4d721/make_fixtures.py
    git worktree remove /tmp/legacy_ab4d721

(the script refuses to run with any other hf_condcomp than a checkout outside this one). It
rewrites every folder, byte for byte the same on the same transformers and torch. Nothing is
trained: sources are tiny random models (seeded), and after upcycling the routers, MoD predictors
and gates get seeded random weights large enough that every routed or gated layer keeps some
tokens and skips others and every MoE layer uses more than top-k experts, with decisions far from
their thresholds: the script recomputes every output in float64 and requires the same result.

expected.safetensors holds `input_ids` and `attention_mask` (row 0 full, row 1 padded on the
right), `output` (logits; last_hidden_state for the base model), for the classifiers also
`last_hidden_state` (`hidden_states[-1]` of `output_hidden_states=True`) and, for decoders,
`generated`: `generate(row 0, max_new_tokens=4, do_sample=False)`. Its metadata has one entry,
`expected`, a JSON object naming the Auto class to load the folder with (`auto_class`) and what
`output` is (`output`): one entry, because safetensors writes several in a random order.
"""

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

import hf_condcomp

HERE = Path(__file__).resolve().parent
RELEASE = "ab4d721"
VOCAB, HIDDEN, INTER, LAYERS, POSITIONS = 64, 16, 32, 2, 32
BATCH, LENGTH, PADDED = 2, 8, 3  # row 1 has its last PADDED positions masked
PAD = 0

MOE = dict(variant="moe", num_experts=4, top_k=2, init="noise", noise_std=0.2)
VARIANTS = {
    "moe": MOE,  # MoE in every other layer (layer 1 of 2)
    "mod": dict(variant="mod", capacity=0.5, layers="all"),
    "gate": dict(variant="gate", layers="all"),
    "moe_mod": dict(MOE, mod_layers="all", capacity=0.5),  # layer 1 is both an MoE and a routed block
}
# folder: (family, task, upcycle settings)
FIXTURES = {
    **{f"bert_{name}": ("bert", "sequence-classification", spec) for name, spec in VARIANTS.items()},
    "bert_base_moe_mod": ("bert", "base", VARIANTS["moe_mod"]),
    **{f"gpt2_{name}": ("gpt2", "causal-lm", spec) for name, spec in VARIANTS.items()},
    **{f"llama_{name}": ("llama", "causal-lm", spec) for name, spec in VARIANTS.items()},
}
AUTO_CLASS = {"base": AutoModel, "sequence-classification": AutoModelForSequenceClassification,
              "causal-lm": AutoModelForCausalLM}
ROUTING_STD = 0.5  # std of the perturbed router / predictor / gate weights


def dense_source(family, task, seed):
    torch.manual_seed(seed)
    if family == "bert":
        config = BertConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=2,
                            intermediate_size=INTER, max_position_embeddings=POSITIONS, num_labels=3,
                            pad_token_id=PAD)
        return (BertModel if task == "base" else BertForSequenceClassification)(config)
    if family == "gpt2":
        config = GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=2, n_inner=INTER,
                            n_positions=POSITIONS, bos_token_id=1, eos_token_id=2, pad_token_id=PAD)
        return GPT2LMHeadModel(config)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=INTER, max_position_embeddings=POSITIONS,
                         bos_token_id=1, eos_token_id=2, pad_token_id=PAD)
    return LlamaForCausalLM(config)


def perturb_routing(model, seed):
    """Seeded random routers, MoD predictors and gates: non-trivial routing in eval mode. A
    classification head gets unit-scale weights too (its init, std 0.02, gives logits of ~1e-3
    that would hide a routing difference under the tests' tolerance)."""
    gen = torch.Generator().manual_seed(seed)
    changed = []
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.startswith("classifier."):
                param.copy_(torch.randn(param.shape, generator=gen))
            elif ".mlp.router." in name or ".mod_router." in name or ".mod_predictor.w_" in name \
                    or ".compute_gate.weight" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * ROUTING_STD)
            elif ".mod_predictor.b_" in name or ".compute_gate.bias" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)  # gates centred on the threshold
            else:
                continue
            changed.append(name)
    assert any(not name.startswith("classifier.") for name in changed), "no router or gate found"
    return changed


def inputs(seed):
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, VOCAB, (BATCH, LENGTH), generator=gen)
    attention_mask = torch.ones(BATCH, LENGTH, dtype=torch.long)
    attention_mask[1, LENGTH - PADDED:] = 0
    input_ids[1, LENGTH - PADDED:] = PAD
    return input_ids, attention_mask


def forward(model, input_ids, attention_mask, key):
    with torch.no_grad():
        return getattr(model(input_ids=input_ids, attention_mask=attention_mask), key)


def encoder_output(model, input_ids, attention_mask):
    """The encoder's last hidden state under a classification head (`hidden_states[-1]`)."""
    with torch.no_grad():
        return model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True).hidden_states[-1]


def routing_record(model, input_ids, attention_mask, key):
    """Share of the real tokens each MoD / gated layer kept (each strictly between 0 and 1), and
    the number of experts each MoE layer used (more than top-k)."""
    kept = [m for m in model.modules() if hasattr(m, "routing_log")]
    moe = [m for m in model.modules() if hasattr(m, "last_routing")]
    for m in kept + moe:
        m.record_routing = True
    forward(model, input_ids, attention_mask, key)
    real = attention_mask.bool()
    fractions = [float(m.routing_log[0][real].float().mean()) for m in kept]
    experts = [0 if m.last_routing is None else int((m.last_routing["counts"] > 0).sum()) for m in moe]
    for m in kept:
        m.record_routing, m.routing_log = False, []
    for m in moe:
        m.record_routing, m.last_routing = False, None
    return fractions, experts


def greedy(model, input_ids, attention_mask):
    with torch.no_grad():
        return model.generate(input_ids[:1], attention_mask=attention_mask[:1], max_new_tokens=4, do_sample=False)


def make(name, family, task, spec, seed, workdir):
    source = f"tiny-random-{family}-{task}"  # relative: the config records this name, not a temp path
    if not (workdir / source).exists():
        dense_source(family, task, seed=0).save_pretrained(workdir / source)
    kwargs = dict(task=task, seed=seed, **spec)
    if task == "sequence-classification":
        kwargs["num_labels"] = 3
    model = hf_condcomp.upcycle(source, **kwargs)
    assert model.config.upcycling["family"] == family, model.config.upcycling
    model.eval()
    input_ids, attention_mask = inputs(seed)
    key = "last_hidden_state" if task == "base" else "logits"
    # Random routing weights until every routed or gated layer keeps some real tokens and skips
    # others and every MoE layer uses more than top-k experts (a few draws at most).
    for attempt in range(100):
        perturb_routing(model, 1000 * seed + attempt)
        fractions, experts = routing_record(model, input_ids, attention_mask, key)
        routed = spec["variant"] != "moe" or "mod_layers" in spec  # then every layer is routed or gated
        assert len(fractions) == (LAYERS if routed else 0) and len(experts) == (spec["variant"] == "moe")
        if all(0 < f < 1 for f in fractions) and all(e > spec["top_k"] for e in experts):
            break
    else:
        raise AssertionError(f"{name}: no draw of routing weights routes tokens both ways")
    output = forward(model, input_ids, attention_mask, key)
    tensors = {"input_ids": input_ids, "attention_mask": attention_mask, "output": output.contiguous()}
    if task == "sequence-classification":  # the logits read [CLS] only: keep every token's state too
        tensors["last_hidden_state"] = encoder_output(model, input_ids, attention_mask)
    if task == "causal-lm":
        generated = greedy(model, input_ids, attention_mask)
        assert generated.shape[1] == LENGTH + 4, generated  # no early end of sequence
        tensors["generated"] = generated
    # No decision near its threshold: float64 makes the same ones.
    model.double()
    torch.testing.assert_close(output, forward(model, input_ids, attention_mask, key).float(), atol=1e-5, rtol=1e-4)
    if "last_hidden_state" in tensors:
        hidden = encoder_output(model, input_ids, attention_mask).float()
        torch.testing.assert_close(tensors["last_hidden_state"], hidden, atol=1e-5, rtol=1e-4)
    if task == "causal-lm":
        assert torch.equal(generated, greedy(model, input_ids, attention_mask)), name
    model.float()
    folder = HERE / name
    if folder.exists():
        shutil.rmtree(folder)
    model.save_pretrained(folder)
    save_file(tensors, folder / "expected.safetensors",
              metadata={"expected": json.dumps({"auto_class": AUTO_CLASS[task].__name__, "output": key,
                                                "release": RELEASE}, sort_keys=True)})
    check_folder(folder)
    return fractions, experts


def check_folder(folder):
    """The folder carries its remote code: config.json's auto_map names modules that are there."""
    config = json.loads((folder / "config.json").read_text())
    auto_map = config.get("auto_map")
    assert auto_map and "AutoConfig" in auto_map, folder
    for reference in auto_map.values():
        assert (folder / (reference.split(".")[0] + ".py")).is_file(), (folder, reference)
    assert (folder / "configuration_condcomp.py").is_file()


def main():
    package = Path(hf_condcomp.__file__).resolve().parent
    if HERE.parents[2] in package.parents or not (package / "modeling" / "modeling_condcomp_bert.py").exists():
        sys.exit(f"hf_condcomp comes from {package}: put a checkout of {RELEASE} on PYTHONPATH (see the docstring)")
    torch.use_deterministic_algorithms(True)
    workdir = Path(tempfile.mkdtemp(prefix="legacy_sources_"))
    cwd = os.getcwd()
    os.chdir(workdir)
    try:
        for seed, (name, (family, task, spec)) in enumerate(FIXTURES.items()):
            fractions, experts = make(name, family, task, spec, seed, workdir)
            print(f"{name}: routed/gated layers kept {[round(f, 2) for f in fractions]} of the tokens, "
                  f"MoE layers used {experts} experts")
    finally:
        os.chdir(cwd)
        shutil.rmtree(workdir)


if __name__ == "__main__":
    main()
