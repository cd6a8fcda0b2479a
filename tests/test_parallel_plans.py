"""The parallel plans of an upcycled model, run by transformers' own engine: a saved model loaded with

    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 script.py   # in script.py:
    AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True,
                                         distributed_config=DistributedConfig(...))

on two processes (gloo, CPU) computes what one process computes. One launch runs every case (`RUNS`):
`ep_size=2` (each MoE layer's experts split, E/2 per rank) on tiny upcycled Llamas (MoE in every layer,
through our experts function and through transformers' `grouped_mm`; MoE in every other layer), a BERT
encoder (plain experts with biases) and T5 and Marian encoder-decoders; `fsdp_size=2` (an FSDP unit per
layer of every stack) on a Llama, a Llama with tied embeddings, a Mixture-of-Depths Llama, BERT, T5 and
Marian; HSDP (`dp_replicate_size=2`), FSDP with EP and TP with EP on the Llama; TP on the Mixture-of-Depths
Llama. Inside the ranks, each run records a world of 2 and every parameter's placements, which the tests
assert (so the engine really ran), and compares the logits, the loss (task plus router losses) and every
gradient, gathered whole from the shards, with the single-process model computed here beforehand. The
routing that the engine's top-k dispatch cannot carry, and an expert count the ranks cannot share evenly,
are refused when the model is built, in one line naming the field.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORLD = 2
TOLERANCE = 1e-5  # fp32; the ranks run the same products on fewer rows per expert
SEQ2SEQ = ("t5", "marian")


def _inputs(case):
    """The batch of `case`: right padding in row 1, labels for the task head."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 99, (3, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0
    inputs = {"input_ids": ids, "attention_mask": mask}
    if case == "bert":
        inputs["labels"] = torch.tensor([0, 1, 2])
    elif case in SEQ2SEQ:
        inputs["decoder_input_ids"] = torch.randint(3, 99, (3, 5), generator=g)
        inputs["labels"] = torch.randint(3, 99, (3, 5), generator=g)
    else:
        inputs["labels"] = ids.masked_fill(mask == 0, -100)
    return inputs


def _auto_class(case):
    import transformers

    if case == "bert":
        return transformers.AutoModelForSequenceClassification
    return transformers.AutoModelForSeq2SeqLM if case in SEQ2SEQ else transformers.AutoModelForCausalLM


def _load_kwargs(case):
    """transformers' own experts function (it masks the routes to other ranks' experts itself); ours otherwise."""
    return {"experts_implementation": "grouped_mm"} if case.endswith("grouped_mm") else {}


def _forward_backward(model, inputs):
    """(logits, loss, {name: grad}) with gradients, and the logits without."""
    model.zero_grad()
    out = model(**inputs)
    out.loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    with torch.no_grad():
        no_grad_logits = model(**inputs).logits
    return out.logits.detach(), out.loss.detach(), grads, no_grad_logits


# --- inside the ranks (torchrun runs this file) -----------------------------------------------------------


