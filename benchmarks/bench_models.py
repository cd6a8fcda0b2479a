"""Whole upcycled models against their dense parents, and against transformers' native Mixtral.

- all-MiniLM-L6-v2 dense vs upcycled (8 experts, top-2 and top-1, every other layer): a training
  step (forward + backward + AdamW) and an inference forward at batch 32 x 128. Top-2 computes two
  FFNs per token in 3 of the 6 layers; top-1 computes the dense model's FLOPs plus the router, so
  its ratio is the cost of the MoE machinery itself.
- SmolLM2-135M-Instruct dense vs upcycled the same way: greedy decoding tokens/s at batch 1.
- SmolLM2 copy-upcycled into `MixtralForCausalLM` (every layer MoE, 8 experts, top-2, experts
  identical copies of the dense FFN, as mergekit-moe builds it) vs our upcycle with the same
  settings (transformers' own LlamaForCausalLM with our MoE blocks, `smol-moe-all`): training step
  at batch 4 x 128 and greedy decoding, in one group with the dense model and Mixtral.
- Peak training memory (max RSS growth of a fresh process running the training steps) against the
  dense run plus the added expert parameters, gradients and AdamW state (4 x 4 bytes per param).

All timings of one model family run interleaved in one process; ratios are what to read.

    python benchmarks/bench_models.py --out bench_models.json
    python benchmarks/bench_models.py --quick
"""

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import hf_condcomp  # noqa: E402
from hf_condcomp.assets import minilm_path, smollm2_path  # noqa: E402

from common import interleaved_medians, interleaved_times, machine_info, paired_ratios, print_table, write_json  # noqa: E402


def mixtral_from_llama(dense):
    """Copy-upcycle a Llama checkpoint into transformers' MixtralForCausalLM (every layer, 8 x top-2)."""
    from transformers import MixtralConfig, MixtralForCausalLM

    c = dense.config
    config = MixtralConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                           num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
                           num_key_value_heads=c.num_key_value_heads, head_dim=getattr(c, "head_dim", None),
                           max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.rms_norm_eps,
                           rope_parameters=getattr(c, "rope_parameters", None), hidden_act=c.hidden_act,
                           tie_word_embeddings=c.tie_word_embeddings, num_local_experts=8, num_experts_per_tok=2,
                           sliding_window=None, bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id,
                           pad_token_id=c.pad_token_id)
    model = MixtralForCausalLM(config)
    src = dense.state_dict()
    dst = model.state_dict()
    new = {}
    for key in dst:
        if ".mlp.experts." in key or ".mlp.gate." in key:
            continue
        new[key] = src[key]
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}.mlp."
        gate, up, down = (src[p + f"{n}_proj.weight"] for n in ("gate", "up", "down"))
        experts_prefix = p + "experts."
        if experts_prefix + "gate_up_proj" in dst:  # transformers >= 5: fused 3-D expert params
            new[experts_prefix + "gate_up_proj"] = torch.cat([gate, up], 0).unsqueeze(0).expand(8, -1, -1).clone()
            new[experts_prefix + "down_proj"] = down.unsqueeze(0).expand(8, -1, -1).clone()
        else:
            for e in range(8):
                new[f"{experts_prefix}{e}.w1.weight"] = gate
                new[f"{experts_prefix}{e}.w3.weight"] = up
                new[f"{experts_prefix}{e}.w2.weight"] = down
        new[p + "gate.weight"] = dst[p + "gate.weight"].normal_(std=0.02)
    missing, unexpected = model.load_state_dict(new, strict=False)
    assert not unexpected and all("lm_head" in k for k in missing), (missing, unexpected)
    return model.eval()


