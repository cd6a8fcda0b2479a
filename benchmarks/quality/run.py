"""Run one results table (see RESULTS.md at the repo root).

    python benchmarks/quality/run.py before_training   # no training: split-upcycled vs dense parent
    python benchmarks/quality/run.py classification    # Banking77: dense vs copy-MoE, 3 seeds
    python benchmarks/quality/run.py arms              # Banking77 single-seed arms (EC, split, MoD, gate, no aux)
    python benchmarks/quality/run.py tradeoff          # Banking77 gated variants on all layers at several budgets
    python benchmarks/quality/run.py tradeoff_seeds    # Banking77 seeds 1-2 of MoD at capacity 0.5, 0.55 and 0.75
    python benchmarks/quality/run.py long              # Banking77 600 steps, whole sets: dense vs MoD, 3 seeds
    python benchmarks/quality/run.py long_moe          # the same 600 steps: copy-MoE token choice and expert choice
    python benchmarks/quality/run.py long_keys         # the same, MoD with skipped tokens kept as keys
    python benchmarks/quality/run.py long_router       # the same, MoD with router learning rates 1e-3 and 1e-2
    python benchmarks/quality/run.py keys              # Banking77 MoD 0.45 with skipped tokens kept as keys, 3 seeds
    python benchmarks/quality/run.py pooled_token      # Banking77 MoD c=0.55 without pinning [CLS], 3 seeds
    python benchmarks/quality/run.py seeds             # Banking77 seeds 1-2 of expert choice and split upcycling
    python benchmarks/quality/run.py sst2              # SST-2: dense vs copy-MoE, 3 seeds, and expert choice
    python benchmarks/quality/run.py translation       # Multi30k en-de, SmolLM2: dense vs MoE (LoRA), dense full
    python benchmarks/quality/run.py dialogue          # chitchat, SmolLM2: dense vs MoE vs MoD perplexity
    python benchmarks/quality/run.py dialogue_seeds    # chitchat seeds 1-2 of dense and MoE
    python benchmarks/quality/render.py                # RESULTS.md from the JSONs

`--shard 0/2` and `--shard 1/2` after a table name split its runs between two processes (one per core).

Each run is the real recipe (`recipes/<task>.py`) in a subprocess, with the
same data subset, steps and learning-rate schedule for every arm. Resumable: a run whose JSON
exists under benchmarks/quality/results/ is skipped. Raw output folders go to $QUALITY_OUT
(default /tmp/hf_condcomp_quality), never into git. Each JSON records the commit and the command.
"""

import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RESULTS = Path(__file__).resolve().parent / "results"
OUT = Path(os.environ.get("QUALITY_OUT", "/tmp/hf_condcomp_quality"))

