"""Routing insight: where tokens go in MoE layers and where compute is spent in gated layers.

Everything here returns plain data (dicts, lists, floats, ints) so that it can go straight into
`all_results.json`, a model card or `json.dump`.

Modules are found by duck typing, not `isinstance`: a model loaded with `trust_remote_code`
from a folder brings its own copy of `MoEFeedForward` from a dynamic module, so the class is
not ours. An MoE module is any module with a `record_routing` flag whose `last_routing` record
carries `experts` (see `hf_condcomp/modeling/moe.py`).
"""

import math
from collections import Counter

import torch

__all__ = ["routing_summary", "inspect", "compare", "load_stats", "save_plots"]


def load_stats(counts: list[int]) -> dict:
    """Balance statistics of one layer's expert load (assignments per expert).

    load_entropy: H(p) / log(E) with p = counts / sum(counts) and natural-log entropy H, so 1.0 is a
        perfectly balanced load and 0.0 all assignments on one expert (1.0 when E == 1).
    load_entropy_raw: H(p) in nats (at most log E).
    max_over_mean: max(counts) / mean(counts); 1.0 is balanced, E is everything on one expert.
    dead_experts: experts that received no assignment.
    With no assignment at all the entropies and max_over_mean are 0.0 and every expert is dead.
    """
    num_experts = len(counts)
    total = sum(counts)
    dead = [e for e, c in enumerate(counts) if c == 0]
    if total == 0:
        return {"load_entropy": 0.0, "load_entropy_raw": 0.0, "max_over_mean": 0.0, "dead_experts": dead}
    raw = -sum((c / total) * math.log(c / total) for c in counts if c > 0)
    norm = raw / math.log(num_experts) if num_experts > 1 else 1.0
    return {
        "load_entropy": norm,
        "load_entropy_raw": raw,
        "max_over_mean": max(counts) / (total / num_experts),
        "dead_experts": dead,
    }


def _layer_of(model, name: str, position: int) -> int:
    """Layer index of the module called `name`: its nearest ancestor's `layer_idx`, else `position`."""
    modules = dict(model.named_modules())
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        idx = getattr(modules.get(".".join(parts[:end])), "layer_idx", None)
        if isinstance(idx, int):
            return idx
    moe_layers = list(getattr(model.config, "moe_layers", None) or [])
    return moe_layers[position] if position < len(moe_layers) else position


def find_recorders(model) -> list[tuple[int, str, torch.nn.Module]]:
    """(layer index, kind, module) of every module with a `record_routing` flag: kind "moe" for MoE
    FFNs (a `last_routing` record per forward), "gated" for Mixture-of-Depths routers and compute
    gates (a `routing_log` list that gets one (B, T) bool executed-mask per forward)."""
    found = [(name, m) for name, m in model.named_modules() if hasattr(m, "record_routing")]
    out = []
    for i, (name, m) in enumerate(found):
        kind = "gated" if hasattr(m, "routing_log") else "moe" if hasattr(m, "num_experts") else None
        if kind is not None:
            out.append((_layer_of(model, name, i), kind, m))
    return out


def _gated_layers_configured(model) -> list[int]:
    config = model.config
    return sorted(set(getattr(config, "mod_layers", None) or []) | set(getattr(config, "gate_layers", None) or []))


def _model_inputs(batch: dict, device) -> dict:
    if "input_ids" not in batch or "attention_mask" not in batch:
        raise ValueError(
            f"every batch needs `input_ids` and `attention_mask`, got keys {sorted(batch)}: "
            "pass what a tokenizer returns with `padding=True, return_tensors='pt'`."
        )
    keys = ("input_ids", "attention_mask", "token_type_ids")
    return {k: batch[k].to(device) for k in keys if k in batch}


def _subset_rows(executed: torch.Tensor, real: torch.Tensor):
    """When a routed/gated layer ran on a subset of tokens, its MoE FFN saw the gathered (B, C)
    sub-batch (kept tokens first, in order: see `modeling/gating.py`). Returns (full row of each
    sub row (B*C,), validity (B*C,)), or None when the layer ran on the whole batch."""
    if bool((executed | ~real).all()):
        return None
    B, T = executed.shape
    counts = executed.sum(-1)  # (B,)
    C = int(counts.max())
    index = torch.argsort((~executed).to(torch.int8), dim=-1, stable=True)[:, :C]  # (B, C)
    full = (torch.arange(B).unsqueeze(-1) * T + index).reshape(-1)  # (B*C,)
    valid = (torch.arange(C) < counts.unsqueeze(-1)).reshape(-1)  # (B*C,)
    return full, valid


