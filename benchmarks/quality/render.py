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
    "mod_c0.9_all": "MoD, capacity 0.9, all layers",
    "mod_c0.75_all": "MoD, capacity 0.75, all layers",
    "mod_c0.6_all": "MoD, capacity 0.6, all layers",
    "mod_c0.55_all": "MoD, capacity 0.55, all layers",
    "mod_c0.55_all_nopin": "MoD, capacity 0.55, all layers, [CLS] not pinned",
    "mod_c0.45_all_keys": "MoD, capacity 0.45, all layers, skipped tokens kept as keys",
    "mod_c0.5_all_keys": "MoD, capacity 0.5, all layers, skipped tokens kept as keys",
    "mod_c0.55_all_rlr1e-3": "MoD, capacity 0.55, all layers, router lr 1e-3",
    "mod_c0.55_all_rlr1e-2": "MoD, capacity 0.55, all layers, router lr 1e-2",
    "mod_c0.5_all_rlr": "MoD, capacity 0.5, all layers, router lr 1e-2",
    "gate_all_p0.005_rlr": "gate, penalty 0.005, threshold 0.5, all layers, gate lr 1e-2",
    "gate_all_p0.02_rlr": "gate, penalty 0.02, threshold 0.5, all layers, gate lr 1e-2",
    "gate_all_p0.05_rlr": "gate, penalty 0.05, threshold 0.5, all layers, gate lr 1e-2",
    "gate_all_p0.02_rlr_soft": "gate, penalty 0.02, as above but soft training",
}
GATED = [a for a in LABELS if a.startswith(("mod_", "gate_"))]
MOE = [a for a in LABELS if a not in GATED]  # dense and the MoE arms: the accuracy tables
TRANSLATION_LABELS = {
    "dense_lora": ("dense (1 expert, top-1)", "LoRA r=16 on attention + FFN, lr 2e-4"),
    "moe_lora": ("MoE copy, 4 experts top-2, every other layer",
                 "LoRA r=16 on attention + experts, routers full, lr 2e-4"),
    "dense_full": ("dense (1 expert, top-1)", "full fine-tuning, lr 5e-5"),
}
DIALOGUE_LABELS = {
    "dense_lora": "dense (1 expert, top-1)",
    "moe_lora": "MoE copy, 4 experts top-2, every other layer",
    "mod_c0.5_lora": "MoD, capacity 0.5, every other layer (causal predictor at eval)",
    # LoRA's keep-list did not include `mod_router` / `mod_predictor` in this run: PEFT froze them.
    "mod_c0.5_lora_frozen": "the same, routers and causal predictors frozen (not trained)",
}
FOLDERS = {"classification": LABELS, "classification_long": LABELS, "classification_sst2": LABELS,
           "translation": TRANSLATION_LABELS,
           "dialogue": DIALOGUE_LABELS}


def load_runs(folder="classification"):
    runs = {}
    for path in sorted((RESULTS / folder).glob("*.json")):
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
    lines = ["| model | layers | top-k of 8 | relative error of final hidden states | "
             "cosine of mean-pooled embeddings | 1-NN intent accuracy |",
             "|---|---|---|---|---|---|"]
    for r in data["rows"]:
        lines.append(f"| {r['init'] or 'dense parent'} | {r['layers'] or '-'} | {r['top_k'] or '-'} | "
                     f"{fmt(r['relative_error'], 4)} | {fmt(r['cosine'], 4)} | {fmt(r['knn_accuracy'], 3)} |")
    return "\n".join(lines) + "\n", data


def classification_table(runs, arms=MOE):
    lines = ["| arm | seeds | accuracy per seed | accuracy mean ± std | macro-F1 mean | eval compute fraction | "
             "wall s (whole run) | wall ratio to dense |",
             "|---|---|---|---|---|---|---|---|"]
    dense_wall = statistics.mean(r["wall_seconds"] for r in runs["dense"]) if "dense" in runs else None
    for arm in arms:
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
            f"{statistics.mean(acc):.3f}{std} | {statistics.mean(f1):.3f} | "
            f"{fmt(statistics.mean(c for c in cf if c is not None) if any(c is not None for c in cf) else None)} | "
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


def gap_text(runs, arm="moe_copy_tc"):
    gap, per_seed = paired_gap(runs, arm)
    if gap is None:
        return "n/a"
    return f"{gap:+.2f} accuracy points on average ({arm} minus dense, paired by seed: {'; '.join(per_seed)})"


def meets_gated_target(compute_fraction, gap_points):
    """The gated target: at most 60% executed compute, at most 2 accuracy points below dense."""
    return compute_fraction <= 0.60 and gap_points >= -2.0


