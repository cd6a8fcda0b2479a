"""Terminal tables of `inspect` and `compare` results, as `hf-condcomp inspect` / `compare` print them."""


def format_inspect(result: dict) -> str:
    """Terminal table of an `inspect` result."""
    lines = []
    for layer, s in result["moe_layers"].items():
        total = sum(s["tokens_per_expert"]) or 1
        ids = s["dead_experts"]  # a count, then which: "dead experts: 0" never names expert 0
        dead = f"{len(ids)}" + (f" (expert{'s' if len(ids) > 1 else ''} {', '.join(map(str, ids))})" if ids else "")
        lines.append(
            f"MoE layer {layer}: {s['num_tokens']} tokens, load entropy {s['load_entropy']:.3f} "
            f"({s['load_entropy_raw']:.3f} nats), max/mean {s['max_over_mean']:.2f}, dropped {s['dropped']}, "
            f"dead experts: {dead}"
        )
        lines.append(f"  {'expert':>6}  {'tokens':>7}  {'share':>6}  most frequent tokens")
        for e, count in enumerate(s["tokens_per_expert"]):
            top = ", ".join(f"{t} ({c})" for t, c in (s.get("top_tokens") or [[]] * (e + 1))[e])
            lines.append(f"  {e:>6}  {count:>7}  {count / total:>6.1%}  {top}")
    for layer, s in result["gated_layers"].items():
        lines.append(f"gated layer {layer}: executed compute {s['compute_fraction']:.1%}")
        skipped = s.get("most_skipped_tokens")
        if skipped:
            lines.append("  most skipped: " + ", ".join(f"{t} ({rate:.0%} of {n})" for t, rate, n in skipped))
        elif skipped is None:
            lines.append("  (this layer records no per-token decisions: only its compute fraction is known)")
    lines.append(f"compute fraction (all layers, 1.0 = dense): {result['compute_fraction']:.3f}")
    return "\n".join(lines)


def format_compare(result: dict) -> str:
    lines = [f"{'MoE layer':>9}  {'top-1 kept':>10}  {'top-k overlap':>13}  {'tokens':>7}"]
    for layer, s in result["moe_layers"].items():
        lines.append(f"{layer:>9}  {s['top1_kept']:>10.1%}  {s['topk_overlap']:>13.1%}  {s['num_tokens']:>7}")
    lines.append(f"{'mean':>9}  {result['top1_kept']:>10.1%}  {result['topk_overlap']:>13.1%}")
    for side in ("a", "b"):
        if result[f"only_in_model_{side}"]:
            lines.append(f"MoE layers only in MODEL_{side.upper()}: {result[f'only_in_model_{side}']}")
    return "\n".join(lines)
