"""The recipes on 2 CPU processes under accelerate's DDP (gloo): the classification recipe computes what
one process computes for the same global batch, saves and resumes its state, and writes a folder
that loads through remote code. A dropout-free tiny BERT makes the comparison exact up to the
batch-level router losses, which each process computes over its half of the batch. Every run asserts
the engine it really ran (all_results.json's `engine`): on the CPU accelerate runs plain DDP under
`ACCELERATE_USE_CPU=1` whatever an FSDP config or `--use_deepspeed` asks, so such a launch is refused
with one line.

The same 2-process run under DeepSpeed ZeRO-2 and ZeRO-3 (`DS_ACCELERATOR=cpu accelerate launch
--use_deepspeed`, the model upcycled on the fly) and, for a decoder, under transformers' FSDP2
(`torchrun ... --fsdp_size 2`) trains what DDP trains: each rank reads the batches the DDP rank of the
same index reads, and the losses and saved weights agree to float rounding."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import DATA, free_port, run_clean_python

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


# The engine each launch must really run, as all_results.json records it.
ENGINES = {
    "single": {"engine": "accelerate", "distributed_type": "NO", "num_processes": 1, "world_size": 1},
    "ddp": {"engine": "accelerate", "distributed_type": "MULTI_CPU", "num_processes": 2, "world_size": 2},
    "zero2": {"engine": "deepspeed", "zero_stage": 2, "distributed_type": "DEEPSPEED", "num_processes": 2,
              "world_size": 2},
    "zero3": {"engine": "deepspeed", "zero_stage": 3, "distributed_type": "DEEPSPEED", "num_processes": 2,
              "world_size": 2},
    "fsdp_size": {"engine": "transformers", "fsdp_size": 2, "ep_size": 1, "tp_size": 1, "dp_size": 2,
                  "distributed_type": "MULTI_CPU", "num_processes": 2, "world_size": 2},
}


def launch(tmp_path, args, engine, mixed_precision="no", expect_ok=True, recipe="classification"):
    """Run the recipe on one process, or on 2 CPU processes: DDP (gloo), DeepSpeed ZeRO-2/3 (`zero2`,
    `zero3`), transformers' FSDP2 through torchrun (`fsdp_size`), accelerate's FSDP2 config on the CPU
    (`fsdp2`, which accelerate cannot run) or `--use_deepspeed` under ACCELERATE_USE_CPU (`deepspeed_as_ddp`)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    script = str(ROOT / "recipes" / f"{recipe}.py")
    launcher = [sys.executable, "-m", "accelerate.commands.launch"]
    two = ["--num_processes", "2", "--num_machines", "1", "--mixed_precision", mixed_precision,
           "--dynamo_backend", "no", "--main_process_port", str(free_port())]
    if engine == "fsdp2":
        config = tmp_path / "fsdp2_cpu.yaml"
        config.write_text(FSDP2_CPU.replace("mixed_precision: 'no'", f"mixed_precision: '{mixed_precision}'"))
        cmd = [*launcher, "--config_file", str(config), "--main_process_port", str(free_port()), script, *args]
        env["ACCELERATE_USE_CPU"] = "1"
    elif engine == "ddp":
        cmd = [*launcher, "--multi_gpu", *two, script, *args]
        env["ACCELERATE_USE_CPU"] = "1"
    elif engine in ("zero2", "zero3", "deepspeed_as_ddp"):
        cmd = [*launcher, *two, "--use_deepspeed", "--zero_stage", "2" if engine == "zero2" else "3", script, *args]
        env["DS_ACCELERATOR"] = "cpu"
        if engine == "deepspeed_as_ddp":
            env["ACCELERATE_USE_CPU"] = "1"
    elif engine == "fsdp_size":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               f"--master_port={free_port()}", script, *args,
               "--fsdp_size", "2"]
    else:
        cmd = [sys.executable, script, *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    if not expect_ok:
        return proc
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads((Path(args[args.index("--output_dir") + 1]) / "all_results.json").read_text())
    record = {k: v for k, v in results["engine"].items() if k not in ("dtensor_parameters", "parameters")}
    assert record == ENGINES[engine]  # the engine that really ran
    return results


def assert_same_run(results, reference, rel):
    """Each rank read the batches the reference's rank of the same index read (and not the other rank's);
    every step's loss and learning rate agree."""
    digests = results["train_batches_digest_per_process"]
    assert len(set(digests)) == len(digests) == 2 and digests == reference["train_batches_digest_per_process"]
    assert results["train_examples_per_process"] == reference["train_examples_per_process"]
    steps = [(h["train/loss"], h["train/task_loss"], h["train/lr"]) for h in results["log_history"]]
    expected = [(h["train/loss"], h["train/task_loss"], h["train/lr"]) for h in reference["log_history"]]
    assert len(steps) == len(expected) and steps
    for step, ref in zip(steps, expected):
        assert step == pytest.approx(ref, rel=rel)


def assert_same_weights(folder, reference, atol):
    ours, theirs = load_file(folder / "model.safetensors"), load_file(reference / "model.safetensors")
    assert ours.keys() == theirs.keys()
    for key in theirs:
        torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=atol, msg=key)