def target_table(runs, arms):
    """The gated target judged on the mean over seeds: paired gap to dense and executed compute."""
    lines = ["| arm | seeds | executed compute, mean | accuracy, mean | minus dense, paired by seed (points) | "
             "mean gap | <= 60% compute and within 2 points |",
             "|---|---|---|---|---|---|---|"]
    for arm in arms:
        if arm not in runs:
            continue
        gap, per_seed = paired_gap(runs, arm)
        rs = runs[arm]
        cf = statistics.mean(r["results"]["eval_compute_fraction"] for r in rs)
        acc = statistics.mean(r["results"]["eval_accuracy"] for r in rs)
        ok = "n/a" if gap is None else ("yes" if meets_gated_target(cf, gap) else "no")
        lines.append(f"| {LABELS[arm]} | {len(rs)} | {cf:.3f} | {acc:.3f} | {'; '.join(per_seed) or 'n/a'} | "
                     f"{fmt(gap, 2) if gap is not None else 'n/a'} | {ok} |")
    return "\n".join(lines) + "\n"


def balance_table(runs):
    """Seed 0 of every MoE arm, and every seed of expert choice (whose unrouted tokens it shows)."""
    lines = ["| arm | seed | MoE layer | tokens per expert | max/mean load | dropped share | "
             "tokens no expert processed | dead experts |",
             "|---|---|---|---|---|---|---|---|"]
    for arm in ("moe_copy_tc", "moe_copy_tc_noaux", "moe_copy_ec", "moe_split_kmeans", "moe_split_random"):
        rs = sorted(runs.get(arm, []), key=lambda r: r["seed"])
        for r in rs if arm == "moe_copy_ec" else rs[:1]:
            layers = r["results"]["routing"].get("moe_layers", {})
            for layer, s in sorted(layers.items(), key=lambda kv: int(kv[0])):
                total = sum(s["tokens_per_expert"]) + s["dropped"]
                unrouted = s.get("unrouted_tokens")
                unrouted = ("not recorded" if unrouted is None
                            else f"{unrouted} of {s['num_tokens']} ({unrouted / s['num_tokens']:.1%})")
                lines.append(f"| {LABELS[arm]} | {r['seed']} | {layer} | {s['tokens_per_expert']} | "
                             f"{s['max_over_mean']:.3f} | "
                             f"{s['dropped'] / total if total else 0:.3f} | {unrouted} | {s['dead_experts']} |")
    return "\n".join(lines) + "\n"


def tradeoff_table(runs):
    """Gated arms on seed 0 against dense seed 0: executed compute, accuracy, the target test."""
    dense = {r["seed"]: r["results"]["eval_accuracy"] for r in runs.get("dense", [])}
    lines = ["| arm | seed | executed compute (eval) | per-layer executed fraction | accuracy | minus dense (points) | "
             "<= 60% compute and within 2 points |",
             "|---|---|---|---|---|---|---|"]
    for arm in ["dense", *GATED]:
        for r in sorted(runs.get(arm, []), key=lambda r: r["seed"]):
            res = r["results"]
            cf = res.get("eval_compute_fraction", 1.0)
            layers = res.get("routing", {}).get("gated_layers", {})
            per_layer = ", ".join(f"{float(v['compute_fraction']):.2f}"
                                  for _, v in sorted(layers.items(), key=lambda kv: int(kv[0]))) or "-"
            gap = 100 * (res["eval_accuracy"] - dense[r["seed"]]) if r["seed"] in dense else None
            ok = "-" if arm == "dense" or gap is None else ("yes" if meets_gated_target(cf, gap) else "no")
            lines.append(f"| {LABELS[arm]} | {r['seed']} | {cf:.3f} | {per_layer} | {res['eval_accuracy']:.3f} | "
                         f"{'-' if arm == 'dense' or gap is None else f'{gap:+.1f}'} | {ok} |")
    return "\n".join(lines) + "\n"