def _gather(tensor):
    """The whole tensor of a rank's shard (a collective: every rank calls it, in the same order)."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def _rank_main(root):
    import torch.distributed as dist
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor
    from transformers.distributed import DistributedConfig
    from transformers.distributed import expert_parallel as engine

    calls = {"AllToAllEP": 0, "AllReduceEP": 0}
    for cls in (engine.AllToAllEP, engine.AllReduceEP):
        def counted(self, *args, _call=cls.__call__, _name=cls.__name__):
            calls[_name] += 1
            return _call(self, *args)
        cls.__call__ = counted

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    root = Path(root)
    results = {"world_size": world, "runs": {}}
    for run, (case, plan) in json.loads((root / "runs.json").read_text()).items():
        folder = root / case
        ref = torch.load(folder / "reference.pt")
        try:
            model = _auto_class(case).from_pretrained(folder, trust_remote_code=True, dtype=torch.float32,
                                                      distributed_config=DistributedConfig(**plan),
                                                      **_load_kwargs(case)).eval()
        except ValueError as error:
            results["runs"][run] = {"refused": str(error)}
            continue
        params = {name: {"placements": [repr(p) for p in t.placements] if isinstance(t, DTensor) else None,
                         "local_shape": list(t.to_local().shape if isinstance(t, DTensor) else t.shape),
                         "requires_grad": t.requires_grad}
                  for name, t in model.named_parameters()}
        calls.update(dict.fromkeys(calls, 0))
        logits, loss, grads, no_grad_logits = _forward_backward(model, ref["inputs"])
        grad_diff, missing, frozen = 0.0, [], []
        for name, grad in grads.items():  # every rank gathers every gradient, in the same order
            expected = ref["grads"][name]
            if not params[name]["requires_grad"]:
                frozen.append(name)
                continue
            if grad is None or expected is None:
                missing += [name] if (grad is None) != (expected is None) else []
                continue
            grad_diff = max(grad_diff, (_gather(grad) - expected).abs().max().item())
        results["runs"][run] = {
            "num_experts": model.config.num_local_experts,
            "params": params,
            "fsdp_units": sorted(name for name, m in model.named_modules() if isinstance(m, FSDPModule)),
            "module_num_experts": sorted({m.num_experts for n, m in model.named_modules() if n.endswith(".experts")}),
            "calls": dict(calls),
            "logits": (_gather(logits) - ref["logits"]).abs().max().item(),
            "no_grad_logits": (_gather(no_grad_logits) - ref["no_grad_logits"]).abs().max().item(),
            "loss": abs(_gather(loss).item() - ref["loss"].item()),
            "grad": grad_diff,
            "grads_compared": len(grads),
            "missing_grads": missing,
            "frozen": frozen,
        }
        del model
    (root / f"rank{rank}.json").write_text(json.dumps(results, indent=1))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    _rank_main(sys.argv[1])
    sys.exit(0)


# --- the test process ----------------------------------------------------------------------------------

import hf_condcomp  # noqa: E402

from conftest import free_port, tiny_source  # noqa: E402

MOE = dict(num_experts=4, top_k=2, init="noise", noise_std=0.3)  # experts apart, so routing matters


def _seq2seq_source(name):
    import transformers as T

    common = dict(vocab_size=99, d_model=32, num_heads=4)
    if name == "t5":
        config = T.T5Config(**common, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, dropout_rate=0.0,
                            decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    elif name == "bart":
        config = T.BartConfig(vocab_size=99, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                              decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
                              max_position_embeddings=64, dropout=0.0)
    else:
        config = T.MarianConfig(vocab_size=99, d_model=32, encoder_layers=2, decoder_layers=2,
                                encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                                decoder_ffn_dim=64, max_position_embeddings=64, dropout=0.0, pad_token_id=1,
                                bos_token_id=0, eos_token_id=2, decoder_start_token_id=1)
    torch.manual_seed(0)
    return T.AutoModelForSeq2SeqLM.from_config(config).eval()


def _build(case):
    if case in ("llama_all", "llama_all_grouped_mm"):
        model = hf_condcomp.upcycle(tiny_source("llama"), layers="all", **MOE)
    elif case == "llama_every_other":
        model = hf_condcomp.upcycle(tiny_source("llama"), layers=[1, 3], **MOE)
    elif case == "llama_tied":  # one embedding for input and head, as SmolLM2's
        model = hf_condcomp.upcycle(tiny_source("llama", tie_word_embeddings=True), layers=[1, 3], **MOE)
    elif case == "bert":
        source = tiny_source("bert", "sequence-classification", hidden_dropout_prob=0.0,
                             attention_probs_dropout_prob=0.0)
        model = hf_condcomp.upcycle(source, layers=[1, 3], **MOE)
    elif case == "llama_mod":  # a Mixture-of-Depths routed block on layer 1, no experts
        model = hf_condcomp.upcycle(tiny_source("llama"), variant="mod", capacity=0.5, layers="1")
    elif case == "expert_choice":
        model = hf_condcomp.upcycle(tiny_source("llama"), layers=[1, 3], routing="expert_choice", **MOE)
    else:
        model = hf_condcomp.upcycle(_seq2seq_source(case), layers="all", **MOE)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # routers apart from the copy's: tokens spread over both ranks' experts, MoD skips some
        for name, p in model.named_parameters():
            if (name.endswith(".gate.weight") and p.shape[0] == MOE["num_experts"]) or "mod_router" in name:
                p.copy_(torch.randn(p.shape, generator=g))
    return model


MODELS = ["llama_all", "llama_every_other", "llama_all_grouped_mm", "llama_tied", "llama_mod", "bert", "t5",
          "marian", "expert_choice"]
EP = {"ep_size": WORLD, "tp_plan": {}}  # tp_plan={}: the expert-parallel plan alone
EP_CASES = ["llama_all", "llama_every_other", "llama_all_grouped_mm", "bert", "t5", "marian"]
FSDP_CASES = ["llama_every_other", "llama_tied", "llama_mod", "bert", "t5", "marian"]
# every stack of layers of each model, as the source names it: each layer is an FSDP unit of its own
STACKS = {"llama_every_other": ["model.layers"], "llama_tied": ["model.layers"], "llama_mod": ["model.layers"],
          "bert": ["bert.encoder.layer"],
          "t5": ["encoder.block", "decoder.block"], "marian": ["model.encoder.layers", "model.decoder.layers"]}
FROZEN_POSITIONS = ["model.encoder.embed_positions.weight", "model.decoder.embed_positions.weight"]
RUNS = {  # run: (saved model, DistributedConfig's fields), all in one launch
    **{f"ep/{case}": (case, EP) for case in EP_CASES},
    "ep/expert_choice": ("expert_choice", EP),
    **{f"fsdp/{case}": (case, {"fsdp_size": WORLD}) for case in FSDP_CASES},
    "hsdp/llama_every_other": ("llama_every_other", {"dp_replicate_size": WORLD}),
    "fsdp_ep/llama_every_other": ("llama_every_other", {"fsdp_size": WORLD, "ep_size": WORLD}),
    "tp_ep/llama_every_other": ("llama_every_other", {"tp_size": WORLD, "ep_size": WORLD}),
    "tp/llama_mod": ("llama_mod", {"tp_size": WORLD}),
}


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Saves every model with its single-process reference, launches torchrun once, returns each rank's record."""
    root = tmp_path_factory.mktemp("parallel_plans")
    for case in MODELS:
        folder = root / case
        _build(case).save_pretrained(folder)
        inputs = _inputs(case)
        # the reference is the saved folder loaded in this process, as the ranks load it
        model = _auto_class(case).from_pretrained(folder, trust_remote_code=True, dtype=torch.float32,
                                                  **_load_kwargs(case)).eval()
        logits, loss, grads, no_grad_logits = _forward_backward(model, inputs)
        torch.save({"inputs": inputs, "logits": logits, "loss": loss, "grads": grads,
                    "no_grad_logits": no_grad_logits}, folder / "reference.pt")
    (root / "runs.json").write_text(json.dumps(RUNS))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={WORLD}",
               "--master_addr=127.0.0.1", f"--master_port={free_port()}", __file__, str(root)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600,
                            cwd=Path(__file__).parent)
    assert result.returncode == 0, f"torchrun failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    records = [json.loads((root / f"rank{r}.json").read_text()) for r in range(WORLD)]
    for record in records:
        assert record["world_size"] == WORLD
    return [record["runs"] for record in records]


