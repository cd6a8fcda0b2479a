"""Forward and training-step time of gated models next to their dense parent, on the CPU.

    python benchmarks/bench_gated.py --out outputs/bench_gated.json
    # what benchmarks/README.md's "Gated layers" table reports (one thread is steadier on a small shared machine)
    python benchmarks/bench_gated.py --threads 1 --capacities 1.0,0.75,0.5,0.25 --thresholds 0.3,0.7 \
        --repeats 5 --train-repeats 2 --out benchmarks/results/bench_gated.json

The dense parent is all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384) at batch 32 x sequence 128.
Gated variants, every layer:
  - Mixture-of-Depths at several capacities (routing by top-k; at init the router is zero, so
    which tokens are kept is arbitrary, but the compute is what a trained router would spend);
  - compute-allocation gates at several thresholds. Upcycled gates start fully open
    (a = sigmoid(4) = 0.98 for every token), so here their weights are drawn at random
    (std 1/sqrt(H), bias 0) to give a spread of allocations that thresholds can cut, as a
    trained gate would. Gates train densely (soft allocations), so their training step costs
    about the dense one; they save compute at inference only.
All models are timed in interleaved rounds (one call of each per round) and the median is kept,
which is the fairest one can do on a shared, noisy machine. The executed-compute fraction is the
model's own `compute_fraction` output.
"""

import argparse
import json
import os
import platform
import statistics
import sys
from pathlib import Path

import torch
import transformers

import hf_condcomp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import interleaved_times, machine_info  # noqa: E402


def build_models(capacities, thresholds, seed):
    dense = transformers.AutoModel.from_pretrained(hf_condcomp.assets.minilm_path())
    models = {"dense": dense}
    for c in capacities:
        models[f"mod c={c:g}"] = hf_condcomp.upcycle("all-MiniLM-L6-v2", variant="mod", capacity=c, layers="all")
    gen = torch.Generator().manual_seed(seed)
    for t in thresholds:
        model = hf_condcomp.upcycle("all-MiniLM-L6-v2", variant="gate", threshold=t, layers="all")
        hidden = model.config.hidden_size
        with torch.no_grad():
            for layer in model._conditional_layers:  # the source's BertLayer modules, each with its gate
                layer.compute_gate.weight.copy_(torch.randn(1, hidden, generator=gen) / hidden**0.5)
                layer.compute_gate.bias.zero_()
        models[f"gate t={t:g}"] = model
    return models


def forward_fn(model, ids, mask):
    def run():
        with torch.inference_mode():
            model(input_ids=ids, attention_mask=mask)

    return run


def train_step_fn(model, optimizer, ids, mask):
    def run():
        out = model(input_ids=ids, attention_mask=mask)
        # A stand-in task loss on the sentence embeddings, plus the model's gate/router losses.
        loss = out.last_hidden_state.float().pow(2).mean()
        if getattr(out, "routing_loss", None) is not None:  # base models: the weighted router/gate losses
            loss = loss + out.routing_loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return run


def fraction_of(model, ids, mask, train):
    model.train(train)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask)
    return getattr(out, "compute_fraction", None) or 1.0


def bench(models, ids, mask, repeats, what):
    """Median seconds per call of each model, timed in interleaved rounds after one warm-up."""
    fns = {}
    for name, model in models.items():
        if what == "forward":
            model.eval()
            fns[name] = forward_fn(model, ids, mask)
        else:
            model.train()
            fns[name] = train_step_fn(model, torch.optim.SGD(model.parameters(), lr=1e-5), ids, mask)
    times = interleaved_times(fns, repeats)
    return {name: statistics.median(ts) for name, ts in times.items()}, times


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--capacities", default="1.0,0.75,0.5,0.25")
    p.add_argument("--thresholds", default="0.3,0.5,0.7")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds for the forward")
    p.add_argument("--train-repeats", type=int, default=3, help="timed rounds for the training step")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="outputs/bench_gated.json")
    args = p.parse_args()
    transformers.logging.set_verbosity_error()
    if args.threads:
        torch.set_num_threads(args.threads)
    info = machine_info()  # at the start: the commit and load the run began with
    torch.manual_seed(args.seed)

    capacities = [float(c) for c in args.capacities.split(",") if c]
    thresholds = [float(t) for t in args.thresholds.split(",") if t]
    models = build_models(capacities, thresholds, args.seed)
    ids = torch.randint(1000, 29000, (args.batch, args.seq_len))
    mask = torch.ones_like(ids)

    fractions = {name: fraction_of(m, ids, mask, train=False) for name, m in models.items()}
    train_fractions = {name: fraction_of(m, ids, mask, train=True) for name, m in models.items()}
    fwd, fwd_all = bench(models, ids, mask, args.repeats, "forward")
    step, step_all = bench(models, ids, mask, args.train_repeats, "train")

    rows = []
    header = (f"{'model':<12} {'exec frac':>9} {'fwd s':>7} {'fwd x':>6} | "
              f"{'train frac':>10} {'step s':>7} {'step x':>6}")
    print(f"all-MiniLM-L6-v2, batch {args.batch} x seq {args.seq_len}, {torch.get_num_threads()} threads, "
          f"median of {args.repeats} forward / {args.train_repeats} training-step rounds")
    print(header)
    print("-" * len(header))
    for name in models:
        row = {
            "model": name,
            "executed_fraction": fractions[name],
            "forward_s": fwd[name],
            "forward_ratio": fwd[name] / fwd["dense"],
            "train_executed_fraction": train_fractions[name],
            "train_step_s": step[name],
            "train_step_ratio": step[name] / step["dense"],
            "forward_all_s": fwd_all[name],
            "train_step_all_s": step_all[name],
        }
        rows.append(row)
        print(f"{name:<12} {row['executed_fraction']:>9.3f} {row['forward_s']:>7.3f} {row['forward_ratio']:>6.2f} | "
              f"{row['train_executed_fraction']:>10.3f} {row['train_step_s']:>7.3f} {row['train_step_ratio']:>6.2f}")
    result = {
        "benchmark": "bench_gated",
        "source": "all-MiniLM-L6-v2",
        "batch": args.batch,
        "seq_len": args.seq_len,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "machine": {**info, "platform": platform.platform()},
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "results": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
