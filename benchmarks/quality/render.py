"""Render RESULTS.md (repo root) from benchmarks/quality/results/*.json.

    python benchmarks/quality/render.py

Only numbers from the JSONs appear in the tables; prose around them is in TEMPLATE below and
states what was not run.
"""

import json
import statistics
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
RESULTS = HERE / "results"

LABELS = {
    "dense": "dense (1 expert, top-1: the dense FFN)",
    "moe_copy_tc": "MoE copy, token choice top-2, aux 0.01",
    "moe_copy_tc_noaux": "MoE copy, token choice top-2, no aux loss",
    "moe_copy_ec": "MoE copy, expert choice, capacity factor 2",
    "moe_split_kmeans": "MoE split-kmeans, token choice top-2",
    "moe_split_random": "MoE split-random, token choice top-2",
    "mod_c0.5": "MoD, capacity 0.5, every other layer",
    "mod_c0.5_all": "MoD, capacity 0.5, all layers",
    "gate_p0.1": "gate, compute penalty 0.1, threshold 0.5, every other layer",
}


def load_runs():
    runs = {}
    for path in sorted((RESULTS / "classification").glob("*.json")):
        r = json.loads(path.read_text())
        runs.setdefault(r["arm"], []).append(r)
    return runs


def fmt(x, nd=3):
    if x is None:
        return "n/a"
    return f"{x:.1e}" if 0 < abs(x) < 10 ** -nd else f"{x:.{nd}f}"


def before_table():
    path = RESULTS / "before_training.json"
    if not path.exists():
        return "_Not run._\n", None
    data = json.loads(path.read_text())
    lines = ["| model | layers | top-k of 8 | relative error of final hidden states | cosine of mean-pooled embeddings | 1-NN intent accuracy |",
             "|---|---|---|---|---|---|"]
    for r in data["rows"]:
        lines.append(f"| {r['init'] or 'dense parent'} | {r['layers'] or '-'} | {r['top_k'] or '-'} | "
                     f"{fmt(r['relative_error'], 4)} | {fmt(r['cosine'], 4)} | {fmt(r['knn_accuracy'], 3)} |")
    return "\n".join(lines) + "\n", data


def classification_table(runs):
    lines = ["| arm | seeds | accuracy per seed | accuracy mean ± std | macro-F1 mean | eval compute fraction | wall s (whole run) | wall ratio to dense |",
             "|---|---|---|---|---|---|---|---|"]
    dense_wall = statistics.mean(r["wall_seconds"] for r in runs["dense"]) if "dense" in runs else None
    for arm in LABELS:
        if arm not in runs:
            continue
        rs = sorted(runs[arm], key=lambda r: r["seed"])
        acc = [r["results"]["eval_accuracy"] for r in rs]
        f1 = [r["results"]["eval_macro_f1"] for r in rs]
        cf = [r["results"].get("eval_compute_fraction") for r in rs]
        wall = statistics.mean(r["wall_seconds"] for r in rs)
        std = f" ± {statistics.stdev(acc):.3f}" if len(acc) > 1 else " (1 seed)"
        lines.append(
            f"| {LABELS[arm]} | {','.join(str(r['seed']) for r in rs)} | {', '.join(f'{a:.3f}' for a in acc)} | "
            f"{statistics.mean(acc):.3f}{std} | {statistics.mean(f1):.3f} | {fmt(statistics.mean(c for c in cf if c is not None) if any(c is not None for c in cf) else None)} | "
            f"{wall:.0f} | {fmt(wall / dense_wall if dense_wall else None, 2)} |")
    return "\n".join(lines) + "\n"


def paired_gap(runs, arm="moe_copy_tc", ref="dense"):
    a = {r["seed"]: r["results"]["eval_accuracy"] for r in runs.get(arm, [])}
    d = {r["seed"]: r["results"]["eval_accuracy"] for r in runs.get(ref, [])}
    seeds = sorted(set(a) & set(d))
    if not seeds:
        return None, []
    gaps = [100 * (a[s] - d[s]) for s in seeds]
    return statistics.mean(gaps), [f"seed {s}: {g:+.2f}" for s, g in zip(seeds, gaps)]


