"""Conditional-computation models: the source architecture's own transformers model, with
Mixture-of-Experts blocks in place of the FFNs of the chosen layers, and routed blocks and gates
on the chosen layers (depth.py).

`CondCompForCausalLM(config)` builds `AutoModelForCausalLM.from_config(config.text_config)`
with the installed transformers (Qwen3, Gemma 2, Phi-3, OPT, GPT-NeoX, RoBERTa, DeBERTa-v2,
ModernBERT, ...), then swaps each MoE layer's FFN module for `NativeMoEFeedForward` where
`config.ffn_layout` (architectures.py) says the FFN is. Everything upcycling does not change
(embeddings, attention with its `attn_implementation` dispatch, eager / sdpa / flash / flex,
norms, rotary embeddings, sliding windows, caches including the static cache, heads, gradient
checkpointing, `output_attentions` / `output_hidden_states`, generation) is transformers' own
code; this file owns the MoE block and the router losses. The model holds the source model's
modules as its own, so every weight keeps the dense model's name
(`model.layers.0.self_attn.q_proj.weight`, `lm_head.weight`), and an MoE block's are transformers'
MoE names (`model.layers.1.mlp.gate.weight`, `model.layers.1.mlp.experts.gate_up_proj`).

This file travels to the Hub with every saved model: only sibling relative imports.
"""


import torch
import torch.nn as nn
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    GenerationConfig,
    GenerationMixin,
    PreTrainedModel,
)
from transformers.utils import ModelOutput

from .architectures import find_layers, layout_from_dict, seq2seq_stacks
from .blockers import token_choice_blockers
from .common import CondCompInitMixin, compute_fraction, condcomp_losses, use_return_dict
from .compat import CACHE_KEY, cache_argument, class_weight_renamings, is_custom_code
from .configuration_condcomp import CondCompConfig
from .depth import Recorder, install_conditional_layers
from .moe import MoEFeedForward
from .parallel import check_parallel, drop_stale_plan_entries, parallel_plans
from .variants import layer_variant


class NativeMoEFeedForward(MoEFeedForward):
    """An MoE block with the call signature of the FFN module it replaces: hidden states in,
    hidden states out.

    Padding: where no token's experts depend on the other tokens (dropless token choice), every row
    is routed, padding included, as the dense FFN computes every row: a causal LM's loss reads the
    logits of the last left-padding position (it predicts the first real token), so this keeps the
    loss of a copy-upcycled model equal to its parent's. The routing record and the router losses
    leave the padding out. Capacity limits and expert choice rank tokens against each other, so
    there the padding is neither routed nor computed (its output is zero), and a row's routing does
    not depend on its padding."""

    def __init__(self, config, layout):
        super().__init__(config, config.hidden_size, gated=layout.gated, bias=layout.bias,
                         hidden_act=config.ffn_activation, causal=layout.causal)
        p = float(getattr(config.text_config, layout.dropout, 0.0) or 0.0) if layout.dropout else 0.0
        self.dropout = nn.Dropout(p)

    def forward(self, hidden_states, *args, **kwargs):
        recorder = self.__dict__.get("_condcomp_recorder")
        # Inside a routed or gated layer running a subset, the rows that only pad the sub-batch
        # are neither routed nor computed (depth.py sets `row_mask` for the call).
        rows = getattr(recorder, "row_mask", None)
        padding = getattr(recorder, "token_mask", None)
        if rows is None and padding is not None and padding.shape == hidden_states.shape[:2]:
            rows = None if self.routes_each_token_alone() else padding
        else:
            padding = None
        rows = rows if rows is not None and rows.shape == hidden_states.shape[:2] else None
        out, logits = super().forward(hidden_states, rows)
        if padding is not None and self.record_routing:
            self._drop_padding_from_record(padding)
        if recorder is not None:
            if recorder.token_mask is not None and logits.shape[0] != recorder.token_mask.numel():
                recorder.prefiltered.add(len(recorder.router_logits))  # unpadded rows (ModernBERT, flash)
            recorder.router_logits.append(logits)
        return self.dropout(out)

    def _drop_padding_from_record(self, padding):
        """The routing record of real tokens only, where the padding was routed too."""
        record = self.last_routing
        real = padding.reshape(-1)[record["token_rows"]]
        experts = record["experts"][real]
        self.last_routing = {**record, "token_rows": record["token_rows"][real], "experts": experts,
                             "counts": torch.bincount(experts, minlength=self.num_experts),
                             "num_tokens": int(padding.sum())}