# Budget sized for a shared 2-core CPU: ~2-3 minutes per run.
BUDGET = [
    "max_train_samples=2000", "max_eval_samples=512", "max_train_steps=120",
    "per_device_train_batch_size=16", "per_device_eval_batch_size=64", "max_length=32",
    "with_tracking=false", "checkpointing_steps=100000", "routing_eval_batches=8",
]
CONFIG = "recipes/configs/classification_banking77.yaml"
# "dense": one expert with top-1 computes exactly the dense FFN (softmax over one logit is 1), so
# it is the dense parent fine-tuned through the same recipe and schedule.
ARMS = {
    "dense": ["upcycling.num_experts=1", "upcycling.top_k=1"],
    "moe_copy_tc": [],  # the config: 8 experts, top-2, token choice, copy, every other layer, aux 0.01
    "moe_copy_tc_noaux": ["upcycling.router_aux_loss_coef=0.0"],
    "moe_copy_ec": ["upcycling.routing=expert_choice", "upcycling.capacity_factor=2.0"],
    "moe_split_kmeans": ["upcycling.init=split-kmeans"],
    "moe_split_random": ["upcycling.init=split-random"],
    "mod_c0.5": ["upcycling.variant=mod", "upcycling.capacity=0.5"],
    "mod_c0.5_all": ["upcycling.variant=mod", "upcycling.capacity=0.5", "upcycling.layers=all"],
    "gate_p0.1": ["upcycling.variant=gate", "upcycling.compute_penalty=0.1"],
    # Compute trade-off: gated variants on all layers at several budgets. Routers and gates learn
    # at 1e-2 (`router_learning_rate`): at the model's 2e-4 they barely leave their initialisation.
    "mod_c0.9_all": ["upcycling.variant=mod", "upcycling.capacity=0.9", "upcycling.layers=all"],
    **{f"mod_c{c}_all": ["upcycling.variant=mod", f"upcycling.capacity={c}", "upcycling.layers=all"]
       for c in ("0.75", "0.6", "0.55")},
    # Before `keep_pooled_token` (default since 881dcdd) routers could drop [CLS], the token the classifier reads.
    "mod_c0.55_all_nopin": ["upcycling.variant=mod", "upcycling.capacity=0.55", "upcycling.layers=all",
                            "upcycling.keep_pooled_token=false"],
    # Encoders only: skipped tokens stay visible as keys (their key/value projections are counted).
    **{f"mod_c{c}_all_keys": ["upcycling.variant=mod", f"upcycling.capacity={c}", "upcycling.layers=all",
                              "upcycling.skipped_tokens_as_keys=true"] for c in ("0.45", "0.5")},
    "mod_c0.5_all_rlr": ["upcycling.variant=mod", "upcycling.capacity=0.5", "upcycling.layers=all",
                         "router_learning_rate=1e-2"],
    **{f"mod_c0.55_all_rlr{lr}": ["upcycling.variant=mod", "upcycling.capacity=0.55", "upcycling.layers=all",
                                  f"router_learning_rate={lr}"] for lr in ("1e-3", "1e-2")},
    # Gates train on the inference forward by default (straight-through); "_soft" is the opt-out.
    **{f"gate_all_p{p}_rlr": ["upcycling.variant=gate", f"upcycling.compute_penalty={p}", "upcycling.layers=all",
                              "router_learning_rate=1e-2"] for p in ("0.005", "0.02", "0.05")},
    "gate_all_p0.02_rlr_soft": ["upcycling.variant=gate", "upcycling.compute_penalty=0.02", "upcycling.layers=all",
                                "router_learning_rate=1e-2", "upcycling.gate_straight_through=false"],
}
# A 5x longer budget on the whole training set (~1 epoch of 10k questions), evaluated on the whole
# test set (3080): the 120-step budget stops while dense is still at ~34%, and retrofitted routed
# depth is reported to need more training than that. ~6-8 minutes per run on one core.
LONG_BUDGET = [b for b in BUDGET if not b.startswith(("max_train_samples", "max_eval_samples", "max_train_steps"))] + [
    "max_train_steps=600"]
# SST-2 (binary sentiment): the same budget and arms, its own config; evaluated on 872 sentences.
SST2_CONFIG = "recipes/configs/classification_sst2.yaml"
SST2_BUDGET = [b for b in BUDGET if not b.startswith(("max_eval_samples", "max_length"))] + [
    "max_eval_samples=872", "max_length=64", "num_warmup_steps=50"]
