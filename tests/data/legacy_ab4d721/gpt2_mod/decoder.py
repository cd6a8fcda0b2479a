"""Forward logic shared by the decoder families (GPT-2, Llama): KV cache, positions, the
causal-LM head and its loss. `generate()` comes from `GenerationMixin`."""

import torch
import torch.nn.functional as F
from transformers.cache_utils import DynamicCache

from .common import attention_settings, base_output, head_output, make_context, output_hidden_states_of
from .compat import cache_argument, cache_capacity, cache_field
from .gating import run_layers


class CondCompDecoderMixin:
    """Base-model forward of a decoder; the family provides `embed`, `decoder_layers`,
    `final_norm` and optionally `position_embeddings(x, position_ids)` (RoPE)."""

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        inputs_embeds=None,
        use_cache=None,
        output_hidden_states=None,
        output_router_logits=None,
        return_dict=None,
        cache=None,
        token_type_ids=None,
        output_attentions=None,
        **kwargs,
    ):
        past_key_values = cache_argument(past_key_values, cache)
        output_hidden_states = output_hidden_states_of(self.config, output_hidden_states)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of `input_ids` and `inputs_embeds`.")
        output_router_logits = self.config.output_router_logits if output_router_logits is None else output_router_logits
        if use_cache is None:
            use_cache = self.config.use_cache and not self.training
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache()
        key_length = None
        if getattr(past_key_values, "is_compileable", False):  # a static cache: all its slots are keys
            if self.config.mod_layers or self.config.gate_layers:
                raise ValueError(
                    f"`{type(past_key_values).__name__}` (e.g. `cache_implementation='static'`) is not supported for "
                    "models with Mixture-of-Depths or gated layers: their layers cache only the tokens they ran "
                    "on, with a validity mask per layer, which a static cache has no room for. Use the default "
                    "dynamic cache (leave `cache_implementation` unset)."
                )
            if use_cache:
                key_length = cache_capacity(past_key_values)
        B, T = (input_ids if input_ids is not None else inputs_embeds).shape[:2]
        if key_length is not None and torch.compiler.is_compiling() and _full_length_mask(attention_mask, T):
            past = attention_mask.shape[-1] - T  # a static cache counts its filled slots by value; a graph can't
        else:
            past = int(past_key_values.get_seq_length()) if past_key_values is not None else 0
        device = (input_ids if input_ids is not None else inputs_embeds).device
        if position_ids is None:  # as transformers' decoders: 0..T-1 after the cache, padding or not
            position_ids = torch.arange(past, past + T, device=device).unsqueeze(0)  # (1, T)
        x = self.embed(input_ids, inputs_embeds, position_ids, token_type_ids)  # (B, T, H)
        ctx = make_context(attention_mask, T, past, causal=True, device=device, batch_size=B, key_length=key_length)
        ctx.cache = past_key_values if use_cache else None
        attention_settings(self, ctx, output_attentions)
        ctx.position_embeddings = self.position_embeddings(x, position_ids)
        x, all_hidden = run_layers(self.decoder_layers(), x, ctx, output_hidden_states)
        x = self.final_norm(x)
        if output_hidden_states:
            all_hidden = all_hidden[:-1] + (x,)
        return base_output(
            self.config,
            ctx,
            x,
            self.training or output_router_logits,
            output_router_logits,
            return_dict,
            hidden_states=all_hidden,
            **cache_field(past_key_values if use_cache else None),
        )

    def position_embeddings(self, x, position_ids):
        return None


class CondCompCausalLMMixin:
    """Causal-LM head over `self.base_model`, with the router and gate losses added. Heads list
    `GenerationMixin` explicitly after `PreTrainedModel` (transformers 5 requires it)."""

    def get_output_embeddings(self):
        return self.lm_head

    def create_masks_for_generate(self, *args, attention_mask=None, **kwargs):
        """`generate()` with a static cache would turn the 2-D padding mask into transformers' 4-D
        masks; these models build their own masks from the padding mask, so it is kept as it is."""
        return attention_mask

    def generate(self, *args, **kwargs):
        """`GenerationMixin.generate`, refusing beam search over a KV cache in models with routed
        blocks or gates: their cache carries a per-layer validity mask (gating.py) that beam search
        would not reorder with the beams. Without the cache every step recomputes the prefix, and
        decisions are per token and causal, so `use_cache=False` beam search is exact."""
        if self.config.mod_layers or self.config.gate_layers:
            generation_config = kwargs.get("generation_config") or self.generation_config
            num_beams = kwargs.get("num_beams", generation_config.num_beams) or 1
            use_cache = kwargs.get("use_cache", generation_config.use_cache)
            if num_beams > 1 and use_cache is not False:
                raise ValueError(
                    f"`num_beams`={num_beams}: beam search with the KV cache is not supported for models with "
                    "Mixture-of-Depths or gated layers (the cache's validity mask is not reordered with the "
                    "beams). Pass `use_cache=False` (exact, slower) or use greedy search or sampling."
                )
        return super().generate(*args, **kwargs)

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        logits_to_keep=0,
        output_hidden_states=None,
        output_router_logits=None,
        return_dict=None,
        cache=None,
        token_type_ids=None,
        output_attentions=None,
        **kwargs,
    ):
        base = self.base_model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=cache_argument(past_key_values, cache),
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            output_router_logits=output_router_logits,
            return_dict=True,
            token_type_ids=token_type_ids,
            output_attentions=output_attentions,
            **kwargs,
        )
        hidden = base.last_hidden_state
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)  # (B, T, V)
        loss = None
        if labels is not None:
            shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
            shift_labels = labels[:, 1:].reshape(-1).to(logits.device)
            loss = F.cross_entropy(shift_logits, shift_labels, ignore_index=-100)
        return head_output(self.config, base, loss, logits, return_dict)


def _full_length_mask(attention_mask, num_new) -> bool:
    """Whether `attention_mask` is a 2-D mask over the cached and the new tokens, as `generate()`
    passes it."""
    return isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2 and attention_mask.shape[-1] > num_new