def build(name):
    from transformers import AutoModel, AutoModelForCausalLM

    if name == "minilm-dense":
        return AutoModel.from_pretrained(minilm_path())
    if name == "minilm-moe":
        return hf_condcomp.upcycle(str(minilm_path()), num_experts=8, top_k=2, layers="every_other")
    if name == "minilm-moe-top1":  # the dense model's FLOPs plus the router: the MoE machinery's own cost
        return hf_condcomp.upcycle(str(minilm_path()), num_experts=8, top_k=1, layers="every_other")
    dense = AutoModelForCausalLM.from_pretrained(smollm2_path())
    if name == "smol-dense":
        return dense
    if name == "smol-moe":
        return hf_condcomp.upcycle(str(smollm2_path()), num_experts=8, top_k=2, layers="every_other")
    if name == "smol-moe-all":
        return hf_condcomp.upcycle(str(smollm2_path()), num_experts=8, top_k=2, layers="all")
    if name == "smol-mixtral":
        return mixtral_from_llama(dense)
    raise ValueError(name)


def train_step(model, batch, seq, causal, optimizer=True):
    """Forward + backward (+ fused AdamW step, as the recipes run it). Without `optimizer` gradients are dropped after
    each step: the every-layer SmolLM2 MoEs hold ~1.3 B expert parameters and AdamW state for two of them
    does not fit this machine's memory next to each other."""
    torch.manual_seed(0)
    ids = torch.randint(5, 1000, (batch, seq))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, fused=True) if optimizer else None
    model.train()

    def run():
        out = model(input_ids=ids, labels=ids) if causal else model(input_ids=ids)
        loss = out.loss if causal else out.last_hidden_state.float().square().mean()
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        else:
            model.zero_grad(set_to_none=True)
    return run


def infer(model, batch, seq):
    ids = torch.randint(5, 1000, (batch, seq))

    def run():
        model.eval()
        with torch.no_grad():
            model(input_ids=ids)
    return run


def decode(model, new_tokens):
    ids = torch.tensor([[1, 504, 3458, 314, 253, 1345, 30]])

    def run():
        model.eval()
        with torch.no_grad():
            model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    return run


def param_count(model):
    return sum(p.numel() for p in model.parameters())


