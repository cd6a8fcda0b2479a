"""What each process holds and how long a training step takes when an upcycled MoE is spread over
1, 2 and 4 processes: expert parallelism and FSDP2 through transformers' engine (`DistributedConfig`),
and DeepSpeed ZeRO-3, on this machine's CPUs (gloo).

    python benchmarks/scaling.py --out benchmarks/results/scaling.json

The model: a Llama (hidden 256, FFN 688, 4 layers, vocabulary 2000) upcycled into 8 experts, top-2,
in every layer, fp32, AdamW. Per rank, after the timed steps: the parameters it holds (a DTensor's
local shard, a ZeRO-3 partition), the bytes of the model state it keeps (parameters, gradients, AdamW
states and DeepSpeed's fp32 partitions, each storage counted once), its peak resident memory, and the
median step time (forward, backward, optimizer step; 2 warm-up steps, then 5). One process is the
unsharded model, the same for every plan. Under transformers' engine each shard is first given its own
storage (`hf_condcomp.training.models.compact_shards`, as the recipes do): the loader keeps a shard as
a view of the whole tensor it read, which on the CPU keeps every whole tensor on every rank.

Plans (N processes): `ep`: `DistributedConfig(ep_size=N, tp_plan={})`, each rank keeps 8/N experts of
every layer and the dense weights whole, the N ranks run one batch; `fsdp`: `DistributedConfig(
fsdp_size=N)`, every parameter sharded on dim 0 by the model's FSDP plan, each rank its own batch;
`zero3`: DeepSpeed ZeRO-3 (`DS_ACCELERATOR=cpu`), every parameter partitioned, each rank its own batch.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

MODEL = dict(vocab_size=2000, hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2)
EXPERTS = 8
BATCH, SEQ, WARMUP, STEPS = 4, 64, 2, 5
PLANS = ("ep", "fsdp", "zero3")


def build(folder):
    """The dense Llama and its 8-expert upcycle, saved to `folder`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from hf_condcomp import upcycle

    torch.manual_seed(0)
    dense = Path(folder) / "dense"
    LlamaForCausalLM(LlamaConfig(**MODEL)).save_pretrained(dense)
    model = upcycle(str(dense), task="causal-lm", num_experts=EXPERTS, top_k=2, layers="all")
    model.save_pretrained(Path(folder) / "moe")
    return Path(folder) / "moe"


def worker(args):
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    import hf_condcomp  # noqa: F401  (registers the upcycled model classes)
    from hf_condcomp.training.models import compact_shards

    torch.set_num_threads(1)
    n = int(os.environ.get("WORLD_SIZE", 1))
    engine = None
    if args.plan in ("ep", "fsdp") and n > 1:
        from transformers.distributed import DistributedConfig

        sizes = dict(ep_size=n, tp_plan={}) if args.plan == "ep" else dict(fsdp_size=n)
        model = AutoModelForCausalLM.from_pretrained(args.folder, distributed_config=DistributedConfig(**sizes))
        compact_shards(model)  # as the recipes do: each shard in its own storage, not a view of the whole tensor
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    else:
        model = AutoModelForCausalLM.from_pretrained(args.folder)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    if args.plan == "zero3" and n > 1:
        import deepspeed
        from deepspeed.utils import set_z3_leaf_modules

        from hf_condcomp.modeling.moe import MoEFeedForward

        deepspeed.init_distributed(dist_backend="gloo")
        set_z3_leaf_modules(model, sorted({type(m) for m in model.modules() if isinstance(m, MoEFeedForward)},
                                          key=lambda c: c.__name__))
        config = {"train_micro_batch_size_per_gpu": BATCH, "gradient_accumulation_steps": 1,
                  "zero_optimization": {"stage": 3}, "zero_allow_untested_optimizer": True, "steps_per_print": 10**9}
        engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    rank = dist.get_rank() if dist.is_initialized() else 0
    # Ranks of one expert-parallel group run one batch; every other plan gives each rank its own.
    generator = torch.Generator().manual_seed(0 if args.plan == "ep" else rank)
    ids = torch.randint(0, MODEL["vocab_size"], (BATCH, SEQ), generator=generator)
    model.train()
    times = []
    for step in range(WARMUP + STEPS):
        if dist.is_initialized():
            dist.barrier()
        start = time.perf_counter()
        if engine is not None:
            loss = engine(input_ids=ids, labels=ids).loss
            engine.backward(loss)
            engine.step()
        else:
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=False)  # the gradients stay allocated, as between steps of a run
        if dist.is_initialized():
            dist.barrier()
        if step >= WARMUP:
            times.append(time.perf_counter() - start)
    row = {"rank": rank, "processes": n, "plan": args.plan if n > 1 else "single", "loss": loss.item(),
           "step_seconds": statistics.median(times),
           "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # ru_maxrss: KiB on Linux
           **held(model, optimizer, engine)}
    Path(args.report, f"rank{rank}.json").write_text(json.dumps(row))
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def held(model, optimizer, engine):
    """Parameters this rank holds and the MiB of model state it keeps by kind (parameters, gradients,
    optimizer: AdamW's states and DeepSpeed's fp32 partitions), each storage counted once, first kind first."""
    from torch.distributed.tensor import DTensor

    storages = {}

    def keep(kind, t):
        if isinstance(t, torch.Tensor) and t.numel():
            storage = (t.to_local() if isinstance(t, DTensor) else t).untyped_storage()
            storages.setdefault(storage.data_ptr(), (kind, storage.nbytes()))

    params = list(model.parameters())
    if engine is not None:  # ZeRO-3: a parameter is a placeholder; its partition is `ds_tensor`
        held_params = sum(p.ds_tensor.numel() for p in params)
        for p in params:
            keep("parameters", p.ds_tensor)
        zero = engine.optimizer
        for flat in getattr(zero, "fp32_partitioned_groups_flat", []):
            keep("optimizer", flat)
            keep("gradients", flat.grad)
        for grads in getattr(zero, "averaged_gradients", {}).values():
            for g in grads if isinstance(grads, list) else [grads]:
                keep("gradients", g)
        states = zero.optimizer.state
    else:
        held_params = sum((p.to_local() if isinstance(p, DTensor) else p).numel() for p in params)
        for p in params:
            keep("parameters", p)
        for p in params:
            keep("gradients", p.grad)
        states = optimizer.state
    for state in states.values():
        for t in state.values():
            keep("optimizer", t)
    mib = {kind: sum(n for k, n in storages.values() if k == kind) / 2**20
           for kind in ("parameters", "gradients", "optimizer")}
    return {"parameters_held": held_params,
            "parameters_total": sum(getattr(p, "ds_numel", p.numel()) for p in params),
            "model_state_mib": sum(mib.values()), **{f"{kind}_mib": v for kind, v in mib.items()}}


