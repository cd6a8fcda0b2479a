"""Routing insight: exact statistics on hand-set routers, figures that read back to the
JSON numbers, `compare` of a model with itself, and clear errors on bad input."""

import json
import math
import os
import subprocess
import sys
import tempfile
import types

import pytest
import torch
import torch.nn as nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HOME", tempfile.mkdtemp(prefix="hf_home_"))

import hf_condcomp  # noqa: E402
from hf_condcomp import assets, cli  # noqa: E402
from hf_condcomp.insight import compare, format_inspect, inspect, load_stats, routing_summary, save_plots  # noqa: E402

TEXTS = [
    "How do I locate my card?",
    "I still have not received my new card, I ordered over a week ago.",
    "What is the exchange rate?",
    "Why was I charged a fee?",
    "Can I top up by bank transfer?",
]


def tiny_bert(vocab_size=99, num_layers=2, seed=0):
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    return BertModel(BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=num_layers,
                                num_attention_heads=4, intermediate_size=36))


def moe_modules(model):
    return [m for m in model.modules() if hasattr(m, "record_routing")]


class PositionRouter(nn.Module):
    """Router by hand: the token at position t of a (B, T) batch prefers expert plan[t % len(plan)]
    (logit 10), then expert `second` (logit 5); all other logits 0."""

    def __init__(self, num_experts, seq_len, plan, second=None):
        super().__init__()
        self.num_experts, self.seq_len, self.plan, self.second = num_experts, seq_len, plan, second

    def forward(self, x):  # x (B*T, H) -> (B*T, E)
        t = torch.arange(x.shape[0]) % self.seq_len
        logits = torch.zeros(x.shape[0], self.num_experts)
        if self.second is not None:
            logits[:, self.second] = 5.0
        logits[torch.arange(x.shape[0]), torch.tensor(self.plan)[t % len(self.plan)]] = 10.0
        return logits


def batch(lengths, seq_len, vocab=99):
    ids = (torch.arange(len(lengths) * seq_len).reshape(len(lengths), seq_len) % (vocab - 1)) + 1
    mask = torch.zeros(len(lengths), seq_len, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask}


def test_hand_set_router_gives_exact_counts_entropy_and_dead_experts():
    model = hf_condcomp.upcycle(tiny_bert(), num_experts=4, top_k=1, layers="all")
    for m in moe_modules(model):
        m.gate = PositionRouter(4, seq_len=6, plan=[0, 1, 2])  # expert 3 never chosen
    # Real tokens: row 0 positions 0..5 -> 0,1,2,0,1,2; row 1 positions 0..3 -> 0,1,2,0 (2 padded).
    result = routing_summary(model, [batch([6, 4], 6), batch([6, 6], 6)])
    json.dumps(result)  # plain data
    # second batch: 12 tokens -> 4 per expert 0..2
    counts = [4 + 4, 3 + 4, 3 + 4, 0]
    p = [c / 22 for c in counts]
    raw = -sum(q * math.log(q) for q in p if q > 0)
    for layer in ("0", "1"):
        s = result["moe_layers"][layer]
        assert s["tokens_per_expert"] == counts
        assert s["num_tokens"] == 22 and s["dropped"] == 0 and s["unrouted_tokens"] == 0
        assert s["dead_experts"] == [3]
        assert s["load_entropy_raw"] == pytest.approx(raw, abs=1e-12)
        assert s["load_entropy"] == pytest.approx(raw / math.log(4), abs=1e-12)
        assert s["max_over_mean"] == pytest.approx(8 / (22 / 4))
    assert result["gated_layers"] == {} and result["compute_fraction"] == 1.0


class SharedPreferenceRouter(nn.Module):
    """Experts 0 and 1 both prefer later positions (logit = position), expert 2 earlier ones (logit 0)."""

    def forward(self, x):  # x (N, H) -> (N, 3); one unpadded row, so row n is position n
        t = torch.arange(x.shape[0], dtype=torch.float32)
        return torch.stack([t, t, torch.zeros_like(t)], dim=-1)


def test_expert_choice_counts_the_tokens_no_expert_picked():
    model = hf_condcomp.upcycle(tiny_bert(), num_experts=3, top_k=1, routing="expert_choice", capacity_factor=1.0,
                                layers=[0])
    (moe,) = moe_modules(model)
    moe.gate = SharedPreferenceRouter()
    # 6 tokens, capacity ceil(6 * 1 / 3) = 2: experts 0 and 1 both take positions 5 and 4, expert 2
    # takes positions 0 and 1, so positions 2 and 3 pass through the residual only.
    s = routing_summary(model, [batch([6], 6)])["moe_layers"]["0"]
    assert s["tokens_per_expert"] == [2, 2, 2] and s["max_over_mean"] == 1.0
    assert s["unrouted_tokens"] == 2 and s["num_tokens"] == 6 and s["dropped"] == 0