def translation_table(runs):
    lines = ["| model | fine-tuning | steps | sacreBLEU | chrF | validation loss | test sentences | compute fraction | "
             "wall s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for arm, (model, tuning) in TRANSLATION_LABELS.items():
        for r in runs.get(arm, []):
            res = r["results"]
            lines.append(f"| {model} | {tuning} | {res['train_steps']} | {res['eval_bleu']:.2f} | "
                         f"{res['eval_chrf']:.2f} | "
                         f"{res['eval_loss']:.3f} | {res['eval_samples']} "
                         f"({res.get('eval_bleu_split', 'validation')}) | "
                         f"{res['eval_compute_fraction']:.3f} | {r['wall_seconds']:.0f} |")
    return "\n".join(lines) + "\n" if len(lines) > 2 else "_Not run._\n"


def translation_samples(runs):
    out = []
    for arm in TRANSLATION_LABELS:
        for r in runs.get(arm, []):
            sample = r["results"]["samples"][0]
            if not out:
                out.append(f"Source: {sample['source']}  \nReference: {sample['reference']}  ")
            out.append(f"{arm}: {sample['translation']}  ")
    return "\n".join(out)


def dialogue_table(runs):
    lines = ["| model | steps | perplexity before | perplexity after | executed compute (eval) | wall s |",
             "|---|---|---|---|---|---|"]
    for arm, label in DIALOGUE_LABELS.items():
        for r in runs.get(arm, []):
            res = r["results"]
            lines.append(f"| {label} | {res['train_steps']} | {res['perplexity_before']:.2f} | "
                         f"{res['perplexity']:.2f} | "
                         f"{res['eval_compute_fraction']:.3f} | {r['wall_seconds']:.0f} |")
    return "\n".join(lines) + "\n" if len(lines) > 2 else "_Not run._\n"


def merge_data():
    path = RESULTS / "merge_finetunes.json"
    return json.loads(path.read_text()) if path.exists() else None


def merge_loss_table(data):
    """Held-out loss (and perplexity) of every model of the merge run, on both domains."""
    if data is None:
        return "_Not run._\n"
    a, b = data["domain_names"]
    lines = [f"| model | {a} loss (perplexity) | {b} loss (perplexity) | mean loss |", "|---|---|---|---|"]
    for label, per in data["eval_loss"].items():
        cells = " | ".join(f"{per[d]:.3f} ({data['perplexity'][label][d]:.2f})" for d in (a, b))
        lines.append(f"| {label} | {cells} | {(per[a] + per[b]) / 2:.3f} |")
    return "\n".join(lines) + "\n"


def merge_routing_table(data):
    """Share of each domain's held-out tokens whose first-choice expert is its own domain's expert:
    mean, min and max over the MoE layers, and in how many layers it is the majority."""
    if data is None:
        return "_Not run._\n"
    lines = ["| model | held-out domain | its own expert | share to it: mean over layers | min | max | "
             "layers where it is the majority |", "|---|---|---|---|---|---|---|"]
    for label, per_domain in data["routing_share"].items():
        for domain, layers in per_domain.items():
            own = data["expert_of_domain"][domain]
            shares = [s[own] for s in layers.values()]
            lines.append(f"| {label} | {domain} | {own} ({domain}) | {statistics.mean(shares):.3f} | "
                         f"{min(shares):.3f} | {max(shares):.3f} | {sum(s > 0.5 for s in shares)} of {len(shares)} |")
    return "\n".join(lines) + "\n"


def merge_layer_table(data, label="merged, step 0"):
    """Per layer, the share of each domain's tokens sent to expert 0, at step 0."""
    if data is None or label not in data["routing_share"]:
        return ""
    per_domain = data["routing_share"][label]
    domains = list(per_domain)
    layers = list(per_domain[domains[0]])
    lines = ["| layer | " + " | ".join(layers) + " |", "|---|" + "---|" * len(layers)]
    for domain in domains:
        lines.append(f"| {domain} | " + " | ".join(f"{per_domain[domain][layer][0]:.2f}" for layer in layers) + " |")
    return "\n".join(lines) + "\n"


def merge_fields(data):
    machine = data["machine"] if data else {}
    return {
        "merge_loss_table": merge_loss_table(data),
        "merge_routing_table": merge_routing_table(data),
        "merge_layer_table": merge_layer_table(data),
        "merge_command": data["command"] if data else "n/a",
        "merge_commit": machine.get("commit", "n/a"),
        "merge_wall": f"{data['wall_seconds']:.0f}" if data else "n/a",
        "merge_cpu": f"{data['cpu_seconds']:.0f}" if data else "n/a",
        "merge_machine": (f"{machine['cpu']}, {machine['cores']} cores, {machine['torch_threads']} torch "
                          f"thread{'s' if machine['torch_threads'] > 1 else ''}, "
                          f"torch {machine['torch']}, load average at start {' '.join(machine['loadavg_at_start'])}"
                          if data else "n/a"),
    }


def commands(all_runs):
    seen = []
    for folder, labels in FOLDERS.items():
        runs = all_runs[folder]
        for arm in labels:
            for r in sorted(runs.get(arm, []), key=lambda r: r["seed"]):
                seen.append(f"# {folder}: {arm} seed {r['seed']} (commit {r['commit'][:12]})\n{r['command']}")
    merge = merge_data()
    if merge is not None:
        seen.append(f"# merge_finetunes (commit {merge['machine']['commit']})\n{merge['command']}")
    return "\n".join(seen)


def tradeoff_plot(runs, long_runs):
    """Accuracy against executed compute fraction (eval mode) for the dense and gated arms run:
    120 steps (seed 0) on the left, 600 steps (mean and spread over seeds) on the right."""
    if not any(a in runs for a in GATED):
        return "_Not run: no gated arm finished._"
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 5.2))
    colors = dict(zip(["dense", *GATED], plt.get_cmap("tab20").colors))
    panels = [(axes[0], runs, "120 steps, 2,000 questions, 512 test, seed 0", True),
              (axes[1], long_runs, "600 steps, all 10,003 questions, 3,080 test, mean of seeds", False)]
    for ax, data, title, seed0 in panels:
        for arm in [a for a in ["dense", *GATED] if a in data]:
            rs = [r for r in data[arm] if r["seed"] == 0 or not seed0]
            if not rs:
                continue
            xs = [r["results"].get("eval_compute_fraction", 1.0) for r in rs]
            ys = [r["results"]["eval_accuracy"] for r in rs]
            marker = "*" if arm == "dense" else ("o" if arm.startswith("mod") else "s")
            err = statistics.stdev(ys) if len(ys) > 1 else 0.0
            ax.errorbar([statistics.mean(xs)], [statistics.mean(ys)], yerr=[err], fmt=marker, capsize=3,
                        color=colors[arm], label=f"{arm} ({len(ys)} seed{'s' if len(ys) > 1 else ''})")
        ax.axvline(0.6, color="grey", lw=0.8, ls="--")
        dense = [r["results"]["eval_accuracy"] for r in data.get("dense", []) if r["seed"] == 0 or not seed0]
        if dense:
            ax.axhline(statistics.mean(dense) - 0.02, color="grey", lw=0.8, ls=":")
        ax.set_xlabel("executed compute fraction, whole model (eval)")
        ax.set_ylabel("Banking77 accuracy")
        ax.set_title(f"{title}\n(target: left of dashed, above dotted)", fontsize=9)
        ax.legend(fontsize=6.5, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2)
    fig.tight_layout()
    fig.savefig(HERE / "compute_tradeoff.png", dpi=90)
    return "![accuracy vs executed compute](benchmarks/quality/compute_tradeoff.png)"