def launch(folder, plan, n, report):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}:{os.environ.get('PYTHONPATH', '')}"}
    me = [str(Path(__file__).resolve()), "--worker", "--plan", plan, "--folder", str(folder), "--report", str(report)]
    if n == 1:
        cmd = [sys.executable, *me]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "--master_port",
               str(29600 + n), *me]
        if plan == "zero3":
            env["DS_ACCELERATOR"] = "cpu"
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    if proc.returncode != 0:
        raise SystemExit(f"{plan} on {n} process(es) failed:\n{proc.stderr[-4000:]}")
    return [json.loads(p.read_text()) for p in sorted(Path(report).glob("rank*.json"))]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "scaling.json"))
    parser.add_argument("--processes", default="1,2,4")
    parser.add_argument("--plans", default=",".join(PLANS))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--plan", default="single", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--report", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    from common import machine_info, write_json

    info = machine_info()
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        folder = build(scratch)
        for n in map(int, args.processes.split(",")):
            for plan in args.plans.split(",") if n > 1 else ["single"]:
                report = Path(scratch) / f"{plan}-{n}"
                report.mkdir()
                ranks = launch(folder, plan, n, report)
                worst = max(ranks, key=lambda r: r["model_state_mib"])
                row = {"plan": plan, "processes": n, "parameters_total": ranks[0]["parameters_total"],
                       "parameters_per_rank": max(r["parameters_held"] for r in ranks),
                       "model_state_mib_per_rank": worst["model_state_mib"],
                       "peak_rss_mib_per_rank": max(r["peak_rss_mib"] for r in ranks),
                       "step_seconds": max(r["step_seconds"] for r in ranks), "ranks": ranks}
                rows.append(row)
                print(f"{plan:6s} {n} proc: {row['parameters_per_rank'] / 1e6:6.2f}M of "
                      f"{row['parameters_total'] / 1e6:.2f}M parameters per rank, model state "
                      f"{row['model_state_mib_per_rank']:7.1f} MiB, peak RSS {row['peak_rss_mib_per_rank']:7.1f} MiB, "
                      f"step {row['step_seconds']:.3f} s", flush=True)
    single = next((r for r in rows if r["processes"] == 1), None)
    for row in rows if single else []:
        row["parameters_ratio"] = row["parameters_per_rank"] / single["parameters_per_rank"]
        row["model_state_ratio"] = row["model_state_mib_per_rank"] / single["model_state_mib_per_rank"]
    write_json(args.out, {"machine": info, "model": {**MODEL, "experts": EXPERTS, "top_k": 2, "layers": "all",
                                                     "dtype": "float32", "batch_per_rank": BATCH, "seq": SEQ},
                          "rows": rows})


if __name__ == "__main__":
    main()