def test_top2_counts_and_most_frequent_tokens_per_expert():
    model = hf_condcomp.upcycle(tiny_bert(), num_experts=4, top_k=2, layers=[1])
    (moe,) = moe_modules(model)
    moe.gate = PositionRouter(4, seq_len=5, plan=[0, 1], second=3)
    b = batch([5, 5, 3], 5)
    b["input_ids"][:, 1] = 42  # position 1 goes to expert 1 in every row
    result = inspect(model, batches=[b], top_tokens=2)
    s = result["moe_layers"]["1"]
    # 13 real tokens; positions 0,2,4 -> expert 0 (3+3+2), positions 1,3 -> expert 1 (2+2+1), all -> 3
    assert s["tokens_per_expert"] == [8, 5, 0, 13]
    assert s["dead_experts"] == [2] and s["num_tokens"] == 13
    assert s["top_tokens"][1][0] == ["42", 3]
    assert s["top_tokens"][3][0] == ["42", 3] and len(s["top_tokens"][3]) == 2
    assert s["top_tokens"][2] == []
    assert result["sample"] is None  # no tokenizer: no sample sentence
    # the table counts the dead experts, then names them: "dead experts: 0" is never expert 0
    assert "dead experts: 1 (expert 2)" in format_inspect(result).splitlines()[0]


def test_load_stats_extremes():
    assert load_stats([5, 5, 5, 5])["load_entropy"] == pytest.approx(1.0)
    assert load_stats([5, 5, 5, 5])["max_over_mean"] == pytest.approx(1.0)
    one = load_stats([0, 12, 0, 0])
    assert one["load_entropy"] == 0.0 and one["max_over_mean"] == 4.0 and one["dead_experts"] == [0, 2, 3]


def test_mode_and_record_flags_are_restored():
    model = hf_condcomp.upcycle(tiny_bert(), num_experts=4, top_k=2).train()
    routing_summary(model, [batch([4], 4)])
    assert model.training and not any(m.record_routing for m in moe_modules(model))


def test_model_without_moe_or_gated_layers_is_refused():
    with pytest.raises(ValueError, match="no MoE or gated layers"):
        routing_summary(tiny_bert(), [batch([4], 4)])


class FakeGate(nn.Module):
    """A compute gate by hand, recording like `modeling/depth.py`'s: one (B, T) executed mask per
    forward appended to `routing_log` while `record_routing` is on."""

    def __init__(self):
        super().__init__()
        self.record_routing = False
        self.routing_log = ["the user's own entry"]


class FakeGatedModel(nn.Module):
    """Two layers, layer 1 gated (runs even token ids only), reporting `layer_compute_fractions`."""

    def __init__(self):
        super().__init__()
        self.config = types.SimpleNamespace(gate_layers=[1], mod_layers=[], moe_layers=[], num_hidden_layers=2)
        self.layers = nn.ModuleList([nn.Linear(2, 2), nn.Linear(2, 2)])
        self.layers[1].layer_idx = 1
        self.layers[1].compute_gate = FakeGate()

    def forward(self, input_ids, attention_mask):
        real = attention_mask.bool()
        executed = (input_ids % 2 == 0) & real  # (B, T)
        gate = self.layers[1].compute_gate
        if gate.record_routing:
            gate.routing_log.append(executed)
        fraction = float(executed.sum() / real.sum())
        return types.SimpleNamespace(compute_fraction=(1 + fraction) / 2, layer_compute_fractions={1: fraction})


def test_gated_layers_compute_fraction_and_most_skipped_tokens(tmp_path):
    b1 = {"input_ids": torch.tensor([[2, 3, 4, 5]]), "attention_mask": torch.tensor([[1, 1, 1, 1]])}  # 2 of 4 run
    b2 = {"input_ids": torch.tensor([[3, 3, 2, 9]]), "attention_mask": torch.tensor([[1, 1, 1, 0]])}  # 1 of 3 run
    model = FakeGatedModel()
    result = inspect(model, batches=[b1, b2])
    assert model.layers[1].compute_gate.routing_log == ["the user's own entry"]  # put back
    expected = (2 + 1) / 7  # token-weighted over both forwards
    assert result["gated_layers"]["1"]["compute_fraction"] == pytest.approx(expected)
    assert result["compute_fraction"] == pytest.approx((1 + expected) / 2)
    # token 3 is seen 3 times and always skipped; 2 seen twice, never skipped; padding (9) not counted
    assert result["gated_layers"]["1"]["most_skipped_tokens"] == [["3", 1.0, 3], ["2", 0.0, 2]]
    assert result["moe_layers"] == {}
    plots = save_plots({**result, "sample": {"tokens": ["a", "b", "c", "d"], "executed": {"1": [1, 0, 1, 0]},
                                             "top1_expert": {}}}, tmp_path)
    assert plots["token_map"]["kind"] == "compute" and (tmp_path / "token_map.png").is_file()