def run_recorded(model, batches, on_forward):
    """Run `model` over `batches` with every recorder switched on.

    After each forward calls `on_forward(inputs, outputs, moe, executed, top1)`:
        moe: {layer: MoE record} as in `MoEFeedForward.last_routing`, `token_rows` in flat (B*T) rows;
        executed: {gated layer: (B*T,) bool, true where the token ran the layer (real tokens only)};
        top1: {MoE layer: (B*T,) router's first-choice expert, -1 where the router did not see the
            token (padding is included, so mask it with the attention mask)}.
    Returns {layer: module} of the MoE layers. Restores train/eval mode and recording state after.
    """
    recorders = find_recorders(model)
    if not recorders and not _gated_layers_configured(model):
        raise ValueError(
            f"`model` ({type(model).__name__}) has no MoE or gated layers to inspect: "
            "pass a model made by `hf_condcomp.upcycle` (or loaded from its saved folder)."
        )
    moe = {layer: m for layer, kind, m in recorders if kind == "moe"}
    gated = {layer: m for layer, kind, m in recorders if kind == "gated"}
    device = next(model.parameters()).device
    was_training = model.training
    saved = [(m, m.record_routing, getattr(m, "routing_log", None)) for _, _, m in recorders]
    logits: dict[int, torch.Tensor] = {}
    hooks = [
        m.register_forward_hook(lambda mod, args, out, layer=layer: logits.__setitem__(layer, out[1].detach()))
        for layer, m in moe.items()
    ]
    model.eval()
    try:
        for m, _, log in saved:
            m.record_routing = True
            if log is not None:
                m.routing_log = []  # ours during the run; the user's log is put back after
        with torch.no_grad():
            for batch in batches:
                inputs = _model_inputs(batch, device)
                for m in moe.values():
                    m.last_routing = None
                for m in gated.values():
                    m.routing_log.clear()
                logits.clear()
                outputs = model(**inputs)
                real = inputs["attention_mask"].cpu().bool()  # (B, T)
                executed = {l: m.routing_log[-1].cpu().bool() & real for l, m in gated.items() if m.routing_log}
                records, top1 = {}, {}
                for layer, m in moe.items():
                    if m.last_routing is None:
                        continue  # the layer's block ran on no token
                    rec = dict(m.last_routing)
                    choice = logits[layer].argmax(-1).cpu()  # (rows the FFN saw,)
                    sub = _subset_rows(executed[layer], real) if layer in executed else None
                    if sub is None:
                        top1[layer] = choice
                    else:
                        full, valid = sub
                        rec["token_rows"] = full[rec["token_rows"].cpu().long()]
                        top1[layer] = torch.full((real.numel(),), -1, dtype=torch.long)
                        top1[layer][full[valid]] = choice[valid]
                    records[layer] = rec
                on_forward(inputs, outputs, records, {l: e.reshape(-1) for l, e in executed.items()}, top1)
    finally:
        for h in hooks:
            h.remove()
        for m, flag, log in saved:
            m.record_routing = flag
            if log is not None:
                m.routing_log = log
        model.train(was_training)
    return moe


class _Totals:
    """Sums over forwards: MoE counts per layer and token-weighted gated compute fractions."""

    def __init__(self):
        self.counts: dict[int, torch.Tensor] = {}
        self.dropped: Counter = Counter()
        self.unrouted: Counter = Counter()
        self.tokens: Counter = Counter()
        self.real_tokens = 0
        self.fraction_sum = 0.0
        self.layer_fraction_sum: Counter = Counter()

    def add(self, inputs, outputs, records):
        n = int(inputs["attention_mask"].sum())
        self.real_tokens += n
        for layer, rec in records.items():
            counts = rec["counts"].detach().cpu().long()
            self.counts[layer] = counts if layer not in self.counts else self.counts[layer] + counts
            self.dropped[layer] += int(rec["dropped"])
            # Tokens that no expert processed (expert choice leaves some; so do capacity drops).
            self.unrouted[layer] += int(rec["num_tokens"]) - int(rec["token_rows"].unique().numel())
            self.tokens[layer] += int(rec["num_tokens"])
        fraction = getattr(outputs, "compute_fraction", None)
        self.fraction_sum += n * (1.0 if fraction is None else float(fraction))
        for layer, f in (getattr(outputs, "layer_compute_fractions", None) or {}).items():
            self.layer_fraction_sum[int(layer)] += n * float(f)

    def summary(self, moe_layers, gated_layers) -> dict:
        if self.real_tokens == 0:
            raise ValueError("`batches` held no tokens: pass at least one non-empty batch.")
        moe = {}
        for layer in sorted(moe_layers):
            counts = self.counts.get(layer)
            counts = [] if counts is None else counts.tolist()
            moe[str(layer)] = {
                "tokens_per_expert": counts,
                **load_stats(counts),
                "dropped": self.dropped[layer],
                "unrouted_tokens": self.unrouted[layer],
                "num_tokens": self.tokens[layer],
            }
        gated_layers = sorted(set(gated_layers) | set(self.layer_fraction_sum))
        gated = {str(l): {"compute_fraction": self.layer_fraction_sum[l] / self.real_tokens} for l in gated_layers}
        return {"moe_layers": moe, "gated_layers": gated, "compute_fraction": self.fraction_sum / self.real_tokens}


