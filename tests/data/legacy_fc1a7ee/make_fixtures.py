"""Writes the folders next to this file: models saved by release fc1a7ee of hf_condcomp, the last
release that held the source's model under `backbone.` (weights `backbone.model.layers...`, the
source's config nested as `text_config`), one per model kind (BERT classifier and base model, GPT-2
and Llama causal LMs, a Marian translator) and variant, each with the outputs that release computed
(`expected.safetensors`). tests/test_legacy_folders.py loads them through their saved remote code and
through the installed package and compares.

It must run with THAT release's package, not this checkout's. From the checkout's root:

    git worktree add /tmp/legacy_fc1a7ee fc1a7ee
    PYTHONPATH=/tmp/legacy_fc1a7ee .venv/bin/python tests/data/legacy_fc1a7ee/make_fixtures.py
    git worktree remove /tmp/legacy_fc1a7ee

The machinery (inputs, seeded routing weights, float64 re-check, the expected outputs' format) is
that of ../legacy_ab4d721/make_fixtures.py, imported from there; this file names the fixtures and
the routing parameters of this release's layout.
"""

import importlib.util
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoModelForSeq2SeqLM, MarianConfig, MarianMTModel

import hf_condcomp

HERE = Path(__file__).resolve().parent
RELEASE = "fc1a7ee"
_spec = importlib.util.spec_from_file_location("legacy_ab4d721_fixtures", HERE.parent / "legacy_ab4d721" /
                                               "make_fixtures.py")
base = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(base)

MOE = dict(base.MOE, layers="all")
FIXTURES = {  # folder: (family, task, upcycle settings)
    "bert_moe": ("bert", "sequence-classification", MOE),
    "bert_base_mod": ("bert", "base", base.VARIANTS["mod"]),
    "gpt2_gate": ("gpt2", "causal-lm", base.VARIANTS["gate"]),
    "llama_moe": ("llama", "causal-lm", MOE),
    "llama_moe_mod": ("llama", "causal-lm", base.VARIANTS["moe_mod"]),
    "marian_moe": ("marian", "seq2seq-lm", MOE),
}
AUTO_CLASS = {**base.AUTO_CLASS, "seq2seq-lm": AutoModelForSeq2SeqLM}
ROUTING = (".router.", ".mod_router.", ".mod_predictor.w_", ".compute_gate.weight")
BIASES = (".mod_predictor.b_", ".compute_gate.bias")


def dense_source(family, task, seed):
    if family != "marian":
        return base.dense_source(family, task, seed)
    torch.manual_seed(seed)
    config = MarianConfig(vocab_size=base.VOCAB, d_model=base.HIDDEN, encoder_layers=base.LAYERS,
                          decoder_layers=base.LAYERS, encoder_attention_heads=2, decoder_attention_heads=2,
                          encoder_ffn_dim=base.INTER, decoder_ffn_dim=base.INTER,
                          max_position_embeddings=base.POSITIONS, pad_token_id=base.PAD, eos_token_id=2,
                          decoder_start_token_id=base.PAD, forced_eos_token_id=None)
    return MarianMTModel(config)


def perturb_routing(model, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.startswith(("classifier.", "backbone.classifier.")):
                param.copy_(torch.randn(param.shape, generator=gen))
            elif any(part in name for part in ROUTING):
                param.copy_(torch.randn(param.shape, generator=gen) * base.ROUTING_STD)
            elif any(part in name for part in BIASES):
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)


def forward(model, input_ids, attention_mask, key):
    extra = {"decoder_input_ids": input_ids} if model.config.upcycling["task"] == "seq2seq-lm" else {}
    with torch.no_grad():
        return getattr(model(input_ids=input_ids, attention_mask=attention_mask, **extra), key)


def make(name, family, task, spec, seed, workdir):
    source = f"tiny-random-{family}-{task}"  # relative: the config records this name, not a temp path
    if not (workdir / source).exists():
        dense_source(family, task, seed=0).save_pretrained(workdir / source)
    kwargs = dict(task=task, seed=seed, **spec)
    if task == "sequence-classification":
        kwargs["num_labels"] = 3
    model = hf_condcomp.upcycle(source, **kwargs).eval()
    input_ids, attention_mask = base.inputs(seed)
    key = "last_hidden_state" if task == "base" else "logits"
    base.forward = forward  # routing_record runs the model through it
    for attempt in range(100):
        perturb_routing(model, 1000 * seed + attempt)
        fractions, experts = base.routing_record(model, input_ids, attention_mask, key)
        if all(0 < f < 1 for f in fractions) and all(e > spec.get("top_k", 0) for e in experts):
            break
    else:
        raise AssertionError(f"{name}: no draw of routing weights routes tokens both ways")
    output = forward(model, input_ids, attention_mask, key)
    tensors = {"input_ids": input_ids, "attention_mask": attention_mask, "output": output.contiguous()}
    if task == "sequence-classification":
        tensors["last_hidden_state"] = base.encoder_output(model, input_ids, attention_mask)
    if task in ("causal-lm", "seq2seq-lm"):
        tensors["generated"] = generated = base.greedy(model, input_ids, attention_mask)
    model.double()
    torch.testing.assert_close(output, forward(model, input_ids, attention_mask, key).float(), atol=1e-5, rtol=1e-4)
    if "generated" in tensors:
        assert torch.equal(generated, base.greedy(model, input_ids, attention_mask)), name
    model.float()
    folder = HERE / name
    if folder.exists():
        shutil.rmtree(folder)
    model.save_pretrained(folder)
    save_file(tensors, folder / "expected.safetensors",
              metadata={"expected": json.dumps({"auto_class": AUTO_CLASS[task].__name__, "output": key,
                                                "release": RELEASE}, sort_keys=True)})
    base.check_folder(folder)
    return fractions, experts


def main():
    package = Path(hf_condcomp.__file__).resolve().parent
    if HERE.parents[2] in package.parents or not (package / "modeling" / "modeling_condcomp.py").exists():
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
