"""The benchmark helpers measure what they claim (the benchmarks themselves are not timed tests)."""

import json
import subprocess
import sys
from pathlib import Path

import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
from common import cpu_peak_bytes, paired_ratios  # noqa: E402

MiB = 2**20


def run_benchmark(script, args, out, timeout):
    """benchmarks/<script> run with `args` in a fresh interpreter, writing `out`: the JSON it wrote."""
    proc = subprocess.run([sys.executable, str(BENCHMARKS / script), *args, "--out", str(out)], capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_cpu_peak_bytes_counts_the_high_water_mark_of_tensors_made_inside():
    kept = torch.ones(4 * MiB, dtype=torch.uint8)  # alive before: not counted

    def fn():
        a = torch.ones(1 * MiB, dtype=torch.uint8)
        b = torch.ones(2 * MiB, dtype=torch.uint8)  # peak here: a + b = 3 MiB
        del a, b
        c = torch.ones(2 * MiB + MiB // 2, dtype=torch.uint8)  # 2.5 MiB, after the frees
        del c

    peak = cpu_peak_bytes(fn)
    assert peak is not None, "the profiler recorded no memory events"
    assert 3 * MiB <= peak < 3 * MiB + 64 * 1024, peak / MiB
    assert kept.sum() == 4 * MiB


def test_cpu_peak_bytes_sees_autograd_buffers():
    x = torch.randn(256, 512, requires_grad=True)
    w = torch.randn(512, 1024, requires_grad=True)

    def fn():
        (x @ w).relu().sum().backward()

    peak = cpu_peak_bytes(fn)
    # Peak in backward: the gradient of the (256, 1024) product (1 MiB) and those of w (2 MiB) and
    # x (0.5 MiB) are alive at once; the product was freed after the ReLU, the ReLU's saved output
    # once its backward had used it. Counting frees at an op's start would report 2.5 MiB.
    expected = (256 * 1024 + 512 * 1024 + 256 * 512) * 4
    assert expected <= peak < expected + 64 * 1024, (peak / MiB, expected / MiB)


def test_probe_routing_reads_a_saved_mod_classifier(tmp_path, capsys):
    """The RESULTS.md routing probe loads a saved MoD classifier through its remote code and reports
    [CLS] computed in every routed block (pinned by default), with the router weight norms."""
    from transformers import AutoTokenizer

    import hf_condcomp

    sys.path.insert(0, str(BENCHMARKS / "quality"))
    from probe_routing import main as probe

    path = hf_condcomp.assets.minilm_path()
    model = hf_condcomp.upcycle("all-MiniLM-L6-v2", task="sequence-classification", num_labels=3, variant="mod",
                                capacity=0.3, layers="all")
    model.save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(path).save_pretrained(tmp_path)
    data = Path(__file__).resolve().parent / "data" / "banking77" / "test.csv"
    probe([str(tmp_path), "--num", "8", "--words", "3", "--data", str(data)])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("layer ")]
    assert len(lines) == 6
    assert all("[CLS] computed 1.00" in line and "router |w| 0.000" in line for line in lines)


def test_paired_ratios_divide_within_each_round():
    # a slow round (x10) hits both: per-round ratios stay 0.5, though the medians of each differ
    times = {"ours": [1.0, 10.0, 1.0], "peer": [2.0, 20.0, 2.0], "other": [0.5, 50.0, 4.0]}
    got = paired_ratios(times, "ours", "peer")
    assert got == {"median": 0.5, "min": 0.5, "max": 0.5, "rounds": 3, "rounds_faster": 3}
    got = paired_ratios(times, "ours", "other")
    assert got["median"] == 0.25 and got["rounds_faster"] == 2 and got["max"] == 2.0


def test_bench_gated_runs_and_reports_the_executed_fraction(tmp_path):
    """bench_gated.py at a toy size: every model runs, and the executed fractions are the models' own
    (capacity 0.5 executes half the tokens; random gates at threshold 0.5 a share strictly between)."""
    result = run_benchmark("bench_gated.py", ["--batch", "2", "--seq-len", "16", "--capacities", "1.0,0.5",
                                               "--thresholds", "0.5", "--repeats", "1", "--train-repeats", "1",
                                               "--threads", "1"], tmp_path / "gated.json", timeout=600)
    rows = {row["model"]: row for row in result["results"]}
    assert set(rows) == {"dense", "mod c=1", "mod c=0.5", "gate t=0.5"}
    assert rows["mod c=1"]["executed_fraction"] == 1.0
    assert rows["mod c=0.5"]["executed_fraction"] == 0.5
    assert 0.0 < rows["gate t=0.5"]["executed_fraction"] < 1.0


def test_bench_seq2seq_quick_writes_its_rows(tmp_path):
    """The encoder-decoder benchmark runs end to end on a toy Marian and writes its table as JSON."""
    result = run_benchmark("bench_seq2seq.py", ["--quick", "--threads", "1"], tmp_path / "bench.json", timeout=300)
    assert [row["bench"] for row in result["rows"]] == [f"{what}, top-{k}" for k in (2, 1) for what in (
        "train step (s)", "greedy decode (tok/s)")]
    assert all(row["dense"] > 0 and row["moe"] > 0 for row in result["rows"])
    assert set(result["paired_time_ratios"]) == {"moe-top2", "moe-top1"} and result["machine"]["torch_threads"] == 1
    assert result["param_counts"]["moe-top2"] > result["param_counts"]["dense"]


def test_merge_finetunes_runs_end_to_end_on_a_tiny_random_llama(tmp_path):
    """The RESULTS.md merge benchmark, on a random tiny Llama and made-up texts (`--tiny --quick`):
    every model is evaluated on both domains, the copy-upcycle of fine-tune A starts exactly at
    fine-tune A, and each MoE layer's first-choice shares are a distribution over the 2 experts."""
    sys.path.insert(0, str(BENCHMARKS / "quality"))
    from merge_finetunes import main as merge_finetunes

    out = tmp_path / "merge.json"
    threads = torch.get_num_threads()
    try:  # one thread, as the benchmark runs: a tiny model's ops gain nothing from more
        record = merge_finetunes(["--tiny", "--quick", "--threads", "1", "--output", str(out)])
    finally:
        torch.set_num_threads(threads)
    assert json.loads(out.read_text())["eval_loss"] == record["eval_loss"]
    a, b = record["domain_names"]
    copy_label = f"copy-upcycle of fine-tune {a}"
    assert set(record["eval_loss"]) == {"base", f"fine-tune {a}", f"fine-tune {b}", "merged, step 0",
                                        "merged (average as shared), step 0", f"{copy_label}, step 0",
                                        "merged, after joint fine-tune", f"{copy_label}, after joint fine-tune"}
    for domain in (a, b):
        assert abs(record["eval_loss"][f"{copy_label}, step 0"][domain]
                   - record["eval_loss"][f"fine-tune {a}"][domain]) < 1e-5
    shares = record["routing_share"]["merged, step 0"]
    assert set(shares) == {a, b} and len(shares[a]) == len(record["moe_layers"]) == 4
    assert all(len(s) == 2 and abs(sum(s) - 1) < 1e-6 for per in shares.values() for s in per.values())
