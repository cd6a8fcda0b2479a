"""Peak memory of one training forward + backward of a benchmark model, from the profiler's
tensor accounting (`common.cpu_peak_bytes`: activations, gradients and temporaries, not the
weights). Run it at two commits to see what a change does to training memory:

    python benchmarks/peak_memory.py smol-moe --batch 4 --seq 1024 --out peak.json

Model names are `bench_models.build`'s (minilm-dense, minilm-moe, smol-dense, smol-moe, ...).
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_models import build, train_step  # noqa: E402

from common import cpu_peak_bytes, machine_info, write_json  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    info = machine_info()
    rows = []
    for name in args.models:
        model = build(name)
        step = train_step(model, args.batch, args.seq, causal=not name.startswith("minilm"), optimizer=False)
        peak = cpu_peak_bytes(step)
        rows.append({"model": name, "shape": f"{args.batch}x{args.seq}",
                     "peak_MiB": None if peak is None else peak / 2**20})
        print(rows[-1])
        del model, step
    write_json(args.out, {"machine": info, "rows": rows})


if __name__ == "__main__":
    main()
