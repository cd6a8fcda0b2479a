"""Our MoE block against transformers' `MixtralSparseMoeBlock` with the same weights, one layer.

SmolLM2-135M's shapes (hidden 576, FFN 1536), 8 experts, top-2, SwiGLU, no biases; the router
weights are shared, so both route every token alike and their outputs are compared first. Timed
side by side in rotated rounds (`common.interleaved_medians`):

- a training step of the layer: forward + backward at batch 4 x 128 (512 tokens);
- one decoding step: forward of 1 token, no grad;
- an inference forward at 512 tokens, no grad.

This isolates the experts, routing, dispatch and combine from the rest of a model, to tell whether
transformers' own experts implementation (whatever `MixtralExperts` runs by default on the
installed release) is faster than ours for these shapes, so that the faster one is used.

    python benchmarks/bench_vs_mixtral_layer.py --threads 1 --out bench_vs_mixtral_layer.json
"""

import argparse
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hf_condcomp.modeling.moe import MoEFeedForward  # noqa: E402

from common import interleaved_medians, machine_info, print_table, write_json  # noqa: E402


def build(hidden=576, ffn=1536, experts=8, top_k=2):
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    torch.manual_seed(0)
    mixtral_config = MixtralConfig(hidden_size=hidden, intermediate_size=ffn, num_local_experts=experts,
                                   num_experts_per_tok=top_k, num_hidden_layers=1, num_attention_heads=4, vocab_size=8)
    # What MixtralForCausalLM picks when it is built (`grouped_mm` on transformers 5.24 with this
    # torch); a bare block would otherwise run the default loop.
    mixtral_config._experts_implementation = experts_implementation(mixtral_config)
    mixtral = MixtralSparseMoeBlock(mixtral_config)
    config = SimpleNamespace(num_local_experts=experts, num_experts_per_tok=top_k, moe_routing="token_choice",
                             moe_capacity_factor=None, norm_topk_prob=True, router_unit_weights=False,
                             router_jitter_noise=0.0, moe_implementation="grouped",
                             moe_expert_intermediate_size=ffn)
    ours = MoEFeedForward(config, hidden, gated=True, bias=False, hidden_act="silu", causal=True)
    with torch.no_grad():
        for p in mixtral.parameters():
            p.normal_(std=0.02)
        ours.experts.gate_up_proj.copy_(mixtral.experts.gate_up_proj)  # [gate; up], (E, 2I, H)
        ours.experts.down_proj.copy_(mixtral.experts.down_proj)
        ours.gate.weight.copy_(mixtral.gate.weight)
    return ours, mixtral


def experts_implementation(config):
    from transformers import MixtralForCausalLM

    small = type(config)(**{**config.to_dict(), "hidden_size": 16, "intermediate_size": 16, "num_attention_heads": 2,
                            "num_key_value_heads": 2, "head_dim": 8})
    return MixtralForCausalLM(small).config._experts_implementation


def call(layer, x):
    out = layer(x)
    return out[0] if isinstance(out, tuple) else out


def mixtral_config_of(block):
    return block.experts.config if hasattr(block.experts, "config") else block.config


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    info = machine_info()
    ours, mixtral = build()
    layers = {"ours": ours, "mixtral": mixtral}
    g = torch.Generator().manual_seed(1)
    x_train, x_token = torch.randn(4, 128, 576, generator=g), torch.randn(1, 1, 576, generator=g)
    with torch.no_grad():
        diff = float((call(ours, x_train) - call(mixtral, x_train)).abs().max())

    def train(layer):
        def run():
            x = x_train.clone().requires_grad_()
            call(layer, x).square().mean().backward()
            layer.zero_grad(set_to_none=True)
        return run

    def forward(layer, x):
        def run():
            with torch.no_grad():
                call(layer, x)
        return run

    fns = {}
    for name, layer in layers.items():
        fns[f"{name}/train"] = train(layer)
        fns[f"{name}/decode"] = forward(layer, x_token)
        fns[f"{name}/infer"] = forward(layer, x_train)
    med = interleaved_medians(fns, args.repeats)
    rows = [{"bench": what, "shape": shape, "ours_ms": 1e3 * med[f"ours/{what}"],
             "mixtral_ms": 1e3 * med[f"mixtral/{what}"], "ours/mixtral": med[f"ours/{what}"] / med[f"mixtral/{what}"]}
            for what, shape in (("train", "512 tokens, fwd+bwd"), ("decode", "1 token"), ("infer", "512 tokens"))]
    print(f"\nOne MoE layer, SmolLM2 shapes, 8 experts top-2; max |ours - Mixtral| = {diff:.2e} "
          f"(|out| max {float(call(ours, x_train).abs().max()):.2e}); Mixtral experts: "
          f"{mixtral_config_of(mixtral)._experts_implementation}; machine: {info}")
    table = print_table(rows, ["bench", "shape", "ours_ms", "mixtral_ms", "ours/mixtral"])
    write_json(args.out, {"machine": info, "repeats": args.repeats, "max_abs_diff": diff, "rows": rows,
                          "mixtral_experts_implementation": mixtral_config_of(mixtral)._experts_implementation,
                          "table": table})


if __name__ == "__main__":
    main()