def routing_summary(model, batches) -> dict:
    """Routing statistics of `model` over `batches` (dicts with `input_ids` and `attention_mask`).

    Returns JSON-serialisable plain data::

        {"moe_layers": {"<layer>": {"tokens_per_expert": [int] * E,  # assignments (top-k: k per token)
                                    "load_entropy": float,      # H(load) / log(E), 1.0 = balanced
                                    "load_entropy_raw": float,  # H(load) in nats
                                    "max_over_mean": float,
                                    "dropped": int,             # assignments dropped by capacity
                                    "unrouted_tokens": int,     # tokens no expert processed
                                    "dead_experts": [int],
                                    "num_tokens": int}},        # real (non-padding) tokens routed
         "gated_layers": {"<layer>": {"compute_fraction": float}},
         "compute_fraction": float}  # executed share of token-layer compute, 1.0 = dense

    Fractions are averaged over forwards weighted by each forward's real-token count. Padding is
    never counted. The model runs in eval mode under `torch.no_grad`; its mode is restored after.
    """
    totals = _Totals()
    moe = run_recorded(model, batches,
                       lambda inputs, outputs, records, executed, top1: totals.add(inputs, outputs, records))
    return totals.summary(moe, _gated_layers_configured(model))


# ---------------------------------------------------------------------------------------------
# Token-level views: `inspect` and `compare` on texts.
# ---------------------------------------------------------------------------------------------


def _expert_sets(rec: dict, num_rows: int, num_experts: int) -> torch.Tensor:
    """(B*T, E) bool: which experts served each row in this forward (padding rows: none)."""
    sets = torch.zeros(num_rows, num_experts, dtype=torch.bool)
    sets[rec["token_rows"].detach().cpu().long(), rec["experts"].detach().cpu().long()] = True
    return sets


def _prepare_tokenizer(tokenizer):
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError("`tokenizer` has neither a pad nor an eos token: "
                             "set `tokenizer.pad_token` before inspecting.")
        tokenizer.pad_token = tokenizer.eos_token  # decoders (GPT-2, Llama) ship without one
    return tokenizer


def _check_texts(texts, name="texts") -> list[str]:
    if isinstance(texts, str):
        raise ValueError(f"`{name}` is a single string ({texts[:40]!r}...): pass a list of texts.")
    texts = [t for t in texts if isinstance(t, str) and t.strip()]
    if not texts:
        raise ValueError(f"`{name}` holds no non-empty text: pass at least one.")
    return texts


def text_batches(texts, tokenizer, batch_size: int = 16, max_length: int | None = None, model=None):
    """Tokenised padded batches, texts sorted by length so that CPU batches carry little padding."""
    if batch_size < 1:
        raise ValueError(f"`batch_size` must be >= 1, got {batch_size}.")
    tokenizer = _prepare_tokenizer(tokenizer)
    if max_length is None:
        limits = [getattr(tokenizer, "model_max_length", None)]
        if model is not None:
            limits += [getattr(model.config, "max_position_embeddings", None),
                       getattr(model.config, "n_positions", None)]
        max_length = min(x for x in limits + [4096] if isinstance(x, int) and x > 0)
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    for start in range(0, len(order), batch_size):
        chunk = [texts[i] for i in order[start : start + batch_size]]
        yield tokenizer(chunk, padding=True, truncation=True, max_length=max_length, return_tensors="pt")


def _progress(iterable, total: int, show: bool | None, desc: str):
    from tqdm.auto import tqdm

    if show is None:
        show = total > 4  # long inputs only: a bar for a handful of batches is noise
    return tqdm(iterable, total=total, disable=not show, desc=desc, unit="batch")


def _token_names(tokenizer, ids):
    if tokenizer is None:
        return [str(i) for i in ids]
    return [str(t) for t in tokenizer.convert_ids_to_tokens(list(ids))]


