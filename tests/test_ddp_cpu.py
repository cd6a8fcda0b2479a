"""The recipes on 2 CPU processes under accelerate's DDP (gloo): the classification recipe computes what
one process computes for the same global batch, saves and resumes its state, and writes a folder
that loads through remote code. A dropout-free tiny BERT makes the comparison exact up to the
batch-level router losses, which each process computes over its half of the batch. Every run asserts
the engine it really ran (all_results.json's `engine`): on the CPU accelerate runs plain DDP under
`ACCELERATE_USE_CPU=1` whatever an FSDP config asks, so such a launch is refused with one line."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import DATA, run_clean_python

ROOT = Path(__file__).resolve().parent.parent
SST2 = DATA / "sst2"


FSDP2_CPU = """\
compute_environment: LOCAL_MACHINE
distributed_type: FSDP
mixed_precision: 'no'
num_machines: 1
num_processes: 2
machine_rank: 0
main_training_function: main
use_cpu: true
fsdp_config:
  fsdp_version: 2
  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP
  fsdp_reshard_after_forward: true
  fsdp_state_dict_type: FULL_STATE_DICT
  fsdp_cpu_ram_efficient_loading: false
  fsdp_offload_params: false
"""
# Stated tolerances: the task loss and the gradients of a global batch are the same split over two
# processes; the load-balancing and z losses are means over each process's tokens, so the training
# loss differs at the 1e-3 level, and accuracy on 128 sentences by at most one or two of them.
LOSS_RTOL = 1e-2
ACCURACY_ATOL = 2 / 128


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from hf_condcomp.assets import minilm_path

    folder = tmp_path_factory.mktemp("tiny_bert")
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    BertForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def recipe_args(model, out, per_device_batch, *extra):
    return [str(a) for a in (
        "--model_name_or_path", model, "--train_file", SST2 / "train.tsv", "--validation_file", SST2 / "test.tsv",
        "--text_column", "sentence", "--label_column", "label", "--max_train_samples", 256,
        "--max_eval_samples", 128, "--max_train_steps", 6, "--per_device_train_batch_size", per_device_batch,
        "--per_device_eval_batch_size", 32, "--learning_rate", "3e-3", "--max_length", 32, "--seed", 0,
        "--logging_steps", 1, "--output_dir", out, "with_tracking=false", *extra)]


def launch(tmp_path, args, engine, mixed_precision="no", expect_ok=True):
    """Run the recipe on one process, or on 2 CPU processes under DDP (gloo), or with accelerate's FSDP2
    config on the CPU (which accelerate cannot run)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    script = str(ROOT / "recipes" / "classification.py")
    launcher = [sys.executable, "-m", "accelerate.commands.launch"]
    if engine == "fsdp2":
        config = tmp_path / "fsdp2_cpu.yaml"
        config.write_text(FSDP2_CPU.replace("mixed_precision: 'no'", f"mixed_precision: '{mixed_precision}'"))
        cmd = [*launcher, "--config_file", str(config), script, *args]
        env["ACCELERATE_USE_CPU"] = "1"
    elif engine == "ddp":
        cmd = [*launcher, "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", mixed_precision, "--dynamo_backend", "no", script, *args]
        env["ACCELERATE_USE_CPU"] = "1"
    else:
        cmd = [sys.executable, script, *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    if not expect_ok:
        return proc
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads((Path(args[args.index("--output_dir") + 1]) / "all_results.json").read_text())
    expected = {"distributed_type": "NO", "num_processes": 1, "world_size": 1} if engine == "single" else \
        {"distributed_type": "MULTI_CPU", "num_processes": 2, "world_size": 2}
    assert results["engine"] == expected  # the engine that really ran
    return results


VARIANTS = {"moe": ["upcycling.num_experts=4", "upcycling.layers=all"],
            "mod": ["upcycling.variant=mod", "upcycling.capacity=0.5", "upcycling.layers=all"]}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_ddp_two_processes_match_one_process_and_resume(tiny_bert, tmp_path, variant):
    extra = VARIANTS[variant]
    single = launch(tmp_path, recipe_args(tiny_bert, tmp_path / "single", 16, *extra), "single")
    full = tmp_path / "ddp"
    sharded = launch(tmp_path, recipe_args(tiny_bert, full, 8, "--checkpointing_steps", 3, *extra), "ddp")
    assert sharded["num_processes"] == 2 and sharded["train_examples_per_process"] == [48, 48]
    assert sharded["train_loss"] == pytest.approx(single["train_loss"], rel=LOSS_RTOL)
    assert abs(sharded["eval_accuracy"] - single["eval_accuracy"]) <= ACCURACY_ATOL
    steps = [(h["train/loss"], h["train/task_loss"]) for h in sharded["log_history"]]
    reference = [(h["train/loss"], h["train/task_loss"]) for h in single["log_history"]]
    assert len(steps) == len(reference) == 6
    for (loss, task), (ref_loss, ref_task) in zip(steps, reference):  # every step, not just the mean
        assert loss == pytest.approx(ref_loss, rel=LOSS_RTOL) and task == pytest.approx(ref_task, rel=LOSS_RTOL)
    b = load_file(full / "model.safetensors")

    # save_state under DDP at step 3, then a fresh DDP run resumes from it: same end weights.
    checkpoint = full / "checkpoints" / "step_3"
    assert (checkpoint / "training_state.json").exists()
    resumed_dir = tmp_path / "resumed"
    resumed = launch(tmp_path, recipe_args(tiny_bert, resumed_dir, 8, "--resume_from_checkpoint", checkpoint, *extra),
                     "ddp")
    assert resumed["train_steps"] == 6
    c = load_file(resumed_dir / "model.safetensors")
    for key in b:
        torch.testing.assert_close(c[key], b[key], rtol=0, atol=1e-6, msg=key)
    assert resumed["eval_accuracy"] == sharded["eval_accuracy"]

    # The saved folder is a complete model: it loads through remote code without hf_condcomp.
    torch.save(torch.tensor([[101, 2023, 2003, 1037, 3231, 102]]), tmp_path / "ids.pt")
    run_clean_python(
        f"""
import torch, transformers
from safetensors.torch import load_file
m = transformers.AutoModelForSequenceClassification.from_pretrained({str(full)!r}, trust_remote_code=True).eval()
assert type(m).__module__.startswith("transformers_modules")
saved = load_file({str(full / 'model.safetensors')!r})
for name, param in m.state_dict().items():
    if name in saved:
        assert torch.equal(param, saved[name]), name
with torch.no_grad():
    assert torch.isfinite(m(torch.load({str(tmp_path / 'ids.pt')!r})).logits).all()
""",
        cwd=tmp_path,
    )


def test_ddp_bf16_mixed_precision_trains_an_moe(tiny_bert, tmp_path):
    # Mixed precision computes the experts in bf16 while the padding rows' buffer came from the fp32
    # input: the MoE's scatter back into the padded batch must take the experts' dtype.
    out = tmp_path / "bf16"
    results = launch(tmp_path, recipe_args(tiny_bert, out, 8, *VARIANTS["moe"]), "ddp", mixed_precision="bf16")
    assert results["num_processes"] == 2 and results["train_steps"] == 6
    assert all(torch.isfinite(torch.tensor(h["train/loss"])) for h in results["log_history"])


def test_an_fsdp_launch_that_accelerate_runs_as_ddp_is_refused_with_one_line(tiny_bert, tmp_path):
    proc = launch(tmp_path, recipe_args(tiny_bert, tmp_path / "fsdp", 8, *VARIANTS["moe"]), "fsdp2", expect_ok=False)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if "the launch asked for FSDP" in line]
    assert lines and "accelerate set up MULTI_CPU" in lines[0], proc.stderr[-3000:]
    assert not (tmp_path / "fsdp" / "model.safetensors").exists()