def install_moe_blocks(layers, moe_layers, config, layout) -> list:
    """Swap the FFN of every layer of `layers` listed in `moe_layers` for an MoE block; returns the blocks.

    An MoE layer runs its FFN over the whole batch at once, whatever `chunk_size_feed_forward` says
    (BERT-type layers): capacity limits and expert choice rank all the tokens together, and the
    router losses read one logits tensor per layer. Dropless token choice gives the same outputs
    either way, so the setting only saves memory in the dense layers, where it still applies."""
    blocks = []
    for i in moe_layers:
        layer = layers[i]
        block = NativeMoEFeedForward(config, layout)
        _set_submodule(layer, layout.module, block)
        for name in layout.identity:
            _set_submodule(layer, name, nn.Identity())
        if layout.inner_dropout:
            setattr(layer, layout.inner_dropout, 0.0)
        if getattr(layer, "chunk_size_feed_forward", 0):
            layer.chunk_size_feed_forward = 0
        blocks.append(block)
    return blocks


def model_stacks(source: nn.Module, config) -> list:
    """[(stack module, its layers, the MoE layers' indices, FFN layout)]: the source's base model for a
    decoder or an encoder; an encoder-decoder's encoder (`moe_layers`) and decoder
    (`decoder_moe_layers`), each with its own forward hooks, padding and layout (causal in the decoder)."""
    layout = layout_from_dict(config.ffn_layout)
    if config.decoder_ffn_layout is None:
        _, layers = find_layers(source, config.num_hidden_layers)
        return [(source.base_model, layers, config.moe_layers, layout)]
    (_, encoder, _, enc_layers), (_, decoder, _, dec_layers) = seq2seq_stacks(source)
    return [(source.get_submodule(encoder), enc_layers, config.moe_layers, layout),
            (source.get_submodule(decoder), dec_layers, config.decoder_moe_layers or [],
             layout_from_dict(config.decoder_ffn_layout))]


def _set_submodule(root, dotted, module):
    parent, _, name = dotted.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