class _TokenStats:
    """Per (layer, expert) token-id counts and per (gated layer) token-id seen/skipped counts."""

    def __init__(self):
        self.expert_tokens: dict[int, dict[int, Counter]] = {}
        self.seen: dict[int, Counter] = {}
        self.skipped: dict[int, Counter] = {}

    def add(self, inputs, records, executed):
        ids = inputs["input_ids"].reshape(-1).cpu()
        real = inputs["attention_mask"].reshape(-1).cpu().bool()
        for layer, rec in records.items():
            per_expert = self.expert_tokens.setdefault(layer, {})
            base = int(ids.max()) + 1
            keys = rec["experts"].cpu().long() * base + ids[rec["token_rows"].cpu().long()]  # (S,)
            uniq, counts = torch.unique(keys, return_counts=True)
            for key, c in zip(uniq.tolist(), counts.tolist()):
                expert, token = divmod(key, base)
                per_expert.setdefault(expert, Counter())[token] += c
        for layer, ran in executed.items():
            self.seen.setdefault(layer, Counter()).update(ids[real].tolist())
            self.skipped.setdefault(layer, Counter()).update(ids[real & ~ran].tolist())

    def top_tokens(self, layer, num_experts, tokenizer, n):
        per_expert = self.expert_tokens.get(layer, {})
        out = []
        for e in range(num_experts):
            common = per_expert.get(e, Counter()).most_common(n)
            out.append([[name, c] for name, (_, c) in zip(_token_names(tokenizer, [t for t, _ in common]), common)])
        return out

    def most_skipped(self, layer, tokenizer, n, min_count=2):
        """Tokens seen at least `min_count` times, by skip rate then frequency: [[token, rate, seen]]."""
        seen, skipped = self.seen.get(layer), self.skipped.get(layer, Counter())
        if seen is None:
            return None
        rows = sorted(
            ((skipped[t] / c, c, t) for t, c in seen.items() if c >= min_count), key=lambda r: (-r[0], -r[1], r[2])
        )[:n]
        names = _token_names(tokenizer, [t for _, _, t in rows])
        return [[name, rate, c] for name, (rate, c, _) in zip(names, rows)]


def _sample_map(model, sample, tokenizer):
    """Per-token view of one sentence: tokens, and per layer the executed flag (gated layers, 1/0)
    and top-1 expert (MoE layers)."""
    enc = tokenizer([sample], return_tensors="pt", truncation=True, max_length=128)
    view = {"tokens": _token_names(tokenizer, enc["input_ids"][0].tolist()), "executed": {}, "top1_expert": {}}

    def keep(inputs, outputs, records, executed, top1):
        view["top1_expert"].update({str(layer): choice.tolist() for layer, choice in sorted(top1.items())})
        view["executed"].update({str(layer): ran.int().tolist() for layer, ran in sorted(executed.items())})

    run_recorded(model, [enc], keep)
    return view


def inspect(
    model,
    texts=None,
    tokenizer=None,
    batch_size: int = 16,
    max_length: int | None = None,
    batches=None,
    top_tokens: int = 10,
    sample_text: str | None = None,
    progress: bool | None = None,
) -> dict:
    """Where `model` routes the tokens of `texts` (tokenised by `tokenizer`) or of ready `batches`.

    Returns `routing_summary`'s dict (see there) plus:
        moe_layers[l]["top_tokens"]: per expert, the `top_tokens` most frequent tokens it served,
            as [[token, count], ...] (token ids as strings when no tokenizer is given).
        gated_layers[l]["most_skipped_tokens"]: [[token, skip rate, occurrences], ...] for tokens
            seen at least twice, most skipped first; only for gated layers that record per-token
            decisions (else None: only the layer's `compute_fraction` is known).
        sample: per-token view of `sample_text` (default: the first text): `tokens`, per MoE layer
            the router's `top1_expert` per token, per recording gated layer `executed` (1/0).
        num_texts: how many texts were read (None with `batches`).
    A progress bar shows on long inputs (more than 4 batches) unless `progress` says otherwise.
    """
    if (texts is None) == (batches is None):
        raise ValueError("pass exactly one of `texts` (with `tokenizer`) and `batches`.")
    num_texts = None
    if texts is not None:
        if tokenizer is None:
            raise ValueError("`texts` need a `tokenizer`: "
                             "pass the one saved with the model (AutoTokenizer.from_pretrained(folder)).")
        texts = _check_texts(texts)
        num_texts = len(texts)
        total = math.ceil(len(texts) / batch_size) if batch_size >= 1 else 0
        batches = text_batches(texts, tokenizer, batch_size, max_length, model)
        if sample_text is None:
            sample_text = texts[0]
    else:
        total = len(batches) if hasattr(batches, "__len__") else None
    totals, tokens = _Totals(), _TokenStats()

    def collect(inputs, outputs, records, executed, top1):
        totals.add(inputs, outputs, records)
        tokens.add(inputs, records, executed)

    moe = run_recorded(model, _progress(batches, total, progress, "inspect"), collect)
    result = totals.summary(moe, _gated_layers_configured(model))
    for layer, stats in result["moe_layers"].items():
        stats["top_tokens"] = tokens.top_tokens(int(layer), len(stats["tokens_per_expert"]), tokenizer, top_tokens)
    for layer, stats in result["gated_layers"].items():
        stats["most_skipped_tokens"] = tokens.most_skipped(int(layer), tokenizer, top_tokens)
    result["sample"] = _sample_map(model, sample_text, tokenizer) if sample_text and tokenizer is not None else None
    result["num_texts"] = num_texts
    return result


