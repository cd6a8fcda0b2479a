"""Evaluation helpers shared by the recipes: held-out loss and perplexity, batched generation
(LoRA merged while decoding), routing statistics."""

import math

import torch

from .models import is_encoder_decoder, unwrap


def evaluate_loss(accelerator, model, dataloader):
    """Token-weighted mean loss over the labelled tokens of every batch (eval mode: task loss
    only), its perplexity, and the mean executed-compute fraction. A decoder predicts `labels[:, 1:]`,
    an encoder-decoder every label."""
    model.eval()
    first = 0 if is_encoder_decoder(unwrap(accelerator, model).config) else 1
    total = torch.zeros(2, device=accelerator.device, dtype=torch.float64)  # sum of NLL, tokens
    fractions = []
    for batch in dataloader:
        with torch.no_grad():
            outputs = model(**batch)
        tokens = (batch["labels"][:, first:] != -100).sum()
        total += torch.stack([outputs.loss.double() * tokens, tokens.double()])
        fractions.append(float(getattr(outputs, "compute_fraction", 1.0)))  # 1.0: an MoE model skips no layer
    total = accelerator.reduce(total, reduction="sum")
    loss = (total[0] / total[1].clamp(min=1)).item()
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)),
            "compute_fraction": sum(fractions) / max(1, len(fractions))}


def generate(accelerator, model, tokenizer, prompts, max_new_tokens, batch_size, num_beams=1, stop_strings=None,
             **generate_kwargs):
    """Greedy (or beam) continuations of token-id prompts, left-padded; each process generates
    its share and the texts are gathered in order. Returns the decoded new text per prompt.
    `stop_strings` (e.g. ["\\n"]) end a continuation early, as the end-of-sequence token does.
    An encoder-decoder model reads the prompts as (right-padded) encoder inputs and the text is its
    decoder's output. `generate_kwargs` go to `model.generate` (`forced_bos_token_id`, ...)."""
    net = unwrap(accelerator, model)
    net.eval()
    # Unmerged LoRA on the 3-D expert weights rebuilds every expert's delta at each decoding step
    # (more FLOPs than the step itself): fold the adapters in while generating, then take them out.
    merge = hasattr(net, "merge_adapter") and not any(getattr(m, "merged", False) for m in net.modules())
    if merge:
        net.merge_adapter()
    try:
        texts = _generate_texts(accelerator, net, tokenizer, prompts, max_new_tokens, batch_size, num_beams,
                                stop_strings, generate_kwargs)
    finally:
        if merge:
            net.unmerge_adapter()
    from accelerate.utils import gather_object

    return gather_object(texts)[:len(prompts)] if accelerator.num_processes > 1 else texts


def _sharded(accelerator, net) -> bool:
    """Whether the processes hold parts of the weights (DeepSpeed ZeRO-3, FSDP, transformers' engine): then every
    decoding step of one is a collective of all, and they must run the same number of steps."""
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    zero3 = plugin is not None and plugin.zero_stage == 3 or is_deepspeed_zero3_enabled()
    fsdp = accelerator.distributed_type.value == "FSDP" or getattr(net, "is_distributed_loading_by_transformers", False)
    return accelerator.num_processes > 1 and (zero3 or fsdp)


def _generate_texts(accelerator, net, tokenizer, prompts, max_new_tokens, batch_size, num_beams, stop_strings,
                    generate_kwargs):
    pad = tokenizer.pad_token_id
    seq2seq = is_encoder_decoder(net.config)
    texts = []
    # Sharded weights: every process takes as many prompts (the last one repeated) and decodes in step with the others.
    synced = _sharded(accelerator, net)
    with accelerator.split_between_processes(list(range(len(prompts))), apply_padding=synced) as mine:
        for start in range(0, len(mine), batch_size):
            chunk = [prompts[i] for i in mine[start:start + batch_size]]
            length = max(len(p) for p in chunk)
            # Decoders continue left-padded prompts; an encoder takes right padding (absolute positions).
            rows = [(list(p), [pad] * (length - len(p))) for p in chunk]
            ids = torch.tensor([p + fill if seq2seq else fill + p for p, fill in rows], device=accelerator.device)
            mask = torch.tensor([[1] * len(p) + [0] * len(fill) if seq2seq else [0] * len(fill) + [1] * len(p)
                                 for p, fill in rows], device=accelerator.device)
            with torch.no_grad():
                out = net.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                                   num_beams=num_beams, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id,
                                   synced_gpus=synced,
                                   **({"stop_strings": stop_strings, "tokenizer": tokenizer} if stop_strings else {}),
                                   **generate_kwargs)
            texts += tokenizer.batch_decode(out if seq2seq else out[:, length:], skip_special_tokens=True)
    return texts


def routing_stats(accelerator, model, dataloader, max_batches):
    """Per-layer routing statistics on a few eval batches (hf_condcomp.insight.routing_summary). An
    encoder-decoder's layers are keyed per stack (`encoder.1`, `decoder.0`), over the real tokens of
    the encoder inputs and of the decoder's labels."""
    from ..insight import routing_summary

    net = unwrap(accelerator, model)
    seq2seq = is_encoder_decoder(net.config)
    keep = ("input_ids", "attention_mask") + (("labels", "decoder_attention_mask") if seq2seq else ())
    batches = []
    for i, batch in enumerate(dataloader):
        if i >= max_batches:
            break
        batches.append({k: v for k, v in batch.items() if k in keep})
    was_training = net.training
    net.eval()
    with torch.no_grad():
        summary = _stack_routing_summary(net, batches) if seq2seq else routing_summary(net, batches)
    net.train(was_training)
    return summary


def _stack_routing_summary(net, batches):
    """`routing_summary`'s MoE statistics of an encoder-decoder model, one entry per MoE block of each
    stack, from the blocks' routing records (which leave each stack's padding out), summed as
    `routing_summary` sums them (`insight.collect.Totals`)."""
    from ..insight.collect import Totals

    blocks = {}
    for name, module in net.named_modules():
        if hasattr(module, "record_routing") and hasattr(module, "num_experts"):
            parts = name.split(".")
            stack = "decoder" if "decoder" in parts else "encoder"
            blocks[f"{stack}.{next(p for p in parts if p.isdigit())}"] = module
    flags = {key: m.record_routing for key, m in blocks.items()}
    device = next(net.parameters()).device
    totals = Totals()
    try:
        for m in blocks.values():
            m.record_routing = True
        for batch in batches:
            for m in blocks.values():
                m.last_routing = None
            inputs = {k: v.to(device) for k, v in batch.items()}
            outputs = net(**inputs)
            totals.add(inputs, outputs, {key: m.last_routing for key, m in blocks.items()
                                              if m.last_routing is not None})
    finally:
        for key, m in blocks.items():
            m.record_routing = flags[key]
    summary = totals.summary(blocks, [])
    summary["moe_layers"] = {key: summary["moe_layers"][key] for key in blocks}  # the model's order, stack by stack
    return summary