def test_a_refused_launch_says_its_one_line_once(tmp_path):
    """`accelerate launch -q` (docs/recipes.md): on one process a user's mistake prints the recipe's
    one line and nothing else (exit status 1, accelerate's for any failure); on two, the line once
    (rank 0's; the other rank waits and is stopped), then torch's failure summary, whose root cause is
    rank 0's exit status 2."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "ACCELERATE_USE_CPU": "1"}
    line = "error: override `bad_key=1`: `bad_key` is not a flag of this recipe (see `--help`)."
    launch = [sys.executable, "-m", "accelerate.commands.launch", "-q", "--num_machines", "1", "--mixed_precision",
              "no", "--dynamo_backend", "no", "--main_process_port", "0"]
    recipe = [str(ROOT / "recipes" / "classification.py"), "--output_dir", str(tmp_path), "bad_key=1"]
    one = subprocess.run([*launch, "--num_processes", "1", *recipe], capture_output=True, text=True, timeout=300,
                         env=env, cwd=ROOT)
    assert (one.returncode, one.stdout, one.stderr.splitlines()) == (1, "", [line])
    two = subprocess.run([*launch, "--multi_gpu", "--num_processes", "2", *recipe], capture_output=True, text=True,
                         timeout=300, env=env, cwd=ROOT)
    assert two.returncode == 1 and [x for x in two.stderr.splitlines() if x.startswith("error:")] == [line]
    assert "Traceback" not in two.stderr
    root_cause = two.stderr.split("Root Cause")[1]
    assert "rank      : 0 " in root_cause and "exitcode  : 2 " in root_cause, two.stderr