def _routing_per_token(model, batches) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """{MoE layer: (top-1 expert (N,), expert sets (N, E) bool)} over the real tokens of `batches`.

    Top-1 is the router's first choice (argmax of its logits; -1 for a token that a routed or gated
    block let skip the layer); the set is the experts that actually served the token (after
    capacity drops, or chosen by experts under expert-choice routing)."""
    top1: dict[int, list] = {}
    sets: dict[int, list] = {}
    moe_modules = {layer: m for layer, kind, m in find_recorders(model) if kind == "moe"}

    def keep(inputs, outputs, records, executed, choice):
        real = inputs["attention_mask"].reshape(-1).cpu().bool()
        for layer, module in moe_modules.items():
            rec = records.get(layer)  # None: the layer's block ran on no token of this batch
            top1.setdefault(layer, []).append(choice[layer][real] if rec else torch.full((int(real.sum()),), -1))
            num_rows, num_experts = real.numel(), module.num_experts
            served = (_expert_sets(rec, num_rows, num_experts) if rec
                      else torch.zeros(num_rows, num_experts, dtype=torch.bool))
            sets.setdefault(layer, []).append(served[real])

    moe = run_recorded(model, batches, keep)
    if not moe:
        raise ValueError(f"`model` ({type(model).__name__}) has no MoE layers: `compare` compares expert routing.")
    return {layer: (torch.cat(top1[layer]), torch.cat(sets[layer])) for layer in top1}


def compare(model_a, model_b, texts, tokenizer, batch_size: int = 16, max_length: int | None = None,
            progress=None) -> dict:
    """How routing differs between two models with the same MoE layout on the same `texts`.

    Per MoE layer present in both (over real tokens):
        top1_kept: share of tokens whose router's first choice (argmax of the router logits) is
            the same expert in both models.
        topk_overlap: mean over tokens of |A & B| / max(|A|, |B|), where A and B are the sets of
            experts that served the token in each model (a token served by no expert in both
            counts 1.0). With top-k routing and no drops this is |A & B| / k.
        num_tokens: tokens compared.
    Plus the means over layers (`top1_kept`, `topk_overlap`) and the layers found in only one model.
    A model compared with itself gives 1.0 everywhere.
    """
    texts = _check_texts(texts)
    total = math.ceil(len(texts) / batch_size) if batch_size >= 1 else 0
    per_model = []
    for name, model in (("model_a", model_a), ("model_b", model_b)):
        batches = text_batches(texts, tokenizer, batch_size, max_length, model)
        per_model.append(_routing_per_token(model, _progress(batches, total, progress, f"compare {name}")))
    a, b = per_model
    layers = sorted(set(a) & set(b))
    if not layers:
        raise ValueError(f"the models share no MoE layer (model_a: {sorted(a)}, model_b: {sorted(b)}): "
                         "compare upcycles of the same layout.")
    out = {"moe_layers": {}}
    for layer in layers:
        (top1_a, sets_a), (top1_b, sets_b) = a[layer], b[layer]
        if sets_a.shape != sets_b.shape:
            raise ValueError(
                f"MoE layer {layer} differs in shape (tokens, experts): model_a {tuple(sets_a.shape)}, "
                f"model_b {tuple(sets_b.shape)}: compare models with the same experts and tokenizer."
            )
        inter = (sets_a & sets_b).sum(-1).float()
        union_size = torch.maximum(sets_a.sum(-1), sets_b.sum(-1)).float()
        overlap = torch.where(union_size > 0, inter / union_size.clamp(min=1), torch.ones_like(inter))
        out["moe_layers"][str(layer)] = {
            "top1_kept": (top1_a == top1_b).float().mean().item(),
            "topk_overlap": overlap.mean().item(),
            "num_tokens": int(top1_a.numel()),
        }
    stats = out["moe_layers"].values()
    out["top1_kept"] = sum(s["top1_kept"] for s in stats) / len(layers)
    out["topk_overlap"] = sum(s["topk_overlap"] for s in stats) / len(layers)
    out["only_in_model_a"] = sorted(set(a) - set(b))
    out["only_in_model_b"] = sorted(set(b) - set(a))
    return out


