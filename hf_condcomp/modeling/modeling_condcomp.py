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
code; this file owns the MoE block and the router losses. The weights sit under `backbone.`
with the source's own names (`backbone.model.layers.0.self_attn.q_proj.weight`).

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

from .architectures import find_layers, layout_from_dict, seq2seq_stacks
from .common import CondCompInitMixin, compute_fraction, condcomp_losses, use_return_dict
from .compat import CACHE_KEY, cache_argument, is_custom_code
from .configuration_condcomp import CondCompConfig
from .depth import GATED_VARIANTS, Recorder, install_conditional_layers, layer_variant
from .moe import MoEFeedForward


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


def model_stacks(backbone: nn.Module, config) -> list:
    """[(stack module, its layers, the MoE layers' indices, FFN layout)]: the source's base model for a
    decoder or an encoder; an encoder-decoder's encoder (`moe_layers`) and decoder
    (`decoder_moe_layers`), each with its own forward hooks, padding and layout (causal in the decoder)."""
    layout = layout_from_dict(config.ffn_layout)
    if config.decoder_ffn_layout is None:
        _, layers = find_layers(backbone, config.num_hidden_layers)
        return [(backbone.base_model, layers, config.moe_layers, layout)]
    (_, encoder, _, enc_layers), (_, decoder, _, dec_layers) = seq2seq_stacks(backbone)
    return [(backbone.get_submodule(encoder), enc_layers, config.moe_layers, layout),
            (backbone.get_submodule(decoder), dec_layers, config.decoder_moe_layers or [],
             layout_from_dict(config.decoder_ffn_layout))]


_PARALLEL_PLANS = ("_tp_plan", "_ep_plan", "_pp_plan", "_fsdp_plan")


def drop_stale_plan_entries(model: nn.Module) -> None:
    """Keep, in the parallel plans of `model` and of every model inside it, only the entries that
    name a module or parameter in every layer their `*` stands for.

    The source's plans name its FFN modules in every layer (Llama: `layers.*.mlp.gate_proj`
    colwise, ..., `down_proj` rowwise), which an MoE layer no longer has; a plan matches its
    patterns against each layer's modules, so those entries cannot be kept for the dense layers
    alone. Dropping them is a valid plan: each FFN then runs unsharded on every rank, while the
    attention, embeddings and head keep their sharding (each colwise / rowwise pair is whole)."""
    for module in model.modules():
        if not isinstance(module, PreTrainedModel):
            continue
        for attr in _PARALLEL_PLANS:
            plan = module.__dict__.get(attr)
            if plan:
                setattr(module, attr, {k: v for k, v in plan.items() if _names_everywhere(module, k.split("."))})


def _names_everywhere(module: nn.Module, parts: list) -> bool:
    if not parts:
        return True
    head, rest = parts[0], parts[1:]
    if head == "*":
        children = list(module.children())
        return bool(children) and all(_names_everywhere(child, rest) for child in children)
    child = getattr(module, head, None)
    if isinstance(child, nn.Module):
        return _names_everywhere(child, rest)
    return not rest and isinstance(child, torch.Tensor)


def _set_submodule(root, dotted, module):
    parent, _, name = dotted.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