class CondCompPreTrainedModel(CondCompInitMixin, PreTrainedModel):
    """The source's own transformers model of the task (`_auto_class_of_task`), whose modules,
    parameters and buffers this model holds as its own: the weights keep the dense model's names
    (`model.layers.0.self_attn.q_proj.weight`, `lm_head.weight`), `base_model` is the source's headless
    model (`base_model_prefix` is the source's), and the head sits where the source's task class keeps
    it. The source's model object itself is not a submodule (`_condcomp_source`): its `forward`,
    `generate` and hooks run on these shared modules."""

    config_class = CondCompConfig
    base_model_prefix = ""  # per model: the source's (`model`, `bert`, `transformer`, ...)
    main_input_name = "input_ids"
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _auto_class_of_task = AutoModel

    def __init__(self, config):
        super().__init__(config)
        check_parallel(config)
        if config.text_config is None:
            raise ValueError("`config.text_config` is None: a CondCompConfig needs the source model's config "
                             "(hf_condcomp.upcycle writes it).")
        serving = config._attn_implementation == VLLM_ATTENTION
        if serving:  # vLLM's Transformers backend builds this model (its attention is set on the config)
            check_vllm_servable(config)
        # An `experts_implementation` given to `from_pretrained` is set on `text_config` too; it names
        # the MoE blocks' implementation (installed below), and the source's model has no experts
        # of transformers' kind, whose check would refuse it.
        config.text_config._experts_implementation_internal = None
        source = self._auto_class_of_task.from_config(config.text_config)
        self.__dict__["_condcomp_source"] = source
        if self.can_generate():  # from the config's dict, which nests the source's: its special tokens
            self.generation_config = GenerationConfig.from_model_config(config.to_dict())
        self._moe_blocks, self._conditional_layers, self._condcomp_stacks = [], [], []
        for stack, layers, moe_layers, layout in model_stacks(source, config):
            blocks = install_moe_blocks(layers, moe_layers, config, layout)
            conditional = install_conditional_layers(layers, config, layout.causal)
            # Every forward reaches the stack (a task head calls it, `generate()` too, an encoder-decoder's
            # `generate()` its encoder apart): its hooks give the blocks and layers the padding of each call.
            pooled = None if config.decoder_ffn_layout is not None else _pooled_token_kind(source, layout.causal)
            stack._condcomp_parts = (config, pooled, blocks, conditional)
            stack.register_forward_pre_hook(begin_forward, with_kwargs=True)
            stack.register_forward_hook(end_forward)
            self._moe_blocks += blocks
            self._conditional_layers += conditional
            self._condcomp_stacks.append(stack)
        drop_stale_plan_entries(source)
        self._adopt_source()
        self.post_init()

    def _adopt_source(self):
        """Hold the source model's children, parameters and buffers as this model's own: the same
        dictionaries, so that whatever sets a module or tensor on one (PEFT's wrapper around a
        classifier, `set_output_embeddings`, loading, `.to()`) sets it on both. Take the class-level
        facts transformers reads off a model from it too: the base model's prefix, the tied weights,
        the modules never split across devices."""
        source = self._condcomp_source
        for name in ("_modules", "_parameters", "_buffers", "_non_persistent_buffers_set"):
            self.__dict__[name] = source.__dict__[name]
        self.base_model_prefix = source.base_model_prefix
        tied = getattr(source, "_tied_weights_keys", None)
        if tied:
            self._tied_weights_keys = dict(tied) if isinstance(tied, dict) else list(tied)
        self._no_split_modules = list(getattr(source, "_no_split_modules", None) or [])

    def init_parallel_plans(self):
        """The source's parallel plans, the expert-parallel plan of the MoE blocks and an FSDP unit per
        layer of every stack (parallel.py), read by `from_pretrained(..., distributed_config=...)`."""
        super().init_parallel_plans()
        source = self.__dict__.get("_condcomp_source")
        if source is not None:
            for attr, plan in parallel_plans(self, source).items():
                setattr(self, attr, plan)

    def train(self, mode: bool = True):
        super().train(mode)
        self._condcomp_source.training = mode  # the source model's own flag (not a submodule)
        return self

    @torch.no_grad()
    def initialize_weights(self):
        """transformers initialises every module under a model inside this one (the source's base
        model) by that model's `_init_weights`, which knows the source's modules but not the MoE
        blocks' experts: they would keep whatever memory they were given. The blocks are drawn here first,
        by this class's `_init_weights` (experts and routers at `initializer_range`, biases zero), and
        marked done; then transformers initialises the rest. It runs on every path: construction,
        `from_config`, and `from_pretrained`'s missing keys (loaded tensors are marked and kept)."""
        custom = is_custom_code(self)
        for block in self._moe_blocks:
            for module in block.modules():
                self._initialize_weights(module, custom)
        for layer in self._conditional_layers:
            for name in layer_variant(layer).modules:
                if name in layer._modules:
                    self._initialize_weights(layer._modules[name], custom)
        super().initialize_weights()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """Also loads folders saved by releases that held the source's model under `backbone.` and
        named the MoE router `router` (`LEGACY_KEY_MAPPING`). A checkpoint of another task's class
        loads as transformers loads any model's: the base model's prefix added or stripped."""
        config = kwargs.get("config")
        if not isinstance(config, CondCompConfig):
            hub = {k: kwargs[k] for k in _HUB_KWARGS if k in kwargs}
            config = CondCompConfig.from_pretrained(pretrained_model_name_or_path, **hub)
        source = cls._auto_class_of_task._model_mapping.get(type(config.text_config), None)
        renamings = class_weight_renamings(source.__name__) if source is not None else {}
        kwargs["key_mapping"] = {**LEGACY_KEY_MAPPING, **renamings, **(kwargs.get("key_mapping") or {})}
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Writes the weights as the source's own class writes them: transformers renames some classes'
        weights on loading and back on saving (GPT-NeoX's `lm_head` is saved as `embed_out`), by the
        class of the model, which for the source's head is this one."""
        renamings = class_weight_renamings(type(self._condcomp_source).__name__)
        if not renamings:
            return super().save_pretrained(save_directory, *args, **kwargs)
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming

        own = self.__dict__.get("_weight_conversions")
        conversions = own if own is not None else get_model_conversion_mapping(self, add_legacy=False)
        self._weight_conversions = [*conversions, *(WeightRenaming(source, target)
                                                    for source, target in renamings.items())]
        try:
            return super().save_pretrained(save_directory, *args, **kwargs)
        finally:
            if own is None:
                del self._weight_conversions
            else:
                self._weight_conversions = own

    def get_input_embeddings(self):
        return self._condcomp_source.get_input_embeddings()

    def set_input_embeddings(self, value):
        self._condcomp_source.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self._condcomp_source.get_output_embeddings()

    def set_output_embeddings(self, value):
        self._condcomp_source.set_output_embeddings(value)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, labels=None,
                output_router_logits=None, return_dict=None, past_key_values=None, cache=None, **kwargs):
        """The source model's forward (every argument it takes), plus `output_router_logits`
        (default: the config's). The output is the source model's, with `loss` = task loss + the
        gated layers' losses + (where `output_router_logits`, as Mixtral does) the weighted router
        losses, and the fields `routing_loss`, `aux_loss`, `z_loss`, `compute_loss` (the gated layers'
        weighted losses) and `router_logits` (where `output_router_logits`) after its own;
        `compute_fraction` (the executed share of token-layer compute, 1.0 = dense) and
        `layer_compute_fractions` ({layer: share} of the routed and gated layers) are attributes.
        `position_ids` and `inputs_embeds` are handed on as the source's model takes them (where given).
        A KV cache is taken as `cache=` or `past_key_values=` and handed to the source's model under the
        name the installed transformers uses (compat.py)."""
        past = cache_argument(past_key_values, cache)
        kwargs = self._source_kwargs(kwargs, position_ids, inputs_embeds, labels, past)
        if output_router_logits is None:
            output_router_logits = self.config.output_router_logits
        for stack in self._condcomp_stacks:
            stack.__dict__.pop("_condcomp_last", None)
        out = self._condcomp_source(input_ids=input_ids, attention_mask=attention_mask, return_dict=True, **kwargs)
        recorder = merge_recorders([stack.__dict__.pop("_condcomp_last", None) for stack in self._condcomp_stacks])
        self._add_condcomp_outputs(out, recorder, bool(output_router_logits), labels is not None)
        return out if use_return_dict(self.config, return_dict) else out.to_tuple()

    def _source_kwargs(self, kwargs, position_ids, inputs_embeds, labels, past):
        """The keyword arguments of the source model's forward: the cache under the name the installed
        transformers uses, the named inputs where given, and the output flags set on this config."""
        if past is not None:
            kwargs[CACHE_KEY] = past
        # named in the signature, as callers that read it pass them (transformers' tests pass GPT-2's
        # positions for left padding; vLLM compiles by these arguments' names)
        for name, value in (("position_ids", position_ids), ("inputs_embeds", inputs_embeds), ("labels", labels)):
            if value is not None:
                kwargs[name] = value
        for name in ("output_hidden_states", "output_attentions"):  # set on this config, read by the source's model
            if kwargs.get(name) is None and getattr(self.config, name, False):
                kwargs[name] = True
        return kwargs

    def _add_condcomp_outputs(self, out, recorder, router: bool, has_labels: bool):
        """The routing losses added to the source's loss, and the routing fields after its own."""
        total, aux, z, extra = condcomp_losses(self.config, recorder, router, self.training or router or has_labels)
        if total is not None and getattr(out, "loss", None) is not None:
            out["loss"] = out.loss + total
        fields = {"routing_loss": total, "aux_loss": aux, "z_loss": z, "compute_loss": extra,
                  "router_logits": tuple(getattr(recorder, "outputs", recorder.router_logits))
                  if router else None}
        for name, value in fields.items():
            if value is not None:
                out[name] = value
            else:  # an attribute but not a key, so `to_tuple()` keeps the source's order
                setattr(out, name, None)
        # Executed share of token-layer compute (routed and gated layers; 1.0 = dense): fields after the
        # router fields where the model has such layers (a wrapper that rebuilds the output, as FSDP
        # does, keeps fields only), attributes of an MoE model's output (always 1.0 and {}).
        fraction, per_layer = compute_fraction(self.config, recorder)
        if self._conditional_layers:
            out["compute_fraction"], out["layer_compute_fractions"] = fraction, per_layer
        else:
            out.compute_fraction, out.layer_compute_fractions = fraction, per_layer