def balance_table(runs):
    lines = ["| arm | seed | MoE layer | tokens per expert | max/mean load | dropped assignments | dropped share | dead experts |",
             "|---|---|---|---|---|---|---|---|"]
    for arm in ("moe_copy_tc", "moe_copy_tc_noaux", "moe_copy_ec", "moe_split_kmeans", "moe_split_random"):
        for r in sorted(runs.get(arm, []), key=lambda r: r["seed"])[:1]:
            layers = r["results"]["routing"].get("moe_layers", {})
            for layer, s in sorted(layers.items(), key=lambda kv: int(kv[0])):
                total = sum(s["tokens_per_expert"]) + s["dropped"]
                lines.append(f"| {LABELS[arm]} | {r['seed']} | {layer} | {s['tokens_per_expert']} | {s['max_over_mean']:.3f} | "
                             f"{s['dropped']} | {s['dropped'] / total if total else 0:.3f} | {s['dead_experts']} |")
    return "\n".join(lines) + "\n"


def commands(runs):
    seen = []
    for arm in LABELS:
        for r in sorted(runs.get(arm, []), key=lambda r: r["seed"]):
            seen.append(f"# {arm} seed {r['seed']} (commit {r['commit'][:12]})\n{r['command']}")
    return "\n".join(seen)


def tradeoff_plot(runs):
    """Accuracy against executed compute fraction (eval mode) for the dense and gated arms run."""
    arms = [a for a in ("dense", "mod_c0.5", "mod_c0.5_all", "gate_p0.1") if a in runs]
    if not any(a != "dense" for a in arms):
        return "_Not run: no gated arm finished in this session._"
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for arm in arms:
        xs = [r["results"]["eval_compute_fraction"] for r in runs[arm]]
        ys = [r["results"]["eval_accuracy"] for r in runs[arm]]
        ax.scatter(xs, ys, label=f"{arm} ({len(xs)} seed{'s' * (len(xs) > 1)})")
    ax.set_xlabel("executed compute fraction, whole model (eval)")
    ax.set_ylabel("Banking77 accuracy (512 test)")
    ax.set_title("Compute trade-off, 120 steps on CPU", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(HERE / "compute_tradeoff.png", dpi=90)
    return "![accuracy vs executed compute](benchmarks/quality/compute_tradeoff.png)"


def main():
    runs = load_runs()
    before, before_data = before_table()
    gap, gap_seeds = paired_gap(runs)
    ec_ok = None
    if "moe_copy_ec" in runs:
        ratios = [s["max_over_mean"] for r in runs["moe_copy_ec"] for s in r["results"]["routing"]["moe_layers"].values()]
        ec_ok = (min(ratios), max(ratios))
    text = (HERE / "RESULTS.template.md").read_text()
    fields = {
        "before_table": before,
        "before_commit": before_data["commit"][:12] if before_data else "n/a",
        "before_wall": f"{before_data['wall_seconds']:.0f}" if before_data else "n/a",
        "classification_table": classification_table(runs),
        "gap": "n/a" if gap is None else f"{gap:+.2f} accuracy points on average (MoE minus dense, paired by seed: {'; '.join(gap_seeds)})",
        "balance_table": balance_table(runs),
        "ec_range": "not run" if ec_ok is None else f"{ec_ok[0]:.4f} to {ec_ok[1]:.4f}",
        "commands": commands(runs),
        "tradeoff": tradeoff_plot(runs),
    }
    for key, value in fields.items():
        text = text.replace("{{" + key + "}}", value)
    (ROOT / "RESULTS.md").write_text(text)
    print(f"wrote {ROOT / 'RESULTS.md'}")


if __name__ == "__main__":
    main()