def _experts_params(got):
    return {name: p for name, p in got["params"].items() if ".experts." in name}


@pytest.mark.parametrize("case", EP_CASES)
def test_the_engine_splits_the_experts_over_the_ranks(ranks, case):
    for runs in ranks:
        got = runs[f"ep/{case}"]
        E = got["num_experts"]
        experts = _experts_params(got)
        assert experts and all(p["placements"] == ["Shard(dim=0)"] for p in experts.values()), experts
        assert {p["local_shape"][0] for p in experts.values()} == {E // WORLD}, experts
        assert got["module_num_experts"] == [E // WORLD], got
        # with gradients the engine exchanges tokens (all-to-all), without them it all-reduces
        assert got["calls"]["AllToAllEP"] > 0 and got["calls"]["AllReduceEP"] > 0, got


@pytest.mark.parametrize("run", [f"fsdp/{case}" for case in FSDP_CASES] + ["hsdp/llama_every_other"])
def test_fsdp_shards_every_layer_of_every_stack(ranks, run):
    """Each layer of each stack is an FSDP unit, and every parameter a `DTensor` split over the two ranks
    (FSDP: `Shard(0)` on the `fsdp` dim; HSDP: whole on each replica, `Replicate()` then `Shard(0)` on an
    `fsdp` dim of 1)."""
    case = run.split("/")[1]
    placements = ["Shard(dim=0)"] if run.startswith("fsdp") else ["Replicate()", "Shard(dim=0)"]
    for runs in ranks:
        got = runs[run]
        units = set(got["fsdp_units"])
        for stack in STACKS[case]:
            layers = {m.group(1) for name in got["params"] if (m := re.match(rf"({re.escape(stack)}\.\d+)\.", name))}
            assert len(layers) == (2 if case in SEQ2SEQ else 4), (stack, layers)
            assert layers <= units, (stack, layers - units)
            # and none of a layer's modules is a unit apart: the layer is gathered whole
            assert not any(u.startswith(f"{layer}.") for layer in layers for u in units), units
        assert "" in units  # the root unit holds the rest (embeddings, head)
        assert {tuple(p["placements"] or ()) for p in got["params"].values()} == {tuple(placements)}, got["params"]


def test_tensor_parallelism_with_ep_splits_attention_the_dense_ffns_and_the_experts(ranks):
    """`DistributedConfig(tp_size=2, ep_size=2)` on MoE layers 1 and 3: the source's TP plan splits the
    attention, the dense layers' FFNs (0 and 2) and the head; the expert-parallel plan splits each MoE
    layer's experts over the same two ranks; the routers and norms stay whole."""
    for runs in ranks:
        got = runs["tp_ep/llama_every_other"]
        params, E = got["params"], got["num_experts"]
        for i in range(4):
            for proj, dim in (("q_proj", 0), ("k_proj", 0), ("v_proj", 0), ("o_proj", 1)):
                assert params[f"model.layers.{i}.self_attn.{proj}.weight"]["placements"] == [f"Shard(dim={dim})"]
            assert params[f"model.layers.{i}.input_layernorm.weight"]["placements"] is None
        for i in (0, 2):
            for proj, dim in (("gate_proj", 0), ("up_proj", 0), ("down_proj", 1)):
                assert params[f"model.layers.{i}.mlp.{proj}.weight"]["placements"] == [f"Shard(dim={dim})"]
        for i in (1, 3):
            for name in ("gate_up_proj", "down_proj"):
                p = params[f"model.layers.{i}.mlp.experts.{name}"]
                assert p["placements"] == ["Shard(dim=0)"] and p["local_shape"][0] == E // WORLD, p
            assert params[f"model.layers.{i}.mlp.gate.weight"]["placements"] is None
        assert params["lm_head.weight"]["placements"] == ["Shard(dim=0)"]
        assert got["module_num_experts"] == [E // WORLD]
        assert got["calls"]["AllToAllEP"] > 0 and not got["fsdp_units"]


def test_tensor_parallelism_splits_a_routed_layer_as_the_dense_ones(ranks):
    """A Mixture-of-Depths layer keeps its source's modules: `tp_size=2` splits its attention and FFN as
    every other layer's; its router (`mod_router`) stays whole."""
    for runs in ranks:
        params = runs["tp/llama_mod"]["params"]
        for i in range(4):
            for proj, dim in (("q_proj", 0), ("o_proj", 1)):
                assert params[f"model.layers.{i}.self_attn.{proj}.weight"]["placements"] == [f"Shard(dim={dim})"]
            for proj, dim in (("gate_proj", 0), ("up_proj", 0), ("down_proj", 1)):
                assert params[f"model.layers.{i}.mlp.{proj}.weight"]["placements"] == [f"Shard(dim={dim})"]
        routers = [p for name, p in params.items() if "mod_router" in name]
        assert routers and all(p["placements"] is None for p in routers)


def test_fsdp_with_ep_shards_the_experts_over_the_expert_ranks_and_the_rest_by_layer(ranks):
    """`DistributedConfig(fsdp_size=2, ep_size=2)`: each MoE layer's experts split over the expert ranks
    (an FSDP unit of their own, on the `efsdp` dim of 1), every other parameter `Shard(0)` by FSDP."""
    for runs in ranks:
        got = runs["fsdp_ep/llama_every_other"]
        E = got["num_experts"]
        assert {f"model.layers.{i}" for i in range(4)} | {"model.layers.1.mlp.experts", "model.layers.3.mlp.experts"} \
            <= set(got["fsdp_units"])
        for name, p in got["params"].items():
            if ".experts." in name:
                assert p["placements"][-1] == "Shard(dim=0)" and p["local_shape"][0] == E // WORLD, (name, p)
            else:
                assert p["placements"] == ["Shard(dim=0)"], (name, p)
        assert got["calls"]["AllToAllEP"] > 0


@pytest.mark.parametrize("run", [r for r in RUNS if r != "ep/expert_choice"])
def test_logits_loss_and_every_gradient_equal_one_process(ranks, run):
    for runs in ranks:
        got = runs[run]
        assert not got["missing_grads"], got
        assert got["grads_compared"] > 0
        # Marian's sinusoidal position tables are frozen (`requires_grad=False`), as the engine keeps them;
        # transformers' single-process loading makes them trainable, so their gradients are not compared
        assert got["frozen"] == (FROZEN_POSITIONS if run == "fsdp/marian" else []), got["frozen"]
        for key in ("logits", "no_grad_logits", "loss", "grad"):
            assert got[key] <= TOLERANCE, (key, got[key])


def test_a_saved_expert_choice_model_is_refused_under_torchrun(ranks):
    for runs in ranks:
        message = runs["ep/expert_choice"]["refused"]
        assert "`moe_routing='expert_choice'`" in message and "ep_size=2" in message and "\n" not in message


def _config_with_ep(monkeypatch, model, ep_size=2, **fields):
    from transformers.distributed import DistributedConfig

    monkeypatch.setenv("WORLD_SIZE", str(ep_size))  # DistributedConfig derives tp_size from it
    config = model.config.__class__.from_dict(model.config.to_dict())
    for name, value in fields.items():
        setattr(config, name, value)
    config.distributed_config = DistributedConfig(ep_size=ep_size, tp_plan={})
    return config


@pytest.mark.parametrize(("fields", "named"), [
    ({"moe_routing": "expert_choice"}, "`moe_routing='expert_choice'`"),
    ({"moe_capacity_factor": 1.25}, "`moe_capacity_factor=1.25`"),
    ({"num_local_experts": 3, "num_experts_per_tok": 1}, "`num_local_experts=3`"),
])
def test_what_the_engine_cannot_run_is_refused_in_one_line(monkeypatch, fields, named):
    model = hf_condcomp.upcycle(tiny_source("llama"), layers=[1, 3], **MOE)
    config = _config_with_ep(monkeypatch, model, **fields)
    with pytest.raises(ValueError) as error:
        type(model)(config)
    message = str(error.value)
    assert named in message and "`ep_size=2`" in message and "\n" not in message


def test_the_plan_names_only_the_experts_and_only_under_ep(monkeypatch):
    """Without `ep_size` the plan is declared but unused (the model loads as before); it names each MoE
    layer's experts module and its parameters, with `*` for the layer numbers, as Qwen3-MoE's does."""
    model = hf_condcomp.upcycle(tiny_source("llama"), layers=[1, 3], **MOE)
    assert model.ep_plan == {"model.layers.*.mlp.experts.gate_up_proj": "grouped_gemm",
                             "model.layers.*.mlp.experts.down_proj": "grouped_gemm",
                             "model.layers.*.mlp.experts": "ep_dispatch_experts"}


@pytest.mark.parametrize(("case", "plan"), [
    # the source's own units (Llama's embeddings, final norm and head) and each layer of each stack
    ("llama_every_other", {"lm_head": "keep_full_weight", "model.embed_tokens": "free_full_weight",
                           "model.layers.*": "free_full_weight", "model.norm": "keep_full_weight"}),
    # the tied embedding and head are no units apart: the root unit shards them
    ("llama_tied", {"model.layers.*": "free_full_weight", "model.norm": "keep_full_weight"}),
    ("bert", {"bert.encoder.layer.*": "free_full_weight"}),
    # T5's and Marian's `embed_tokens` are the `shared` embedding: no unit apart, the root unit shards it
    ("t5", {"encoder.block.*": "free_full_weight", "decoder.block.*": "free_full_weight"}),
    ("marian", {"model.encoder.layers.*": "free_full_weight", "model.decoder.layers.*": "free_full_weight"}),
    ("bart", {"model.encoder.layers.*": "free_full_weight", "model.decoder.layers.*": "free_full_weight"}),
    ("gpt2", {"transformer.h.*": "free_full_weight"}),
    ("llama_mod", {"lm_head": "keep_full_weight", "model.embed_tokens": "free_full_weight",
                   "model.layers.*": "free_full_weight", "model.norm": "keep_full_weight"}),
])
def test_the_fsdp_plan_names_each_layer_of_every_stack(case, plan):
    """Found from the model's structure (lists of `GradientCheckpointingLayer`s or `_no_split_modules`
    classes), routed layers (Mixture-of-Depths on layer 1) included."""
    if case == "gpt2":
        model = hf_condcomp.upcycle(tiny_source("gpt2"), layers=[1, 3], **MOE)
    elif case == "bart":  # whose encoder and decoder tie their embeddings to `shared` in their own models
        model = hf_condcomp.upcycle(_seq2seq_source("bart"), layers="all", **MOE)
    else:
        model = _build(case)
    assert model.fsdp_plan == plan


def test_tensor_parallelism_alone_says_the_experts_stay_whole(monkeypatch):
    from transformers.testing_utils import CaptureLogger
    from transformers.utils import logging

    from hf_condcomp.modeling import parallel

    model = hf_condcomp.upcycle(tiny_source("llama"), layers=[1, 3], **MOE)
    config = _config_with_ep(monkeypatch, model)
    config.distributed_config.tp_size, config.distributed_config.ep_size = 2, 1
    parallel.logger.warning_once.cache_clear()
    with CaptureLogger(logging.get_logger(parallel.__name__)) as captured:
        parallel.check_parallel(config)
    assert captured.out.strip().count("\n") == 0
    assert "`tp_size=2` with `ep_size=1`" in captured.out and "ep_size=2)" in captured.out