VLLM_ATTENTION = "vllm"  # the attention implementation vLLM's Transformers backend sets on the config


_VLLM_REASONS = {
    "gated": "{description} run a subset of each sequence's tokens, and vLLM's attention and KV cache run every "
             "token through every layer.",
    "routing": "vLLM's fused MoE serves token-choice routing (each token's top `num_experts_per_tok` experts) only.",
    "capacity": "capacity-limited routing drops tokens that vLLM's fused MoE would compute; only dropless routing "
                "(None) serves.",
}


def vllm_refusal(config) -> str | None:
    """Why vLLM's Transformers backend cannot serve a model of `config` (one line), or None.

    vLLM swaps each MoE block's `experts` for its fused MoE, which computes SiLU-gated experts on the
    `num_experts_per_tok` experts each token's router picks; its attention and KV cache run every
    token through every layer (blockers.py: what the native exports refuse as well)."""
    blockers = token_choice_blockers(config)
    if blockers:
        return f"{blockers[0]}: " + _VLLM_REASONS[blockers[0].kind].format(description=blockers[0].description)
    layout = layout_from_dict(config.ffn_layout)
    if config.moe_layers and not (layout.gated and config.ffn_activation in ("silu", "swish")):
        kind = f"{'gated' if layout.gated else 'plain'} {config.ffn_activation!r}"
        return (f"`ffn_activation`={config.ffn_activation!r}: vLLM's fused MoE assumes SiLU-gated experts, and "
                f"these experts are {kind} ones.")
    return None


