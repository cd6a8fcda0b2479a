"""Where an MoE layer's expert time goes: the three GEMMs of one grouped projection against one
dense GEMM of the same FLOPs.

For S rows sorted into E equal expert groups and a projection in -> out, times side by side
(interleaved rounds, medians):
- dense:    X (S, in) @ W^T (in, out), one GEMM, the FLOP-equivalent reference;
- forward:  `grouped_mm(X, W_e^T)` as hf_condcomp's `grouped` experts run it;
- grad_x:   `grouped_mm(dY, W_e)`;
- grad_w:   `grouped_mm(dY^T, X)` (inner dimension S/E: the expert's row count);
- loop:     the forward as a Python loop of per-expert `mm` (the shape of an eager implementation).
Each column is divided by dense; a ratio above 1 is what small per-expert GEMMs cost.

    python benchmarks/bench_grouped_gemm.py --threads 1 --out bench_grouped_gemm.json
"""

import argparse
import itertools
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import interleaved_medians, machine_info, print_table, write_json  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    info = machine_info()  # at the start: the commit and load the run began with

    # (in, out) of the up and down projections of the layer benchmark's shapes; rows = top-2 x tokens.
    grid = [(fin, fout, e, rows) for (fin, fout), e, rows in itertools.product(
        [(384, 1536), (1536, 384), (768, 3072), (3072, 768)], [8, 32, 64], [4096, 8192])]
    rows_out = []
    for fin, fout, experts, rows in grid:
        torch.manual_seed(0)
        x, dy = torch.randn(rows, fin), torch.randn(rows, fout)
        w, w_dense = torch.randn(experts, fout, fin) * 0.02, torch.randn(fout, fin) * 0.02
        counts = torch.full((experts,), rows // experts)
        offsets = counts.cumsum(0).to(torch.int32)
        groups = list(zip(x.split(counts.tolist()), w.unbind(0)))
        fns = {  # called only within this iteration; the defaults bind this iteration's tensors
            "dense": lambda x=x, w_dense=w_dense: x @ w_dense.t(),
            "forward": lambda x=x, w=w, offsets=offsets: F.grouped_mm(x, w.transpose(-2, -1), offs=offsets),
            "grad_x": lambda dy=dy, w=w, offsets=offsets: F.grouped_mm(dy, w, offs=offsets),
            "grad_w": lambda dy=dy, x=x, offsets=offsets: F.grouped_mm(dy.t(), x, offs=offsets),
            "loop": lambda groups=groups: torch.cat([xe @ we.t() for xe, we in groups]),
        }
        med = interleaved_medians(fns, args.repeats)
        row = {"in": fin, "out": fout, "experts": experts, "rows": rows, "rows_per_expert": rows // experts,
               "dense_ms": 1e3 * med["dense"]}
        for name in ("forward", "grad_x", "grad_w", "loop"):
            row[f"{name}/dense"] = med[name] / med["dense"]
        rows_out.append(row)
        print(f"  done in={fin} out={fout} E={experts} rows={rows}", flush=True)

    print(f"\nOne grouped projection vs one dense GEMM of equal FLOPs, fp32, cpu; machine: {info}")
    table = print_table(rows_out, ["in", "out", "experts", "rows", "rows_per_expert", "dense_ms", "forward/dense",
                                   "grad_x/dense", "grad_w/dense", "loop/dense"])
    write_json(args.out, {"machine": info, "repeats": args.repeats, "rows": rows_out, "table": table})


if __name__ == "__main__":
    main()