# Decoder tables: SmolLM2-135M-Instruct (the embedded offline checkpoint), one seed, short budgets
# (~15-25 s per optimizer step of 16 sequences on one core).
TRANSLATION_CONFIG = "recipes/configs/translation_multi30k_smollm2.yaml"
TRANSLATION_BUDGET = [
    "max_train_samples=2000", "max_eval_samples=200", "num_generation_samples=200", "max_train_steps=30",
    "per_device_train_batch_size=8", "gradient_accumulation_steps=2", "per_device_eval_batch_size=16",
    "num_warmup_steps=3", "max_length=96", "max_target_length=48", "with_tracking=false",
    "checkpointing_steps=100000", "routing_eval_batches=4",
]
TRANSLATION_ARMS = {
    "dense_lora": ["upcycling.num_experts=1", "upcycling.top_k=1"],
    "moe_lora": [],  # the config: 4 experts, top-2, copy, every other layer; LoRA on attention + experts
    # Full fine-tuning at the usual ~10x lower learning rate than LoRA's.
    "dense_full": ["upcycling.num_experts=1", "upcycling.top_k=1", "lora_r=0", "learning_rate=5e-5"],
}
DIALOGUE_CONFIG = "recipes/configs/dialogue_chitchat_smollm2.yaml"
DIALOGUE_BUDGET = [
    "max_train_samples=2000", "max_eval_samples=100", "max_train_steps=30", "per_device_train_batch_size=8",
    "gradient_accumulation_steps=1", "per_device_eval_batch_size=8", "num_warmup_steps=3", "max_length=128",
    "num_sample_replies=2", "max_new_tokens=24", "with_tracking=false", "checkpointing_steps=100000",
    "routing_eval_batches=4",
]
DIALOGUE_ARMS = {
    "dense_lora": ["upcycling.num_experts=1", "upcycling.top_k=1"],
    "moe_lora": [],
    "mod_c0.5_lora": ["upcycling.variant=mod", "upcycling.capacity=0.5"],
}
# The shipped configs name the Hub datasets they were made for; these tables run offline on the
# copies in ../shared/data (runs made before the configs named Hub datasets read the same files
# through the configs).
SHARED = "../shared/data"
LOCAL_DATA = {
    CONFIG: [f"train_file={SHARED}/classification/banking77/train.csv",
             f"validation_file={SHARED}/classification/banking77/test.csv", "label_column=category"],
    SST2_CONFIG: [f"train_file={SHARED}/classification/sst2/train.tsv",
                  f"validation_file={SHARED}/classification/sst2/test.tsv"],
    TRANSLATION_CONFIG: [f"train_file={SHARED}/translation/multi30k/train",
                         f"validation_file={SHARED}/translation/multi30k/val",
                         f"test_file={SHARED}/translation/multi30k/test_2016_flickr"],
    DIALOGUE_CONFIG: [],  # chitchat comes from its PyPI package
}
# table -> (results folder, whose first word names the recipe; config, budget, arms, [(arm, seed)] in priority order,
#           metric printed)
TABLES = {
    # The target comparison first, seeds interleaved.
    "classification": ("classification", CONFIG, BUDGET, ARMS,
                       [(a, s) for s in (0, 1, 2) for a in ("dense", "moe_copy_tc")], "eval_accuracy"),
    # MoD on all layers at capacity 0.5 is the arm that can meet "<= 60% executed compute";
    # on every other layer the whole model executes ~75%.
    "arms": ("classification", CONFIG, BUDGET, ARMS,
             [("moe_copy_ec", 0), ("moe_copy_tc_noaux", 0), ("mod_c0.5_all", 0), ("moe_split_kmeans", 0),
              ("mod_c0.5", 0), ("gate_p0.1", 0), ("moe_split_random", 0)], "eval_accuracy"),
    "tradeoff": ("classification", CONFIG, BUDGET, ARMS,
                 [(a, 0) for a in ("mod_c0.5_all_rlr", "gate_all_p0.02_rlr", "mod_c0.75_all", "gate_all_p0.005_rlr",
                                   "gate_all_p0.02_rlr_soft", "gate_all_p0.05_rlr", "mod_c0.9_all", "mod_c0.6_all",
                                   "mod_c0.55_all")], "eval_accuracy"),
    # Seeds 1-2 of the MoD settings closest to the gated target on seed 0: capacity 0.75, 0.55 and 0.5.
    "tradeoff_seeds": ("classification", CONFIG, BUDGET, ARMS,
                       [(a, s) for s in (1, 2) for a in ("mod_c0.55_all", "mod_c0.75_all", "mod_c0.5_all")],
                       "eval_accuracy"),
    # Does the routed-depth gap close with training? Dense vs MoD on all layers, 600 steps.
    "long": ("classification_long", CONFIG, LONG_BUDGET, ARMS,
             [(a, s) for s in (0, 1, 2) for a in ("mod_c0.55_all", "dense")]
             + [("mod_c0.75_all", s) for s in (0, 1, 2)],
             "eval_accuracy"),
    # Does the MoE verdict of the 120-step table hold when dense has learned the task? 3 seeds each.
    "long_moe": ("classification_long", CONFIG, LONG_BUDGET, ARMS,
                 [(a, s) for s in (0, 1, 2) for a in ("moe_copy_tc", "moe_copy_ec")], "eval_accuracy"),
    # Is hiding skipped tokens from attention what costs MoD its accuracy? Keys from every token.
    "long_keys": ("classification_long", CONFIG, LONG_BUDGET, ARMS,
                  [("mod_c0.45_all_keys", s) for s in (0, 1, 2)] + [("mod_c0.5_all_keys", 0)], "eval_accuracy"),
    # At the model's 2e-4 the MoD routers hardly move in 600 steps (weight norms ~0.1): faster routers.
    "long_router": ("classification_long", CONFIG, LONG_BUDGET, ARMS,
                    [(f"mod_c0.55_all_rlr{lr}", 0) for lr in ("1e-3", "1e-2")], "eval_accuracy"),
    # The same MoD arm with [CLS] free to be skipped, as before `keep_pooled_token`: 3 seeds.
    "pooled_token": ("classification", CONFIG, BUDGET, ARMS, [("mod_c0.55_all_nopin", s) for s in (0, 1, 2)],
                     "eval_accuracy"),
    # MoD with skipped tokens kept as keys (encoders) at the 120-step budget, 3 seeds.
    "keys": ("classification", CONFIG, BUDGET, ARMS, [("mod_c0.45_all_keys", s) for s in (0, 1, 2)], "eval_accuracy"),
    "seeds": ("classification", CONFIG, BUDGET, ARMS,
              [(a, s) for s in (1, 2) for a in ("moe_copy_ec", "moe_split_kmeans", "moe_split_random")],
              "eval_accuracy"),
    "sst2": ("classification_sst2", SST2_CONFIG, SST2_BUDGET, ARMS,
             [(a, s) for s in (0, 1, 2) for a in ("dense", "moe_copy_tc")] + [("moe_copy_ec", 0)], "eval_accuracy"),
    "translation": ("translation", TRANSLATION_CONFIG, TRANSLATION_BUDGET, TRANSLATION_ARMS,
                    [(a, 0) for a in TRANSLATION_ARMS], "eval_bleu"),
    "dialogue": ("dialogue", DIALOGUE_CONFIG, DIALOGUE_BUDGET, DIALOGUE_ARMS,
                 [(a, 0) for a in DIALOGUE_ARMS], "perplexity"),
    # Seeds 1-2 of dense and MoE (the seed picks the training subset, its order and LoRA's init).
    "dialogue_seeds": ("dialogue", DIALOGUE_CONFIG, DIALOGUE_BUDGET, DIALOGUE_ARMS,
                       [(a, s) for s in (1, 2) for a in ("dense_lora", "moe_lora")], "perplexity"),
}


