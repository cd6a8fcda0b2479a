"""One MoE layer, forward + backward: grouped vs eager vs a dense FFN of equal active compute.

The dense baseline is Linear(H, k*I) -> GELU -> Linear(k*I, H): the FLOPs each token spends in its
k experts of width I (plus bias). "eager" is the reference implementation in
`hf_condcomp/modeling/experts.py` (a Python loop of two `F.linear` per expert over rows already
sorted by expert), not a one-hot-mask loop, so the speed-up it reports is not inflated.
Routing, dispatch and combine are timed as part of the MoE layer. Experts are BERT/GPT-2 style
(GELU, biases). On CUDA the layer runs in bf16 and adds `megablocks` when it is installed.

    python benchmarks/bench_moe_layer.py --out bench_moe_layer.json          # full grid
    python benchmarks/bench_moe_layer.py --quick                            # one small shape
"""

import argparse
import itertools
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hf_condcomp.modeling.moe import MoEFeedForward  # noqa: E402

from common import cpu_peak_bytes, interleaved_medians, machine_info, print_table, write_json  # noqa: E402


def moe_layer(hidden, ffn, experts, top_k, implementation):
    config = SimpleNamespace(num_local_experts=experts, num_experts_per_tok=top_k, moe_routing="token_choice",
                             moe_capacity_factor=None, norm_topk_prob=True, router_unit_weights=False,
                             router_jitter_noise=0.0, moe_implementation=implementation,
                             moe_expert_intermediate_size=ffn)
    layer = MoEFeedForward(config, hidden, gated=False, bias=True, hidden_act="gelu", causal=False)
    with torch.no_grad():
        layer.experts.up_proj.normal_(std=0.02)
        layer.experts.down_proj.normal_(std=0.02)
        layer.gate.weight.normal_(std=0.02)
    return layer


def dense_ffn(hidden, width):
    return nn.Sequential(nn.Linear(hidden, width), nn.GELU(), nn.Linear(width, hidden))


def step(module, x, is_moe):
    def run():
        module.zero_grad(set_to_none=True)
        out = module(x)[0] if is_moe else module(x)
        out.float().square().mean().backward()
    return run


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one small shape, few repeats")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's choice); "
                             "1 avoids oversubscription on small shared machines")
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--no-eager", action="store_true", help="skip the (slow) eager loop")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory pass (CPU: the profiler)")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    info = machine_info()  # at the start: the commit and load the run began with

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32
    if args.quick:
        grid = [(384, 1536, 8, 2048), (384, 1536, 32, 2048)]
        repeats = args.repeats or 3
    else:
        grid = [(h, f, e, n)
                for (h, f), e, n in itertools.product([(384, 1536), (768, 3072)], [8, 32, 64], [2048, 4096])]
        repeats = args.repeats or 5
    impls = ["grouped"] + ([] if args.no_eager else ["eager"])
    if cuda:
        from hf_condcomp.modeling import experts as experts_mod

        if experts_mod._megablocks_gg is not None:
            impls.insert(0, "megablocks")

    rows = []
    for hidden, ffn, experts, tokens in grid:
        torch.manual_seed(0)
        x = torch.randn(1, tokens, hidden, device=device, dtype=dtype, requires_grad=True)
        fns = {"dense": step(dense_ffn(hidden, args.top_k * ffn).to(device, dtype), x, False)}
        for impl in impls:
            fns[impl] = step(moe_layer(hidden, ffn, experts, args.top_k, impl).to(device, dtype), x, True)
        sync = torch.cuda.synchronize if cuda else None
        med = interleaved_medians(fns, repeats, sync=sync)
        row = {"hidden": hidden, "ffn": ffn, "experts": experts, "tokens": tokens}
        for name, t in med.items():
            row[f"{name}_s"] = t
        row["grouped/dense"] = med["grouped"] / med["dense"]
        if "eager" in med:
            row["eager/grouped"] = med["eager"] / med["grouped"]
        if "megablocks" in med:
            row["megablocks/dense"] = med["megablocks"] / med["dense"]
        for name, fn in ([] if args.no_memory else fns.items()):
            if cuda:
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                fn()
                peak = torch.cuda.max_memory_allocated() - base
            else:
                peak = cpu_peak_bytes(fn)  # tensors allocated by one fwd+bwd: activations and gradients
            row[f"{name}_peak_MiB"] = None if peak is None else peak / 2**20
        rows.append(row)
        print(f"  done {hidden}/{ffn} E={experts} N={tokens}: grouped/dense {row['grouped/dense']:.2f}", flush=True)

    columns = ["hidden", "ffn", "experts", "tokens", "dense_s"] + [f"{i}_s" for i in impls]
    columns += ["grouped/dense"] + (["eager/grouped"] if "eager" in impls else [])
    columns += (["megablocks/dense"] if "megablocks" in impls else [])
    columns += [] if args.no_memory else [f"{name}_peak_MiB" for name in ["dense", *impls]]
    print(f"\nMoE layer fwd+bwd, top-{args.top_k}, {dtype}, {device}; machine: {info}")
    table = print_table(rows, columns)
    write_json(args.out, {"machine": info, "device": device, "dtype": str(dtype), "top_k": args.top_k,
                          "repeats": repeats, "rows": rows, "table": table})


if __name__ == "__main__":
    main()