def main():
    all_runs = {folder: load_runs(folder) for folder in FOLDERS}
    runs = all_runs["classification"]
    before, before_data = before_table()
    ec_ok = None
    if "moe_copy_ec" in runs:
        ratios = [s["max_over_mean"] for r in runs["moe_copy_ec"]
                  for s in r["results"]["routing"]["moe_layers"].values()]
        ec_ok = (min(ratios), max(ratios))
    text = (HERE / "RESULTS.template.md").read_text()
    fields = {
        "before_table": before,
        "before_commit": before_data["commit"][:12] if before_data else "n/a",
        "before_wall": f"{before_data['wall_seconds']:.0f}" if before_data else "n/a",
        "classification_table": classification_table(runs),
        "gap": gap_text(runs),
        "balance_table": balance_table(runs),
        "ec_range": "not run" if ec_ok is None else f"{ec_ok[0]:.4f} to {ec_ok[1]:.4f}",
        "commands": commands(all_runs),
        "tradeoff": tradeoff_plot(runs, all_runs["classification_long"]),
        "long_table": classification_table(all_runs["classification_long"], list(LABELS)),
        "long_gap": gap_text(all_runs["classification_long"]),
        "long_ec_gap": gap_text(all_runs["classification_long"], "moe_copy_ec"),
        "long_target": target_table(all_runs["classification_long"], GATED),
        "short_target": target_table(runs, GATED),
        "tradeoff_table": tradeoff_table(runs),
        "sst2_table": (classification_table(all_runs["classification_sst2"]) if all_runs["classification_sst2"]
                       else "_Not run._\n"),
        "sst2_gap": gap_text(all_runs["classification_sst2"]),
        "translation_table": translation_table(all_runs["translation"]),
        "translation_samples": translation_samples(all_runs["translation"]),
        "dialogue_table": dialogue_table(all_runs["dialogue"]),
        **merge_fields(merge_data()),
    }
    for key, value in fields.items():
        text = text.replace("{{" + key + "}}", value)
    (ROOT / "RESULTS.md").write_text(text)
    print(f"wrote {ROOT / 'RESULTS.md'}")


if __name__ == "__main__":
    main()
