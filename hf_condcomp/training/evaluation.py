"""Evaluation helpers shared by the recipes: held-out loss and perplexity, batched generation
(LoRA merged while decoding), routing statistics."""

import math

import torch

from .models import unwrap


def evaluate_loss(accelerator, model, dataloader):
    """Token-weighted mean loss over the labelled tokens of every batch (eval mode: task loss
    only), its perplexity, and the mean executed-compute fraction."""
    model.eval()
    total = torch.zeros(2, device=accelerator.device, dtype=torch.float64)  # sum of NLL, tokens
    fractions = []
    for batch in dataloader:
        with torch.no_grad():
            outputs = model(**batch)
        tokens = (batch["labels"][:, 1:] != -100).sum()
        total += torch.stack([outputs.loss.double() * tokens, tokens.double()])
        fractions.append(float(getattr(outputs, "compute_fraction", 1.0)))  # 1.0: an MoE model skips no layer
    total = accelerator.reduce(total, reduction="sum")
    loss = (total[0] / total[1].clamp(min=1)).item()
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)),
            "compute_fraction": sum(fractions) / max(1, len(fractions))}


def generate(accelerator, model, tokenizer, prompts, max_new_tokens, batch_size, num_beams=1, stop_strings=None):
    """Greedy (or beam) continuations of token-id prompts, left-padded; each process generates
    its share and the texts are gathered in order. Returns the decoded new text per prompt.
    `stop_strings` (e.g. ["\\n"]) end a continuation early, as the end-of-sequence token does."""
    net = unwrap(accelerator, model)
    net.eval()
    # Unmerged LoRA on the 3-D expert weights rebuilds every expert's delta at each decoding step
    # (more FLOPs than the step itself): fold the adapters in while generating, then take them out.
    merge = hasattr(net, "merge_adapter") and not any(getattr(m, "merged", False) for m in net.modules())
    if merge:
        net.merge_adapter()
    try:
        texts = _generate_texts(accelerator, net, tokenizer, prompts, max_new_tokens, batch_size, num_beams,
                                stop_strings)
    finally:
        if merge:
            net.unmerge_adapter()
    from accelerate.utils import gather_object

    return gather_object(texts) if accelerator.num_processes > 1 else texts


def _generate_texts(accelerator, net, tokenizer, prompts, max_new_tokens, batch_size, num_beams, stop_strings):
    pad = tokenizer.pad_token_id
    texts = []
    with accelerator.split_between_processes(list(range(len(prompts)))) as mine:
        for start in range(0, len(mine), batch_size):
            chunk = [prompts[i] for i in mine[start:start + batch_size]]
            length = max(len(p) for p in chunk)
            ids = torch.tensor([[pad] * (length - len(p)) + list(p) for p in chunk], device=accelerator.device)
            mask = torch.tensor([[0] * (length - len(p)) + [1] * len(p) for p in chunk], device=accelerator.device)
            with torch.no_grad():
                out = net.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                                   num_beams=num_beams, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id,
                                   **({"stop_strings": stop_strings, "tokenizer": tokenizer} if stop_strings else {}))
            texts += tokenizer.batch_decode(out[:, length:], skip_special_tokens=True)
    return texts


def routing_stats(accelerator, model, dataloader, max_batches):
    """Per-layer routing statistics on a few eval batches (hf_condcomp.insight.routing_summary)."""
    from ..insight import routing_summary

    net = unwrap(accelerator, model)
    keep = ("input_ids", "attention_mask")
    batches = []
    for i, batch in enumerate(dataloader):
        if i >= max_batches:
            break
        batches.append({k: v for k, v in batch.items() if k in keep})
    was_training = net.training
    net.eval()
    with torch.no_grad():
        summary = routing_summary(net, batches)
    net.train(was_training)
    return summary