def check_vllm_servable(config) -> None:
    """A ValueError naming the field and why, where vLLM cannot serve a model of `config`."""
    reason = vllm_refusal(config)
    if reason is not None:
        raise ValueError(f"vLLM cannot serve this model: {reason}")


def merge_recorders(recorders: list) -> Recorder:
    """One `Recorder` for the losses and outputs of a forward from the stacks that ran in it (an
    encoder-decoder's two, or its decoder alone when the encoder's outputs were given): each stack's
    router logits restricted to its own real tokens, as its padding has its own shape."""
    ran = [rec for rec in recorders if rec is not None]
    if len(ran) <= 1:
        return ran[0] if ran else Recorder()
    merged = Recorder()
    merged.outputs = []  # every row's logits, as `output_router_logits` returns them
    for rec in ran:
        flat = None if rec.token_mask is None else rec.token_mask.reshape(-1)
        for i, logits in enumerate(rec.router_logits):
            keep = flat is not None and i not in rec.prefiltered
            merged.prefiltered.add(len(merged.router_logits))
            merged.router_logits.append(logits[flat] if keep else logits)
            merged.outputs.append(logits)
        merged.extra_losses += rec.extra_losses
    return merged


def begin_forward(base, args, kwargs):
    """Forward pre-hook of the source's base model: the per-forward `Recorder` of the MoE blocks and
    conditional layers, with the padding of this call. An `output_router_logits` argument (TRL's
    trainers pass it to `model.base_model`, as to Mixtral's) is taken here, not passed to the source's
    model, which does not know it."""
    config, pooled, blocks, layers = base._condcomp_parts
    flag = kwargs.pop("output_router_logits", None)
    attention_mask = kwargs.get("attention_mask")
    inputs = kwargs.get("input_ids")
    if inputs is None:
        inputs = args[0] if args else kwargs.get("inputs_embeds")
    key_mask = token_mask = pinned = None
    if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2 and inputs is not None:
        key_mask = attention_mask.to(torch.bool)  # a prepared 4-D or per-layer-type mask: every token real
        token_mask = key_mask[:, -inputs.shape[1]:]
        if not torch.compiler.is_compiling() and bool(key_mask.all()):  # a shortcut; a graph keeps the mask
            key_mask = token_mask = None
    if layers:
        if kwargs.get("output_attentions") or getattr(config, "output_attentions", False):
            raise ValueError(
                "`output_attentions=True` is not supported by models with Mixture-of-Depths or gated layers: a routed "
                "layer attends over its own subset of tokens, whose weights have no full-sequence shape."
            )
        if config.keep_pooled_token and pooled is not None and inputs is not None:
            pinned = _pooled_token(pooled, token_mask, inputs.shape[:2], inputs.device)
    recorder = Recorder(token_mask, key_mask, pinned)
    recorder.output_router_logits = bool(config.output_router_logits if flag is None else flag)
    for module in (*blocks, *layers):
        module._condcomp_recorder = recorder
    base._condcomp_last = recorder
    return args, kwargs


def end_forward(base, args, output):
    """Forward hook: the base model's output carries `router_logits` (one (B*T, E) tensor per MoE layer)
    where `output_router_logits` is set, as a Mixtral or Qwen3-MoE base model's does. In evaluation the
    layers drop the recorder (in training they keep it until the next forward, as gradient
    checkpointing recomputes them in the backward pass)."""
    recorder = base.__dict__.get("_condcomp_last")
    if recorder is not None and recorder.output_router_logits and recorder.router_logits \
            and isinstance(output, ModelOutput):
        output["router_logits"] = tuple(recorder.router_logits)
    if not base.training:
        _, _, blocks, layers = base._condcomp_parts
        for module in (*blocks, *layers):
            module._condcomp_recorder = None