class CondCompPreTrainedModel(CondCompInitMixin, PreTrainedModel):
    config_class = CondCompConfig
    base_model_prefix = "backbone"
    main_input_name = "input_ids"
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _auto_class_of_task = AutoModel

    def __init__(self, config):
        super().__init__(config)
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
        self.backbone = self._auto_class_of_task.from_config(config.text_config)
        if serving:
            register_vllm_weight_names(type(self).__name__, config)
        if self.can_generate():  # from the config's dict, which nests the source's: its special tokens
            self.generation_config = GenerationConfig.from_model_config(config.to_dict())
        self._moe_blocks, self._conditional_layers, self._condcomp_stacks = [], [], []
        for stack, layers, moe_layers, layout in model_stacks(self.backbone, config):
            blocks = install_moe_blocks(layers, moe_layers, config, layout)
            conditional = install_conditional_layers(layers, config, layout.causal)
            # Every forward reaches the stack (a task head calls it, `generate()` too, an encoder-decoder's
            # `generate()` its encoder apart): its hooks give the blocks and layers the padding of each call.
            pooled = None if config.decoder_ffn_layout is not None else _pooled_token_kind(self.backbone, layout.causal)
            stack._condcomp_parts = (config, pooled, blocks, conditional)
            stack.register_forward_pre_hook(begin_forward, with_kwargs=True)
            stack.register_forward_hook(end_forward)
            self._moe_blocks += blocks
            self._conditional_layers += conditional
            self._condcomp_stacks.append(stack)
        self._no_split_modules = list(getattr(self.backbone, "_no_split_modules", None) or [])
        drop_stale_plan_entries(self.backbone)
        # The backbone's tied keys under `backbone.`, where transformers looks for a class's own
        # (`post_init` collects its ignore-on-save keys the same way).
        tied = getattr(self.backbone, "_tied_weights_keys", None)
        if isinstance(tied, dict):
            self._tied_weights_keys = {f"backbone.{k}": f"backbone.{v}" for k, v in tied.items()}
        elif tied:
            self._tied_weights_keys = [f"backbone.{k}" for k in tied]
        self.post_init()

    @torch.no_grad()
    def initialize_weights(self):
        """transformers initialises every module under a model inside this one (the backbone) by
        that model's `_init_weights`, which knows the source's modules but not the MoE blocks'
        experts: they would keep whatever memory they were given. The blocks are drawn here first,
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
        """Also loads a checkpoint saved from another task's class: a classifier's weights into
        `CondCompModel` (its head left out, as transformers does for `AutoModel`), or a base
        model's into a task class (the new head initialised). The source's base model sits under
        `backbone.<prefix>.` in a task class and under `backbone.` in `CondCompModel`."""
        config = kwargs.get("config")
        if not isinstance(config, CondCompConfig):
            hub = {k: kwargs[k] for k in _HUB_KWARGS if k in kwargs}
            config = CondCompConfig.from_pretrained(pretrained_model_name_or_path, **hub)
        saved = (getattr(config, "architectures", None) or [cls.__name__])[0]
        mapping = _cross_head_key_mapping(config, saved == CondCompModel.__name__, cls is CondCompModel)
        if mapping and kwargs.get("key_mapping") is None:
            kwargs["key_mapping"] = mapping
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

    def get_input_embeddings(self):
        return self.backbone.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.backbone.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.backbone.get_output_embeddings()

    def set_output_embeddings(self, value):
        self.backbone.set_output_embeddings(value)

    def forward(self, input_ids=None, attention_mask=None, labels=None, output_router_logits=None, return_dict=None,
                past_key_values=None, cache=None, position_ids=None, **kwargs):
        """The source model's forward (every argument it takes), plus `output_router_logits`. The
        output is the source model's, with `loss` = task loss + weighted router losses and the
        fields `routing_loss`, `aux_loss`, `z_loss`, `compute_loss` (the gated layers' weighted
        losses) and `router_logits` (when asked) after its own; `compute_fraction` (the executed
        share of token-layer compute, 1.0 = dense) and `layer_compute_fractions` ({layer: share} of
        the routed and gated layers) are attributes.
        A KV cache is taken as `cache=` or `past_key_values=` and handed to the backbone under the
        name the installed transformers uses (compat.py)."""
        if position_ids is not None:  # named, so that callers reading the signature pass it (GPT-2 has no RoPE)
            kwargs["position_ids"] = position_ids
        past = cache_argument(past_key_values, cache)
        if past is not None:
            kwargs[CACHE_KEY] = past
        if output_router_logits is None:
            output_router_logits = self.config.output_router_logits
        if labels is not None:
            kwargs["labels"] = labels
        for name in ("output_hidden_states", "output_attentions"):  # set on this config, read by the backbone
            if kwargs.get(name) is None and getattr(self.config, name, False):
                kwargs[name] = True
        for stack in self._condcomp_stacks:
            stack.__dict__.pop("_condcomp_last", None)
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask, return_dict=True, **kwargs)
        recorder = merge_recorders([stack.__dict__.pop("_condcomp_last", None) for stack in self._condcomp_stacks])
        total, aux, z, extra = condcomp_losses(
            self.config, recorder, self.training or bool(output_router_logits) or labels is not None
        )
        if total is not None and getattr(out, "loss", None) is not None:
            out["loss"] = out.loss + total
        fields = {"routing_loss": total, "aux_loss": aux, "z_loss": z, "compute_loss": extra,
                  "router_logits": tuple(getattr(recorder, "outputs", recorder.router_logits))
                  if output_router_logits else None}
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
        return out if use_return_dict(self.config, return_dict) else out.to_tuple()


VLLM_ATTENTION = "vllm"  # the attention implementation vLLM's Transformers backend sets on the config


def vllm_refusal(config) -> str | None:
    """Why vLLM's Transformers backend cannot serve a model of `config` (one line), or None.

    vLLM swaps each MoE block's `experts` for its fused MoE, which computes SiLU-gated experts on the
    `num_experts_per_tok` experts each token's router picks; its attention and KV cache run every
    token through every layer."""
    for variant in GATED_VARIANTS.values():
        layers = getattr(config, variant.layers_field, None)
        if layers:
            return (f"`{variant.layers_field}`={layers}: {variant.description} run a subset of each sequence's "
                    "tokens, and vLLM's attention and KV cache run every token through every layer.")
    if config.moe_layers and config.moe_routing != "token_choice":
        return (f"`moe_routing`={config.moe_routing!r}: vLLM's fused MoE serves token-choice routing "
                "(each token's top `num_experts_per_tok` experts) only.")
    if config.moe_layers and config.moe_capacity_factor is not None:
        return (f"`moe_capacity_factor`={config.moe_capacity_factor!r}: capacity-limited routing drops tokens "
                "that vLLM's fused MoE would compute; only dropless routing (None) serves.")
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


def vllm_weight_renaming(config) -> tuple[str, str]:
    """(regex, replacement) from a task class's saved weight name to where vLLM's Transformers
    backend holds the weight: it builds `CondCompModel` (the source's base model under `backbone.`) as
    `model.` and its own head, so `backbone.<prefix>.X` is `model.backbone.X`, and the head
    (`backbone.lm_head.X`) is `lm_head.X` by vLLM's own mapping."""
    return rf"^backbone\.{_source_prefix(config)}\.", "model.backbone."


def register_vllm_weight_names(class_name: str, config) -> None:
    """Register `vllm_weight_renaming` as transformers' checkpoint conversion mapping of `class_name`,
    which vLLM's Transformers backend reads to name the weights it loads. Only a model that vLLM builds
    registers it: transformers users load the weights under their saved names."""
    from transformers.conversion_mapping import register_checkpoint_conversion_mapping
    from transformers.core_model_loading import WeightRenaming

    source, target = vllm_weight_renaming(config)
    register_checkpoint_conversion_mapping(class_name, [WeightRenaming(source, target)], overwrite=True)


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
    conditional layers, with the padding of this call."""
    config, pooled, blocks, layers = base._condcomp_parts
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
    for module in (*blocks, *layers):
        module._condcomp_recorder = recorder
    base._condcomp_last = recorder


def end_forward(base, args, output):
    """Forward hook: in evaluation the layers drop the recorder (in training they keep it until the
    next forward, as gradient checkpointing recomputes them in the backward pass)."""
    if not base.training:
        _, _, blocks, layers = base._condcomp_parts
        for module in (*blocks, *layers):
            module._condcomp_recorder = None


def _pooled_token_kind(backbone, causal):
    """Which token the source's head pools: "first" for an encoder (its pooler or classification head
    reads [CLS]; a base model pins it too, so that it routes as the classifier's backbone does),
    "last" for a decoder's sequence classifier (the last real token), or None where the head reads
    every token (masked and causal LM, token classification)."""
    name = type(backbone).__name__
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


def _source_prefix(config) -> str:
    """Where the source's task classes hold its base model (`model`, `transformer`, `bert`, ...)."""
    return AutoModel._model_mapping[type(config.text_config)].base_model_prefix


def _cross_head_key_mapping(config, saved_base: bool, loading_base: bool) -> dict | None:
    """`key_mapping` (regex -> replacement) between a checkpoint of a base model and one of a task
    class, whose backbone holds the source's base model under its `base_model_prefix`."""
    if saved_base == loading_base:
        return None
    prefix = _source_prefix(config)
    if getattr(config.text_config, "is_encoder_decoder", False):
        with torch.device("meta"):  # T5's task model holds its base model's modules at its root, not under it
            if not isinstance(getattr(AutoModelForSeq2SeqLM.from_config(config.text_config), prefix, None), nn.Module):
                return None
    if saved_base:
        return {r"^backbone\.": f"backbone.{prefix}."}
    return {rf"^backbone\.{prefix}\.": "backbone."}


class CondCompModel(CondCompPreTrainedModel):
    _auto_class_of_task = AutoModel


class CondCompForSequenceClassification(CondCompPreTrainedModel):
    _auto_class_of_task = AutoModelForSequenceClassification


class CondCompForTokenClassification(CondCompPreTrainedModel):
    _auto_class_of_task = AutoModelForTokenClassification


class CondCompForMaskedLM(CondCompPreTrainedModel):
    _auto_class_of_task = AutoModelForMaskedLM


class _BackboneGeneration:
    """Generation by the source model's own `generate()`, run on the backbone (which holds the MoE
    blocks) with this model's generation config: positions, masks, caches (an encoder-decoder's
    too) and every hook a model class gives its `generate()` (OPT's positions from the padding mask,
    Phi-3's, ...) stay the source's. Router losses play no part in decoding."""

    def generate(self, *args, **kwargs):
        self.backbone.generation_config = self.generation_config
        return self.backbone.generate(*args, **kwargs)

    def prepare_inputs_for_generation(self, *args, **kwargs):
        return self.backbone.prepare_inputs_for_generation(*args, **kwargs)


class CondCompForCausalLM(_BackboneGeneration, CondCompPreTrainedModel, GenerationMixin):
    _auto_class_of_task = AutoModelForCausalLM


class CondCompForConditionalGeneration(_BackboneGeneration, CondCompPreTrainedModel, GenerationMixin):
    """An encoder-decoder source (T5, BART, Marian, M2M100, ...) with MoE blocks in its encoder's and
    decoder's chosen layers (`moe_layers`, `decoder_moe_layers`)."""

    _auto_class_of_task = AutoModelForSeq2SeqLM

    def get_encoder(self, *args, **kwargs):
        return self.backbone.get_encoder(*args, **kwargs)

    def get_decoder(self):
        return self.backbone.get_decoder()


_HEADS = (CondCompModel, CondCompForSequenceClassification, CondCompForTokenClassification, CondCompForMaskedLM,
          CondCompForCausalLM, CondCompForConditionalGeneration)
CondCompConfig.register_for_auto_class()
for _cls in _HEADS:
    _cls.register_for_auto_class(_cls._auto_class_of_task.__name__)
# a saved model loads as any of them (from_pretrained maps the keys); a task the source
# architecture has no class for is refused by transformers' own auto class
CondCompPreTrainedModel._auto_heads = {c._auto_class_of_task.__name__: c.__name__ for c in _HEADS}