# ---------------------------------------------------------------------------------------------
# Figures (matplotlib, Agg backend: no display needed).
# ---------------------------------------------------------------------------------------------

_DPI = 100
_CELLS = (0.16, 0.22, 0.66, 0.62)  # axes box (left, bottom, width, height) as figure fractions


def _grid_figure(matrix, rows, cols, path, title, cmap, vmin, vmax, annotations=None, width_per_col=0.7, colorbar=True,
                 xlabel=None):
    """Draw `matrix` (rows x cols) as cells in an axes box at a fixed place in the figure and save a
    PNG of exactly (width, height) pixels. Returns where the cells are, so the picture can be read
    back: `cells_px` = [x0, y0, x1, y1] of the cell area in pixels, origin top-left, row 0 on top."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    width_in = max(5.0, 1.5 + width_per_col * len(cols))
    height_in = max(2.5, 1.4 + 0.45 * len(rows))
    fig = plt.figure(figsize=(width_in, height_in), dpi=_DPI)
    left, bottom, w, h = _CELLS
    ax = fig.add_axes([left, bottom, w, h])
    im = ax.imshow(matrix, cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto", interpolation="nearest")
    ax.set_yticks(range(len(rows)), rows)
    ax.set_xticks(range(len(cols)), cols, rotation=60 if width_per_col > 0.5 else 0, fontsize=8,
                  ha="right" if width_per_col > 0.5 else "center")
    ax.set_title(title, fontsize=9)
    if xlabel:
        ax.set_xlabel(xlabel, fontsize=8)
    if annotations is not None:
        for (i, j), (text, color) in annotations.items():
            ax.text(j, i, text, ha="center", va="center", fontsize=7, color=color)
    if colorbar:
        fig.colorbar(im, cax=fig.add_axes([left + w + 0.03, bottom, 0.025, h]))
    path = str(path)
    fig.savefig(path, dpi=_DPI)
    plt.close(fig)
    width, height = round(width_in * _DPI), round(height_in * _DPI)
    cells = [left * width, (1 - bottom - h) * height, (left + w) * width, (1 - bottom) * height]
    return {"path": path, "width": width, "height": height, "cells_px": cells, "cmap": cmap, "vmin": vmin, "vmax": vmax}


def plot_expert_load(result: dict, path) -> dict:
    """Heatmap layers x experts of each MoE layer's share of assignments (tokens_per_expert / sum),
    cells annotated with the counts. Returns the figure info plus `matrix` (the plotted shares)."""
    layers = list(result["moe_layers"])
    if not layers:
        raise ValueError("`result` has no MoE layers: there is no expert load to plot.")
    loads = [result["moe_layers"][l]["tokens_per_expert"] for l in layers]
    num_experts = max(len(c) for c in loads)
    matrix = [[c / max(sum(counts), 1) for c in counts] + [0.0] * (num_experts - len(counts)) for counts in loads]
    notes = None
    if num_experts <= 16:
        # dark text on the light (high) end of viridis, white on the dark end
        notes = {
            (i, j): (str(c), "k" if matrix[i][j] > 0.6 * max(max(row) for row in matrix) else "w")
            for i, counts in enumerate(loads)
            for j, c in enumerate(counts)
        }
    vmax = max(max(row) for row in matrix) or 1.0
    info = _grid_figure(
        matrix,
        [f"layer {l}" for l in layers],
        [str(e) for e in range(num_experts)],
        path,
        "share of each layer's assignments per expert (cells: counts)",
        "viridis",
        0.0,
        vmax,
        notes,
        width_per_col=0.5,
        xlabel="expert",
    )
    return {**info, "matrix": matrix, "rows": layers}


def plot_token_map(sample: dict, path) -> dict | None:
    """Per-token map of the sample sentence: gated layers' executed (1) / skipped (0) decisions if
    any layer recorded them (a compute map), else the MoE layers' top-1 expert per token. None when
    the sample holds neither."""
    if sample is None:
        return None
    if sample["executed"]:
        layers, values = list(sample["executed"]), list(sample["executed"].values())
        kind, cmap, vmin, vmax, title = "compute", "Greys", 0, 1, "compute per token (black: executed, white: skipped)"
    elif sample["top1_expert"]:
        layers, values = list(sample["top1_expert"]), list(sample["top1_expert"].values())
        # tab10 has the more distinct colours; tab20 for up to 20 experts (the numbers tell beyond)
        cmap, vmax = ("tab10", 9) if max(max(row) for row in values) < 10 else ("tab20", 19)
        kind, vmin, title = "experts", 0, "router's top-1 expert per token"
    else:
        return None
    notes = None if kind == "compute" else {(i, j): (str(v), "k")
                                            for i, row in enumerate(values) for j, v in enumerate(row)}
    info = _grid_figure(values, [f"layer {l}" for l in layers], sample["tokens"], path, title, cmap, vmin, vmax, notes,
                        colorbar=False)
    return {**info, "kind": kind, "matrix": values, "rows": layers}


def save_plots(result: dict, folder) -> dict:
    """Write `expert_load.png` (MoE models) and `token_map.png` (sample sentence) into `folder`."""
    from pathlib import Path

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    plots = {}
    if result["moe_layers"]:
        plots["expert_load"] = plot_expert_load(result, folder / "expert_load.png")
    token_map = plot_token_map(result.get("sample"), folder / "token_map.png")
    if token_map is not None:
        plots["token_map"] = token_map
    return plots


# ---------------------------------------------------------------------------------------------
# Command line: `hf-condcomp inspect` and `hf-condcomp compare` (wired in by `cli.build_parser`).
# ---------------------------------------------------------------------------------------------


def load_model_folder(folder, what="MODEL"):
    """(model in eval mode, tokenizer) from a folder written by `hf-condcomp upcycle` or
    `save_pretrained`; the head named in `config.architectures` is loaded when the Auto classes
    know it, so that a classifier loads as a classifier."""
    from pathlib import Path

    import transformers

    if not Path(folder).is_dir():
        raise ValueError(f"{what} {str(folder)!r} is not a folder: "
                         "pass the folder written by `hf-condcomp upcycle` or `save_pretrained`.")
    from . import assets

    # A config.json or weights file that does not read, or no tokenizer: one line naming the file.
    config = assets.load_config(folder, what, trust_remote_code=True)
    tokenizer = assets.load_tokenizer(folder, what, "save one there with `tokenizer.save_pretrained`")
    arch = (getattr(config, "architectures", None) or [None])[0]
    auto = transformers.AutoModel
    for auto_name, ref in (getattr(config, "auto_map", None) or {}).items():
        if arch and str(ref).endswith("." + arch) and auto_name.startswith("AutoModel"):
            auto = getattr(transformers, auto_name)
    model = assets.load_pretrained(auto, folder, what, trust_remote_code=True).eval()
    return model, tokenizer


def _read_column(path, column):
    import csv
    import json

    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        with open(path, newline="", encoding="utf-8") as f:
            quoting = csv.QUOTE_NONE if suffix == ".tsv" else csv.QUOTE_MINIMAL  # GLUE TSVs are unquoted
            rows = list(csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ",", quoting=quoting))
    elif suffix in (".jsonl", ".json"):
        text = path.read_text(encoding="utf-8")
        rows = (json.loads(text) if suffix == ".json"
                else [json.loads(line) for line in text.splitlines() if line.strip()])
        if isinstance(rows, dict):
            rows = [dict(zip(rows, values)) for values in zip(*rows.values())]
    elif suffix == ".parquet":
        import pandas as pd

        rows = pd.read_parquet(path).to_dict("records")
    else:
        raise ValueError(f"--data-file {str(path)!r} has suffix {suffix!r}: "
                         "use .csv, .tsv, .json, .jsonl or .parquet (or --text-file for plain text).")
    if rows and column not in rows[0]:
        raise ValueError(f"--column {column!r} is not in --data-file {str(path)!r}: its columns are {sorted(rows[0])}.")
    return [row[column] for row in rows]


def read_texts(args) -> list[str]:
    """Texts from --text-file (one per line), --data-file + --column, or --dataset (Hub) + --column,
    cut to --max-texts. Raises ValueError naming the file or dataset when nothing usable is there."""
    from pathlib import Path

    if args.text_file is not None:
        source, path = f"--text-file {args.text_file!r}", Path(args.text_file)
        if not path.is_file():
            raise ValueError(f"{source} does not exist (or is not a file): pass a text file with one text per line.")
        texts = path.read_text(encoding="utf-8").splitlines()
    elif args.data_file is not None:
        source, path = f"--data-file {args.data_file!r}", Path(args.data_file)
        if not path.is_file():
            raise ValueError(f"{source} does not exist (or is not a file): "
                             "pass a .csv, .tsv, .json, .jsonl or .parquet file.")
        texts = _read_column(path, args.column)
    else:
        source = f"--dataset {args.dataset!r} (split {args.split!r})"
        try:
            import datasets

            data = datasets.load_dataset(args.dataset, split=args.split)
        except Exception as err:  # offline, unknown name or split: datasets raises many kinds
            raise ValueError(
                f"{source} could not be loaded from the Hub ({type(err).__name__}: {str(err)[:200]}). "
                "Offline? Save the data locally and pass --data-file FILE --column COLUMN."
            ) from err
        if args.column not in data.column_names:
            raise ValueError(f"--column {args.column!r} is not in {source}: its columns are {data.column_names}.")
        texts = data[args.column]
    texts = [t for t in texts if isinstance(t, str) and t.strip()]
    if args.max_texts is not None:
        texts = texts[: args.max_texts]
    if not texts:
        raise ValueError(f"{source} holds no non-empty text: pass a file with at least one line of text.")
    return texts


def format_inspect(result: dict) -> str:
    """Terminal table of an `inspect` result."""
    lines = []
    for layer, s in result["moe_layers"].items():
        total = sum(s["tokens_per_expert"]) or 1
        dead = ", ".join(map(str, s["dead_experts"])) or "none"
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


def _write_json(result, path):
    import json
    from pathlib import Path

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


def cmd_inspect(args):
    texts = read_texts(args)
    model, tokenizer = load_model_folder(args.model)
    result = inspect(model, texts, tokenizer, batch_size=args.batch_size, max_length=args.max_length,
                     top_tokens=args.top_tokens, sample_text=args.sample_text)
    if args.plots:
        result["plots"] = save_plots(result, args.plots)
    print(format_inspect(result))
    for name, info in (result.get("plots") or {}).items():
        print(f"plot {name}: {info['path']} ({info['width']}x{info['height']} px)")
    if args.json:
        _write_json(result, args.json)
        print(f"json: {args.json}")
    return 0


def cmd_compare(args):
    texts = read_texts(args)
    model_a, tokenizer = load_model_folder(args.model_a, "MODEL_A")
    model_b, tokenizer_b = load_model_folder(args.model_b, "MODEL_B")
    if tokenizer.get_vocab() != tokenizer_b.get_vocab():
        raise ValueError(f"MODEL_A {args.model_a!r} and MODEL_B {args.model_b!r} have different tokenizers: "
                         "compare models of one family.")
    result = compare(model_a, model_b, texts, tokenizer, batch_size=args.batch_size, max_length=args.max_length)
    print(format_compare(result))
    if args.json:
        _write_json(result, args.json)
        print(f"json: {args.json}")
    return 0


def _add_text_arguments(p):
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--text-file", help="plain text, one text per line")
    src.add_argument("--data-file", help=".csv, .tsv, .json, .jsonl or .parquet file; the texts are in --column")
    src.add_argument("--dataset", help="Hub dataset name (needs internet); the texts are in --column of --split")
    p.add_argument("--column", default="text", help="column holding the texts (--data-file, --dataset); default: text")
    p.add_argument("--split", default="train", help="--dataset split; default: train")
    p.add_argument("--max-texts", type=int, default=None, help="use only the first N texts")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=None,
                   help="truncate texts to N tokens (default: the model's limit)")
    p.add_argument("--json", default=None, metavar="OUT", help="also write the result as JSON to OUT")


def add_inspect_parsers(sub):
    """Register `inspect` and `compare` on the `hf-condcomp` subparsers."""
    p = sub.add_parser("inspect", help="show where a model routes tokens and spends compute")
    p.add_argument("model",
                   help="folder of an upcycled model (loaded with trust_remote_code, tokenizer from the folder)")
    _add_text_arguments(p)
    p.add_argument("--plots", default=None, metavar="DIR", help="write expert_load.png and token_map.png into DIR")
    p.add_argument("--top-tokens", type=int, default=5, help="most frequent tokens listed per expert")
    p.add_argument("--sample-text", default=None, help="sentence of the per-token map (default: the first text)")
    p.set_defaults(func=cmd_inspect)
    p = sub.add_parser("compare", help="how routing differs between two models (e.g. before and after fine-tuning)")
    p.add_argument("model_a", help="folder of the first model")
    p.add_argument("model_b", help="folder of the second model (same MoE layout and tokenizer)")
    _add_text_arguments(p)
    p.set_defaults(func=cmd_compare)
