"""Encoder-decoder models upcycled against their dense parents: a Marian-base-shaped translation
model (d_model 512, 6 + 6 layers, FFN 2048, 8 heads, vocabulary 58101, as Helsinki-NLP/opus-mt-*;
random weights, so nothing is downloaded) and its MoE upcycles (8 experts on every other layer of
both stacks, top-2 and top-1).

- Training step: forward + backward + fused AdamW (as the recipes run it) at batch 8 x 64 source
  tokens / 64 target tokens.
- Greedy decoding at batch 1: 32 new tokens (forced) from a 16-token source.

Top-2 computes two FFNs per token in 3 of the 6 layers of each stack; top-1 computes the dense
model's FLOPs plus the router, so its ratio is the cost of the MoE machinery itself. All models run
interleaved in one process; read the ratios (`paired` in the JSON: per-round ratios).

    python benchmarks/bench_seq2seq.py --threads 1 --out benchmarks/results/bench_seq2seq.json
    python benchmarks/bench_seq2seq.py --quick
"""

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing
import hf_condcomp  # noqa: E402

from common import interleaved_times, machine_info, paired_ratios, print_table, write_json  # noqa: E402

MARIAN_BASE = dict(vocab_size=58101, d_model=512, encoder_layers=6, decoder_layers=6, encoder_attention_heads=8,
                   decoder_attention_heads=8, encoder_ffn_dim=2048, decoder_ffn_dim=2048, max_position_embeddings=512,
                   pad_token_id=58100, eos_token_id=0, decoder_start_token_id=58100, forced_eos_token_id=0)
TOY = dict(MARIAN_BASE, vocab_size=1000, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
           decoder_attention_heads=4, encoder_ffn_dim=256, decoder_ffn_dim=256, max_position_embeddings=128,
           pad_token_id=999, decoder_start_token_id=999)
MOES = {"moe-top2": 2, "moe-top1": 1}


def build(shape):
    """The dense Marian model and its MoE upcycles (8 experts, every other layer of both stacks)."""
    from transformers import MarianConfig, MarianMTModel

    torch.manual_seed(0)
    dense = MarianMTModel(MarianConfig(**shape)).eval()
    models = {"dense": dense}
    for name, top_k in MOES.items():
        models[name] = hf_condcomp.upcycle(dense, num_experts=8, top_k=top_k, layers="every_other")
    return models


def train_step(model, batch, source_len, target_len, vocab):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, vocab - 1, (batch, source_len), generator=g)
    labels = torch.randint(5, vocab - 1, (batch, target_len), generator=g)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, fused=True)

    def run():
        model.train()
        torch.manual_seed(0)  # the same dropout masks each call
        model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return run


def decode(model, source_len, new_tokens, vocab):
    ids = torch.randint(5, vocab - 1, (1, source_len), generator=torch.Generator().manual_seed(1))

    def run():
        model.eval()
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                 num_beams=1)
        assert out.shape[1] == new_tokens + 1, out.shape  # the decoder start token and the new ones
    return run


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a toy model, small batches, one round (a smoke test)")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved rounds (default 5, 1 with --quick)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's choice); 1 avoids oversubscription on small shared "
                             "machines")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    info = machine_info()  # at the start: the commit and load the run began with
    shape = TOY if args.quick else MARIAN_BASE
    repeats = args.repeats or (1 if args.quick else 5)
    batch, source_len, target_len = (2, 16, 16) if args.quick else (8, 64, 64)
    decode_source, new_tokens = (8, 4) if args.quick else (16, 32)
    vocab = shape["vocab_size"]

    models = build(shape)
    fns = {}
    for name, model in models.items():
        fns[f"{name}/train"] = train_step(model, batch, source_len, target_len, vocab)
        fns[f"{name}/decode"] = decode(model, decode_source, new_tokens, vocab)
    times = interleaved_times(fns, repeats)
    med = {name: statistics.median(t) for name, t in times.items()}

    rows, paired = [], {}
    for name, top_k in MOES.items():
        d, m = med["dense/train"], med[f"{name}/train"]
        rows.append({"bench": f"train step (s), top-{top_k}", "shape": f"{batch}x{source_len}/{target_len}",
                     "dense": d, "moe": m, "moe/dense": m / d})
        d, m = med["dense/decode"], med[f"{name}/decode"]
        rows.append({"bench": f"greedy decode (tok/s), top-{top_k}", "shape": f"1x{new_tokens} new",
                     "dense": new_tokens / d, "moe": new_tokens / m, "moe/dense": d / m})
        paired[name] = {what: paired_ratios(times, f"{name}/{what}", f"dense/{what}") for what in ("train", "decode")}
    params = {name: sum(p.numel() for p in model.parameters()) for name, model in models.items()}

    print(f"\nEncoder-decoder (Marian-shaped{', toy' if args.quick else ''}), CPU fp32, repeats={repeats}; "
          f"machine: {info}")
    table = print_table(rows, ["bench", "shape", "dense", "moe", "moe/dense"])
    print("(decode rows: tokens/s, moe/dense is the speed ratio; train rows: seconds, moe/dense is the time ratio)")
    write_json(args.out, {"machine": info, "repeats": repeats, "model": shape, "moe_layers": "every_other, both stacks",
                          "num_experts": 8, "rows": rows, "paired_time_ratios": paired, "param_counts": params,
                          "table": table})
    return rows


if __name__ == "__main__":
    main()