def _status_kib(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def memory_child(name, batch, seq, steps):
    """In a fresh process: peak RSS over `steps` training steps minus the RSS before them (bytes).

    Building the model (upcycling copies weights) peaks higher than training does, so the
    high-water mark is reset first (`5 > /proc/self/clear_refs`, Linux >= 4.0)."""
    model = build(name)
    causal = not name.startswith("minilm")
    run = train_step(model, batch, seq, causal)
    before = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    for _ in range(steps):
        run()
    peak = _status_kib("VmHWM")
    print(json.dumps({"peak_growth_bytes": (peak - before) * 1024, "params": param_count(model)}))


def peak_memory(name, batch, seq, steps):
    cmd = [sys.executable, __file__, "--memory-child", name, str(batch), str(seq), str(steps)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    try:
        return json.loads(out.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        print(out.stderr[-2000:])
        return {"peak_growth_bytes": None, "params": None}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller batches, fewer tokens and repeats")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--mixtral-repeats", type=int, default=None,
                        help="rounds of the groups with Mixtral (default 7, 2 with --quick)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's choice); "
                             "1 avoids oversubscription on small shared machines")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--out", default=None)
    parser.add_argument("--memory-child", nargs=4, metavar=("NAME", "BATCH", "SEQ", "STEPS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        name, batch, seq, steps = args.memory_child
        memory_child(name, int(batch), int(seq), int(steps))
        return

    info = machine_info()  # at the start: the commit and load the run began with
    repeats = args.repeats or (2 if args.quick else 3)
    mixtral_repeats = args.mixtral_repeats or (2 if args.quick else 7)
    mb, ms = (8, 128) if args.quick else (32, 128)  # MiniLM batch x seq
    lb, ls = (2, 64) if args.quick else (4, 128)  # SmolLM2 training batch x seq
    new_tokens = 8 if args.quick else 32
    rows = []

    # all-MiniLM-L6-v2: training step and inference forward
    models = {n: build(n) for n in ("minilm-dense", "minilm-moe", "minilm-moe-top1")}
    fns = {}
    for n, m in models.items():
        fns[f"{n}/train"] = train_step(m, mb, ms, causal=False)
        fns[f"{n}/infer"] = infer(m, mb, ms)
    med = interleaved_medians(fns, repeats)
    for what, shape in (("train", f"{mb}x{ms}"), ("infer", f"{mb}x{ms}")):
        for n, k in (("minilm-moe", 2), ("minilm-moe-top1", 1)):
            d, m = med[f"minilm-dense/{what}"], med[f"{n}/{what}"]
            rows.append({"bench": f"MiniLM {what} step (top-{k})", "shape": shape, "dense_s": d, "moe_s": m,
                         "moe/dense": m / d, "target": "<= 1.03"})
    del models, fns

    # SmolLM2-135M: dense vs ours every other layer (decoding), then dense vs ours every layer vs
    # native Mixtral every layer (training step without optimizer state, and decoding)
    vs_mixtral = {}
    groups = ((("smol-dense", "smol-moe"), False), (("smol-dense", "smol-moe-all", "smol-mixtral"), True))
    for names, train in groups:  # every ratio is within one group: measured side by side
        models = {n: build(n) for n in names}
        fns = {f"{n}/decode": decode(m, new_tokens) for n, m in models.items()}
        if train:
            fns.update({f"{n}/train": train_step(m, lb, ls, causal=True, optimizer=False) for n, m in models.items()})
        times = interleaved_times(fns, mixtral_repeats if train else repeats)
        got = {name: statistics.median(t) for name, t in times.items()}
        group = " vs ".join(names[1:])
        for n in names[1:]:
            d, m = got["smol-dense/decode"], got[f"{n}/decode"]
            rows.append({"bench": f"SmolLM2 decode tok/s ({n})", "shape": f"1x{new_tokens} new", "group": group,
                         "dense_s": new_tokens / d, "moe_s": new_tokens / m, "moe/dense": d / m,
                         "target": ">= 0.70" if n == "smol-moe" else "Mixtral's or better"})
            if train:
                d, m = got["smol-dense/train"], got[f"{n}/train"]
                rows.append({"bench": f"SmolLM2 train step ({n})", "shape": f"{lb}x{ls}", "group": group,
                             "dense_s": d, "moe_s": m, "moe/dense": m / d, "target": "Mixtral's or better"})
        if "smol-mixtral" in names:  # ours / Mixtral time ratios round by round (< 1: ours faster)
            vs_mixtral[names[1]] = {w: paired_ratios(times, f"{names[1]}/{w}", f"smol-mixtral/{w}")
                                    for w in ("train", "decode")}
        counts = {n: param_count(m) for n, m in models.items()}
        del models, fns

    memory = []
    if not args.no_memory:
        steps = 2
        for dense_name, moe_names, (b, s) in (("minilm-dense", ["minilm-moe"], (mb, ms)),
                                             ("smol-dense", ["smol-moe"], (lb, ls))):
            base = peak_memory(dense_name, b, s, steps)
            for moe_name in moe_names:
                moe = peak_memory(moe_name, b, s, steps)
                if base["peak_growth_bytes"] is None or moe["peak_growth_bytes"] is None:
                    continue
                added = (moe["params"] - base["params"]) * 4 * 4  # fp32 weights, grads, AdamW m and v
                budget = base["peak_growth_bytes"] + 1.10 * added
                memory.append({"model": moe_name, "shape": f"{b}x{s}",
                               "dense_MiB": base["peak_growth_bytes"] / 2**20,
                               "moe_MiB": moe["peak_growth_bytes"] / 2**20,
                               "budget_MiB": budget / 2**20, "within": moe["peak_growth_bytes"] <= budget})

    print(f"\nWhole models, CPU fp32, repeats={repeats}; machine: {info}")
    table = print_table(rows, ["bench", "shape", "group", "dense_s", "moe_s", "moe/dense", "target"])
    print("(decode rows: dense_s / moe_s columns hold tokens/s)")
    mem_table = (print_table(memory, ["model", "shape", "dense_MiB", "moe_MiB", "budget_MiB", "within"])
                 if memory else "")
    print("ours / Mixtral, round by round (time ratios, < 1: ours faster):", json.dumps(vs_mixtral, indent=1))
    write_json(args.out, {"machine": info, "repeats": repeats,
                          "mixtral_repeats": mixtral_repeats, "rows": rows, "memory": memory, "vs_mixtral": vs_mixtral,
                          "param_counts": counts, "table": table, "memory_table": mem_table})


if __name__ == "__main__":
    main()
