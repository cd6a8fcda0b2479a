"""Token-level views on texts: `inspect` (which tokens each expert serves, which tokens gated
layers skip, a per-token map of one sentence) and `compare` (how routing differs between two
models), both built on `collect.run_recorded`."""

import math
from collections import Counter

import torch

from .collect import Totals, find_recorders, gated_layers_configured, run_recorded


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
    totals, tokens = Totals(), _TokenStats()

    def collect(inputs, outputs, records, executed, top1):
        totals.add(inputs, outputs, records)
        tokens.add(inputs, records, executed)

    moe = run_recorded(model, _progress(batches, total, progress, "inspect"), collect)
    result = totals.summary(moe, gated_layers_configured(model))
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