VARIANTS = {"moe": ["upcycling.num_experts=4", "upcycling.layers=all"],
            "mod": ["upcycling.variant=mod", "upcycling.capacity=0.5", "upcycling.layers=all"]}


def ddp_run(tmp_path, tiny_bert, variant):
    full = tmp_path / "ddp"
    return full, launch(tmp_path, recipe_args(tiny_bert, full, 8, "--checkpointing_steps", 3, *VARIANTS[variant]),
                        "ddp")


@pytest.fixture(scope="module")
def ddp_moe(tiny_bert, tmp_path_factory):
    """The 2-process DDP run of the MoE upcycle: the reference of the DeepSpeed runs too."""
    return ddp_run(tmp_path_factory.mktemp("ddp_moe"), tiny_bert, "moe")


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_ddp_two_processes_match_one_process_and_resume(tiny_bert, tmp_path, variant, request):
    extra = VARIANTS[variant]
    single = launch(tmp_path, recipe_args(tiny_bert, tmp_path / "single", 16, *extra), "single")
    full, sharded = request.getfixturevalue("ddp_moe") if variant == "moe" else ddp_run(tmp_path, tiny_bert, variant)
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


def test_a_deepspeed_launch_that_accelerate_runs_otherwise_is_refused_with_one_line(monkeypatch):
    """`accelerate launch --use_deepspeed` under ACCELERATE_USE_CPU=1 sets up MULTI_CPU (the launch path is the
    one the FSDP test above runs); a DeepSpeed setting that is not the recipe's, and a DeepSpeed world that
    accelerate counts as one process, are refused too."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from hf_condcomp.training import RecipeError, check_engine

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    ddp = SimpleNamespace(distributed_type=DistributedType.MULTI_CPU, num_processes=1)
    with pytest.raises(RecipeError, match=r"asked for DEEPSPEED \(ACCELERATE_USE_DEEPSPEED=true\) and accelerate set "
                                          r"up MULTI_CPU: .*DS_ACCELERATOR=cpu") as err:
        check_engine(ddp)
    assert "\n" not in str(err.value)
    # DeepSpeed accumulates and clips itself: an "auto" takes the recipe's setting, another number is refused.
    config = {"gradient_accumulation_steps": "auto", "gradient_clipping": "auto"}
    plugin = SimpleNamespace(deepspeed_config=config)
    engine = SimpleNamespace(distributed_type=DistributedType.DEEPSPEED, num_processes=1,
                             state=SimpleNamespace(deepspeed_plugin=plugin))
    args = SimpleNamespace(gradient_accumulation_steps=4, max_grad_norm=0.5, fsdp_size=1, ep_size=1, tp_size=1)
    check_engine(engine, args)
    assert config == {"gradient_accumulation_steps": 4, "gradient_clipping": 0.5}
    config["gradient_accumulation_steps"] = 2
    with pytest.raises(RecipeError, match=r"`--gradient_accumulation_steps` 4 and DeepSpeed's "
                                          r"gradient_accumulation_steps 2 differ"):
        check_engine(engine, args)
    monkeypatch.setattr("hf_condcomp.training.loop._world_size", lambda: 2)
    uncounted = SimpleNamespace(distributed_type=DistributedType.DEEPSPEED, num_processes=1)
    with pytest.raises(RecipeError, match="torch.distributed has 2 processes but accelerate sees 1"):
        check_engine(uncounted)


# DeepSpeed partitions the same fp32 arithmetic differently (reduce-scatter and all-gather instead of DDP's
# bucketed all-reduce): the sums differ in their last bits, and six Adam steps keep that at the 1e-6 level
# (measured: losses within 1e-7 relative, weights within 3e-6).
ENGINE_LOSS_RTOL = 1e-4
ENGINE_WEIGHT_ATOL = 1e-4


@pytest.mark.parametrize("stage", ["zero3", "zero2"])
def test_deepspeed_zero_trains_what_ddp_trains(tiny_bert, tmp_path, ddp_moe, stage):
    """ZeRO-3 partitions the upcycled-on-the-fly MoE (its MoE blocks leaf modules) and gathers it to save;
    both stages read, per rank, the batches DDP's rank reads."""
    reference_folder, reference = ddp_moe
    out = tmp_path / stage
    results = launch(tmp_path, recipe_args(tiny_bert, out, 8, *VARIANTS["moe"]), stage)
    assert_same_run(results, reference, ENGINE_LOSS_RTOL)
    assert abs(results["eval_accuracy"] - reference["eval_accuracy"]) <= 1 / 128  # at most one sentence flips
    assert_same_weights(out, reference_folder, ENGINE_WEIGHT_ATOL)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """A tiny dropout-free Llama: transformers' FSDP2 shards decoders by their `_fsdp_plan`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from conftest import sample_bpe_tokenizer

    folder = tmp_path_factory.mktemp("tiny_llama")
    tokenizer = sample_bpe_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_fsdp2_through_transformers_trains_what_ddp_trains(tiny_llama, tmp_path):
    """`torchrun --nproc_per_node 2 recipes/translation.py ... --fsdp_size 2`: the upcycled-on-the-fly model is
    loaded in shards (every parameter a DTensor), trains as DDP does, generates in step on both ranks and
    saves the same folder (its own code, not FSDP's)."""
    multi30k = DATA / "multi30k"
    runs = {}
    for engine in ("ddp", "fsdp_size"):
        out = tmp_path / engine
        args = [str(a) for a in (
            "--model_name_or_path", tiny_llama, "--train_file", multi30k / "train", "--validation_file",
            multi30k / "val", "--source_lang", "en", "--target_lang", "de", "--max_train_samples", 32,
            "--max_eval_samples", 8, "--per_device_train_batch_size", 4, "--per_device_eval_batch_size", 4,
            "--learning_rate", "2e-3", "--max_length", 64, "--max_target_length", 8, "--max_train_steps", 3,
            "--num_generation_samples", 3, "--logging_steps", 1, "--seed", 0, "--output_dir", out,
            "upcycling.num_experts=4", "upcycling.layers=all")]
        runs[engine] = launch(tmp_path, args, engine, recipe="translation")
    fsdp, ddp = runs["fsdp_size"], runs["ddp"]
    assert fsdp["engine"]["dtensor_parameters"] == fsdp["engine"]["parameters"] > 0
    assert_same_run(fsdp, ddp, ENGINE_LOSS_RTOL)
    assert fsdp["eval_loss"] == pytest.approx(ddp["eval_loss"], rel=ENGINE_LOSS_RTOL)
    assert_same_weights(tmp_path / "fsdp_size", tmp_path / "ddp", ENGINE_WEIGHT_ATOL)
    assert sorted(p.name for p in (tmp_path / "fsdp_size").iterdir()) == sorted(p.name for p in
                                                                              (tmp_path / "ddp").iterdir())


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