# ----- command line on a saved model folder ------------------------------------------------------


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A small random BERT upcycled to 4 experts (vocab of the real MiniLM tokenizer, saved with
    it), and a dense BERT of the same size."""
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("inspect")
    tokenizer = AutoTokenizer.from_pretrained(assets.minilm_path())
    dense = tiny_bert(vocab_size=tokenizer.vocab_size, num_layers=3)
    moe = hf_condcomp.upcycle(dense, num_experts=4, top_k=2, layers="all", init="noise", seed=1)
    for name, model in (("moe", moe), ("dense", dense)):
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    (root / "texts.txt").write_text("\n".join(TEXTS) + "\n")
    return root


def run_cli(argv, capsys):
    rc = cli.main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_cli_inspect_json_table_and_plots_read_back(folders, tmp_path, capsys):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.image as mpimg
    from matplotlib import colormaps
    from PIL import Image

    rc, out, err = run_cli(
        ["inspect", folders / "moe", "--text-file", folders / "texts.txt", "--json", tmp_path / "r.json",
         "--plots", tmp_path / "plots"],
        capsys,
    )
    assert rc == 0, err
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["num_texts"] == len(TEXTS) and sorted(result["moe_layers"]) == ["0", "1", "2"]
    assert "MoE layer 0" in out and "load entropy" in out and "expert_load.png" in out
    for _layer, s in result["moe_layers"].items():
        assert sum(s["tokens_per_expert"]) == 2 * s["num_tokens"]  # top-2, dropless

    heat = result["plots"]["expert_load"]
    for info in result["plots"].values():
        with Image.open(info["path"]) as img:
            img.verify()
        with Image.open(info["path"]) as img:
            assert img.format == "PNG" and img.size == (info["width"], info["height"])
    # Read the heatmap's cells back: the colour in each cell decodes to the JSON share.
    pixels = mpimg.imread(heat["path"])[..., :3]  # (height, width, 3) in [0, 1]
    lut = colormaps[heat["cmap"]](torch.linspace(0, 1, 256).numpy())[:, :3]  # (256, 3)
    x0, y0, x1, y1 = heat["cells_px"]
    rows, cols = len(heat["rows"]), len(heat["matrix"][0])
    for i, layer in enumerate(heat["rows"]):
        counts = result["moe_layers"][layer]["tokens_per_expert"]
        for j, c in enumerate(counts):
            # a quarter into the cell: off its centre, where the count is written
            x = int(x0 + (j + 0.25) * (x1 - x0) / cols)
            y = int(y0 + (i + 0.25) * (y1 - y0) / rows)
            k = int(((lut - pixels[y, x]) ** 2).sum(-1).argmin())
            decoded = heat["vmin"] + k / 255 * (heat["vmax"] - heat["vmin"])
            assert decoded == pytest.approx(c / sum(counts), abs=heat["vmax"] / 128)
            assert heat["matrix"][i][j] == pytest.approx(c / sum(counts))
    assert result["plots"]["token_map"]["kind"] == "experts"
    assert result["plots"]["token_map"]["matrix"] == list(result["sample"]["top1_expert"].values())


def test_cli_compare_with_itself_is_100_percent(folders, tmp_path, capsys):
    rc, out, err = run_cli(["compare", folders / "moe", folders / "moe", "--text-file", folders / "texts.txt",
                            "--json", tmp_path / "c.json"], capsys)
    assert rc == 0, err
    result = json.loads((tmp_path / "c.json").read_text())
    assert result["top1_kept"] == 1.0 and result["topk_overlap"] == 1.0
    assert all(s["top1_kept"] == 1.0 and s["topk_overlap"] == 1.0 for s in result["moe_layers"].values())
    assert "100.0%" in out


def test_compare_sees_a_permuted_router():
    """Rolling the router's rows by one moves every token's top-1 expert: 0% kept."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(assets.minilm_path())
    a = hf_condcomp.upcycle(tiny_bert(vocab_size=tokenizer.vocab_size), num_experts=4, top_k=1, layers=[1],
                            init="noise")
    b = hf_condcomp.upcycle(tiny_bert(vocab_size=tokenizer.vocab_size), num_experts=4, top_k=1, layers=[1],
                            init="noise")
    (router,) = [m.gate for m in moe_modules(b)]
    with torch.no_grad():
        router.weight.copy_(torch.roll(moe_modules(a)[0].gate.weight, 1, dims=0))
    result = compare(a, b, TEXTS, tokenizer)
    assert result["moe_layers"]["1"]["top1_kept"] == 0.0 and result["topk_overlap"] == 0.0