def commit():
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "hf_condcomp", "recipes"], cwd=ROOT,
                           capture_output=True, text=True).stdout.strip()
    return head + ("-dirty" if dirty else "")


def run_recipe(table, arm, seed):
    folder, config, budget, arms, _, metric = TABLES[table]
    recipe = folder.split("_")[0]  # results folder "classification_sst2" runs recipes/classification.py
    path = RESULTS / folder / f"{arm}_seed{seed}.json"
    if path.exists():
        print(f"skip {path.relative_to(RESULTS)} (exists)")
        return
    out = OUT / folder / f"{arm}_seed{seed}"
    cmd = [sys.executable, f"recipes/{recipe}.py", "--config", config, *LOCAL_DATA[config], *budget, f"seed={seed}",
           "upcycling.seed=0", f"output_dir={out}", *arms[arm]]
    printable = " ".join(shlex.quote(c) for c in ["python", *cmd[1:]])
    print(printable, flush=True)
    head = commit()  # before the run: the code it ran on
    start = time.time()
    # One thread per run: two threads contending with another process for 2 cores ran ~7x slower.
    done = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
    if done.returncode:  # report and go on with the table's other runs
        print(f"FAILED ({done.returncode}): {arm} seed {seed}", flush=True)
        return
    wall = time.time() - start
    results = json.loads((out / "all_results.json").read_text())
    results.pop("log_history", None)
    record = {"arm": arm, "seed": seed, "commit": head, "command": printable, "wall_seconds": wall,
              "machine": f"{os.cpu_count()}-core CPU, shared", "results": results}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1, default=float))
    print(f"{folder} {arm} seed {seed}: {metric} {results[metric]:.4f} in {wall:.0f} s", flush=True)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in (*TABLES, "before_training"):
        sys.exit(f"usage: run.py {{before_training,{','.join(TABLES)}}}")
    if argv[0] == "before_training":
        from before_training import main as before
        return before()
    shard, shards = 0, 1
    if len(argv) > 1:  # "--shard i/n": every n-th run from the i-th, to run n processes side by side
        if len(argv) != 3 or argv[1] != "--shard":
            sys.exit(f"usage: run.py TABLE [--shard i/n], got {' '.join(argv)}")
        try:
            shard, shards = (int(v) for v in argv[2].split("/"))
        except ValueError:
            shards = 0
        if not 0 <= shard < shards:
            sys.exit(f"--shard must be i/n with 0 <= i < n (e.g. 0/2 and 1/2), got {argv[2]!r}")
    for arm, seed in TABLES[argv[0]][4][shard::shards]:
        run_recipe(argv[0], arm, seed)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