def _pooled_token_kind(source, causal):
    """Which token the source's head pools: "first" for an encoder (its pooler or classification head
    reads [CLS]; a base model pins it too, so that it routes as the classifier's base model does),
    "last" for a decoder's sequence classifier (the last real token), or None where the head reads
    every token (masked and causal LM, token classification)."""
    name = type(source).__name__
    if name.endswith(("ForMaskedLM", "ForTokenClassification", "ForCausalLM", "LMHeadModel")):
        return None
    if not causal:
        return "first"
    return "last" if name.endswith("ForSequenceClassification") else None


def _pooled_token(kind, token_mask, shape, device):
    """(B, T) bool: the token `kind` names, which routed and gated layers always compute."""
    B, T = shape
    pinned = torch.zeros(B, T, dtype=torch.bool, device=device)
    if kind == "first":
        pinned[:, 0] = True
    else:
        real = torch.ones(B, T, dtype=torch.bool, device=device) if token_mask is None else token_mask
        last = (real.long() * torch.arange(1, T + 1, device=device)).argmax(-1)  # (B,)
        pinned[torch.arange(B, device=device), last] = True
    return pinned


_HUB_KWARGS = ("cache_dir", "force_download", "proxies", "token", "local_files_only", "revision", "subfolder")
# Folders saved by earlier releases: the source's model under `backbone.` (its base model under
# `backbone.` in `CondCompModel`), each MoE block's router named `router`.
LEGACY_KEY_MAPPING = {r"^backbone\.": "", r"\.router\.weight$": ".gate.weight"}


class CondCompModel(CondCompPreTrainedModel):
    _auto_class_of_task = AutoModel


class CondCompForSequenceClassification(CondCompPreTrainedModel):
    _auto_class_of_task = AutoModelForSequenceClassification


class CondCompForTokenClassification(CondCompPreTrainedModel):
    _auto_class_of_task = AutoModelForTokenClassification


class CondCompForMaskedLM(CondCompPreTrainedModel):
    _auto_class_of_task = AutoModelForMaskedLM


class _SourceGeneration:
    """Generation by the source model's own `generate()` (its modules hold the MoE
    blocks) with this model's generation config: positions, masks, caches (an encoder-decoder's
    too) and every hook a model class gives its `generate()` (OPT's positions from the padding mask,
    Phi-3's, ...) stay the source's. Router losses play no part in decoding."""

    def generate(self, *args, **kwargs):
        self._condcomp_source.generation_config = self.generation_config
        return self._condcomp_source.generate(*args, **kwargs)

    def prepare_inputs_for_generation(self, *args, **kwargs):
        return self._condcomp_source.prepare_inputs_for_generation(*args, **kwargs)


class CondCompForCausalLM(_SourceGeneration, CondCompPreTrainedModel, GenerationMixin):
    _auto_class_of_task = AutoModelForCausalLM


class CondCompForConditionalGeneration(_SourceGeneration, CondCompPreTrainedModel, GenerationMixin):
    """An encoder-decoder source (T5, BART, Marian, M2M100, ...) with MoE blocks in its encoder's and
    decoder's chosen layers (`moe_layers`, `decoder_moe_layers`)."""

    _auto_class_of_task = AutoModelForSeq2SeqLM

    def get_encoder(self, *args, **kwargs):
        return self._condcomp_source.get_encoder(*args, **kwargs)

    def get_decoder(self):
        return self._condcomp_source.get_decoder()


# The one table of tasks: the `task` users pass to `upcycle` -> the model class, whose `_auto_class_of_task` is
# the transformers Auto class that loads the source and the saved model alike.
TASK_CLASSES = {
    "base": CondCompModel,
    "sequence-classification": CondCompForSequenceClassification,
    "token-classification": CondCompForTokenClassification,
    "masked-lm": CondCompForMaskedLM,
    "causal-lm": CondCompForCausalLM,
    "seq2seq-lm": CondCompForConditionalGeneration,
}
CondCompConfig.register_for_auto_class()
for _cls in TASK_CLASSES.values():
    _cls.register_for_auto_class(_cls._auto_class_of_task.__name__)
# a saved model loads as any of them (from_pretrained maps the keys); a task the source
# architecture has no class for is refused by transformers' own auto class
CondCompPreTrainedModel._auto_heads = {c._auto_class_of_task.__name__: c.__name__ for c in TASK_CLASSES.values()}