def test_cli_refuses_a_model_without_moe_or_gated_layers(folders, capsys):
    rc, _, err = run_cli(["inspect", folders / "dense", "--text-file", folders / "texts.txt"], capsys)
    assert rc == 2 and "no MoE or gated layers" in err


@pytest.mark.parametrize("content", [None, "", "\n  \n"])
def test_cli_missing_or_empty_text_file_is_named(folders, tmp_path, capsys, content):
    path = tmp_path / "texts.txt"
    if content is not None:
        path.write_text(content)
    rc, _, err = run_cli(["inspect", folders / "moe", "--text-file", path], capsys)
    assert rc == 2 and str(path) in err
    assert ("does not exist" in err) if content is None else ("no non-empty text" in err)


def test_cli_data_file_column(folders, tmp_path, capsys):
    csv = tmp_path / "d.csv"
    csv.write_text('text,category\n"How do I locate my card?",card\nWhat is the rate?,rate\n')
    rc, out, err = run_cli(["inspect", folders / "moe", "--data-file", csv, "--column", "text",
                            "--json", tmp_path / "r.json"], capsys)
    assert rc == 0, err
    assert json.loads((tmp_path / "r.json").read_text())["num_texts"] == 2
    rc, _, err = run_cli(["inspect", folders / "moe", "--data-file", csv, "--column", "sentence"], capsys)
    assert rc == 2 and "'sentence'" in err and "category" in err


def test_trust_remote_code_model_is_inspected_by_duck_typing(folders):
    """Loaded without hf_condcomp imported, the MoE modules come from transformers' dynamic module."""
    code = f"""
import json, torch, transformers
model = transformers.AutoModel.from_pretrained({str(folders / 'moe')!r}, trust_remote_code=True)
moe = [m for m in model.modules() if hasattr(m, "record_routing")]
from hf_condcomp.insight import routing_summary
ids = torch.arange(1, 13).reshape(2, 6) * 7
print(json.dumps({{"module": type(moe[0]).__module__,
                  "summary": routing_summary(model, [{{"input_ids": ids, "attention_mask": torch.ones_like(ids)}}])}}))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env={**os.environ})
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not got["module"].startswith("hf_condcomp")
    assert sorted(got["summary"]["moe_layers"]) == ["0", "1", "2"]
    assert all(s["num_tokens"] == 12 for s in got["summary"]["moe_layers"].values())


def test_hub_dataset_offline_fails_with_a_clear_message(folders, capsys):
    rc, _, err = run_cli(["inspect", folders / "moe", "--dataset", "no-such-user/no-such-dataset"], capsys)
    assert rc == 2 and "--dataset 'no-such-user/no-such-dataset'" in err and "--data-file" in err


def test_real_mixture_of_depths_compute_fraction_is_exact():
    """Encoder MoD at capacity 0.5 runs ceil(0.5 * n) tokens of each sequence of n real tokens."""
    model = hf_condcomp.upcycle(tiny_bert(num_layers=3), variant="mod", capacity=0.5, layers=[1])
    with torch.no_grad():
        model.encoder.layer[1].mod_router.weight.normal_()
    b = batch([7, 4, 1], 7)
    result = inspect(model, batches=[b])
    assert result["gated_layers"]["1"]["compute_fraction"] == pytest.approx((4 + 2 + 1) / 12)
    assert result["compute_fraction"] == pytest.approx((2 + 7 / 12) / 3)
    skipped = result["gated_layers"]["1"]["most_skipped_tokens"]
    assert skipped == [] or all(0.0 <= rate <= 1.0 for _, rate, _ in skipped)


def test_moe_inside_a_routed_block_maps_tokens_back():
    """MoE FFN in a Mixture-of-Depths block sees only the kept tokens: skipped tokens get no expert
    (-1) and every kept token exactly top-k experts."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(assets.minilm_path())
    model = hf_condcomp.upcycle(tiny_bert(vocab_size=tokenizer.vocab_size), num_experts=4, top_k=2, layers=[1],
                                mod_layers=[1], capacity=0.5)
    with torch.no_grad():
        model.encoder.layer[1].mod_router.weight.normal_()
    result = inspect(model, TEXTS, tokenizer)
    ran = result["sample"]["executed"]["1"]
    top1 = result["sample"]["top1_expert"]["1"]
    assert sum(ran) == math.ceil(0.5 * len(ran))
    assert [e == -1 for e in top1] == [r == 0 for r in ran]
    s = result["moe_layers"]["1"]
    kept = round(result["gated_layers"]["1"]["compute_fraction"] * sum(len(tokenizer(t)["input_ids"]) for t in TEXTS))
    assert s["num_tokens"] == kept and sum(s["tokens_per_expert"]) == 2 * kept
    assert sum(c for per_expert in s["top_tokens"] for _, c in per_expert) <= 2 * kept
    assert compare(model, model, TEXTS, tokenizer)["top1_kept"] == 1.0
