"""Routing statistics collected by switching on every routed module's recorder during forwards.

Modules are found by duck typing, not `isinstance`: a model loaded with `trust_remote_code`
from a folder brings its own copy of `MoEFeedForward` from a dynamic module, so the class is
not ours. An MoE module is any module with a `record_routing` flag whose `last_routing` record
carries `experts` (see `hf_condcomp/modeling/moe.py`). `routing_summary` sums the records into
plain data; `run_recorded` hands them, per forward, to other views (`tokens.py`).
"""

import math
from collections import Counter
from contextlib import contextmanager

import torch


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
    """Layer index of the module called `name`: its nearest ancestor's layer index (`layer_idx`, or
    the `_condcomp_index` of a routed or gated layer), else the first index in its name (the
    position in the layer list: `backbone.model.layers.3.mlp`), else `position`."""
    modules = dict(model.named_modules())
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        module = modules.get(".".join(parts[:end]))
        for attr in ("_condcomp_index", "layer_idx"):
            idx = getattr(module, attr, None)
            if isinstance(idx, int):
                return idx
    numbers = [int(p) for p in parts if p.isdigit()]
    if numbers:
        return numbers[0]
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


def gated_layers_configured(model) -> list[int]:
    from ..modeling.variants import conditional_layer_indices

    return conditional_layer_indices(model.config)


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
    sub-batch (kept tokens first, in order: see `modeling/depth.py`). Returns (full row of each
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


@contextmanager
def _recording(model, recorders, logits: dict):
    """Every recorder switched on, the model in eval mode and each MoE block's router (N, E)
    logits written to `logits[layer]`; the user's flags, logs and mode are put back after."""
    saved = [(m, m.record_routing, getattr(m, "routing_log", None)) for _, _, m in recorders]
    hooks = [
        m.gate.register_forward_hook(lambda mod, args, out, layer=layer: logits.__setitem__(layer, out.detach()))
        for layer, kind, m in recorders
        if kind == "moe"
    ]
    was_training = model.training
    model.eval()
    try:
        for m, _, log in saved:
            m.record_routing = True
            if log is not None:
                m.routing_log = []  # ours during the run; the user's log is put back after
        yield
    finally:
        for h in hooks:
            h.remove()
        for m, flag, log in saved:
            m.record_routing = flag
            if log is not None:
                m.routing_log = log
        model.train(was_training)


def _moe_records(moe: dict, logits: dict, executed: dict, real: torch.Tensor):
    """This forward's MoE records with `token_rows` in flat (B*T) rows, and each layer's router
    first choice per flat row (-1 where the router did not see the token)."""
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
    return records, top1


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
    if not recorders and not gated_layers_configured(model):
        raise ValueError(
            f"`model` ({type(model).__name__}) has no MoE or gated layers to inspect: "
            "pass a model made by `hf_condcomp.upcycle` (or loaded from its saved folder)."
        )
    moe = {layer: m for layer, kind, m in recorders if kind == "moe"}
    gated = {layer: m for layer, kind, m in recorders if kind == "gated"}
    device = next(model.parameters()).device
    logits: dict[int, torch.Tensor] = {}
    with _recording(model, recorders, logits), torch.no_grad():
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
            records, top1 = _moe_records(moe, logits, executed, real)
            on_forward(inputs, outputs, records, {l: e.reshape(-1) for l, e in executed.items()}, top1)
    return moe


class Totals:
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
    totals = Totals()
    moe = run_recorded(model, batches,
                       lambda inputs, outputs, records, executed, top1: totals.add(inputs, outputs, records))
    return totals.summary(moe, gated_layers_configured(model))
