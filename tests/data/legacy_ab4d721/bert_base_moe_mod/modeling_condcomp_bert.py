"""BERT-family encoders with Mixture-of-Experts FFNs and gated layers.

Parameter names match `transformers`' BERT (`bert.encoder.layer.0.attention.self.query.weight`,
...), so dense weights copy over key for key; an MoE layer replaces `intermediate.dense` and
`output.dense` by `mlp.router` and `mlp.experts` and keeps `output.LayerNorm`.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import PreTrainedModel
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer

from .common import (
    CondCompInitMixin,
    ForwardContext,
    attention,
    attention_settings,
    base_output,
    head_output,
    make_context,
    output_hidden_states_of,
)
from .configuration_condcomp import CondCompBertConfig
from .gating import run_layers, wrap_gated_layers
from .moe import MoEFeedForward


class CondCompBertEmbeddings(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.padding_offset = config.pad_token_id if config.padding_offset_positions else None
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size,
                                                padding_idx=self.padding_offset)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids=None, token_type_ids=None, position_ids=None, inputs_embeds=None):
        if inputs_embeds is None:
            inputs_embeds = self.word_embeddings(input_ids)  # (B, T, H)
        B, T = inputs_embeds.shape[:2]
        if position_ids is None and self.padding_offset is not None:  # RoBERTa: count real tokens after pad + 1
            if input_ids is not None:
                real = (input_ids != self.padding_offset).long()
                position_ids = torch.cumsum(real, dim=1) * real + self.padding_offset
            else:
                position_ids = torch.arange(self.padding_offset + 1, self.padding_offset + 1 + T,
                                            device=inputs_embeds.device).unsqueeze(0)
        if position_ids is None:
            position_ids = torch.arange(T, device=inputs_embeds.device).unsqueeze(0)
        if token_type_ids is None:
            token_type_ids = torch.zeros((B, T), dtype=torch.long, device=inputs_embeds.device)
        x = inputs_embeds + self.token_type_embeddings(token_type_ids) + self.position_embeddings(position_ids)
        return self.dropout(self.LayerNorm(x))


class CondCompBertSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(config.hidden_size, config.hidden_size)
        self.value = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout = config.attention_probs_dropout_prob

    def forward(self, x, ctx: ForwardContext):
        src = x if ctx.kv_states is None else ctx.kv_states  # (B, L, H): keys may include skipped tokens
        q = self.query(x).view(*x.shape[:2], self.num_heads, self.head_dim).transpose(1, 2)
        k, v = (proj(src).view(*src.shape[:2], self.num_heads, self.head_dim).transpose(1, 2) for proj in (self.key, self.value))
        return attention(q, k, v, ctx, self.dropout if self.training else 0.0)  # (B, T, H)


class CondCompBertSelfOutput(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden, residual):
        return self.LayerNorm(self.dropout(self.dense(hidden)) + residual)


class CondCompBertAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.self = CondCompBertSelfAttention(config)
        self.output = CondCompBertSelfOutput(config)

    def forward(self, x, ctx):
        return self.output(self.self(x, ctx), x)


class CondCompBertIntermediate(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.intermediate_act_fn = ACT2FN[config.hidden_act]

    def forward(self, x):
        return self.intermediate_act_fn(self.dense(x))


class CondCompBertOutput(nn.Module):
    """Dense FFN output (`dense`) or, in MoE layers, only the residual LayerNorm."""

    def __init__(self, config, with_dense=True):
        super().__init__()
        if with_dense:
            self.dense = nn.Linear(config.intermediate_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden, residual):
        if hasattr(self, "dense"):
            hidden = self.dense(hidden)
        return self.LayerNorm(self.dropout(hidden) + residual)


class CondCompBertLayer(GradientCheckpointingLayer):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.attention = CondCompBertAttention(config)
        self.is_moe = layer_idx in config.moe_layers
        if self.is_moe:
            self.mlp = MoEFeedForward(config, config.hidden_size, gated=False, bias=True, hidden_act=config.hidden_act, causal=False)
        else:
            self.intermediate = CondCompBertIntermediate(config)
        self.output = CondCompBertOutput(config, with_dense=not self.is_moe)

    def forward(self, x, ctx: ForwardContext):
        h = self.attention(x, ctx)  # (B, T, H)
        if self.is_moe:
            ffn, logits = self.mlp(h, ctx.token_mask)
            ctx.router_logits.append(logits)
        else:
            ffn = self.intermediate(h)
        return self.output(ffn, h)


class CondCompBertEncoder(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.layer = nn.ModuleList([CondCompBertLayer(config, i) for i in range(config.num_hidden_layers)])
        wrap_gated_layers(self.layer, config, causal=False)


class CondCompBertPooler(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.activation = nn.Tanh()

    def forward(self, hidden):
        return self.activation(self.dense(hidden[:, 0]))


class CondCompBertPreTrainedModel(CondCompInitMixin, PreTrainedModel):
    config_class = CondCompBertConfig
    base_model_prefix = "bert"
    _supports_sdpa = True
    _no_split_modules = ["CondCompBertLayer"]
    _auto_heads = {
        "AutoModel": "CondCompBertModel",
        "AutoModelForSequenceClassification": "CondCompBertForSequenceClassification",
        "AutoModelForTokenClassification": "CondCompBertForTokenClassification",
        "AutoModelForMaskedLM": "CondCompBertForMaskedLM",
    }


class CondCompBertModel(CondCompBertPreTrainedModel):
    def __init__(self, config, add_pooling_layer=True):
        super().__init__(config)
        self.embeddings = CondCompBertEmbeddings(config)
        self.encoder = CondCompBertEncoder(config)
        self.pooler = CondCompBertPooler(config) if add_pooling_layer else None
        self.post_init()

    def get_input_embeddings(self):
        return self.embeddings.word_embeddings

    def set_input_embeddings(self, value):
        self.embeddings.word_embeddings = value

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        inputs_embeds=None,
        output_hidden_states=None,
        output_router_logits=None,
        return_dict=None,
        output_attentions=None,
        **kwargs,
    ):
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of `input_ids` and `inputs_embeds`.")
        output_hidden_states = output_hidden_states_of(self.config, output_hidden_states)
        output_router_logits = self.config.output_router_logits if output_router_logits is None else output_router_logits
        x = self.embeddings(input_ids, token_type_ids, position_ids, inputs_embeds)  # (B, T, H)
        B, T = x.shape[:2]
        ctx = make_context(attention_mask, T, 0, causal=False, device=x.device, batch_size=B)
        attention_settings(self, ctx, output_attentions)
        gated = self.config.mod_layers or self.config.gate_layers
        reads_first = self.pooler is not None or self.config.classifier_head == "roberta"
        if gated and reads_first and self.config.keep_pooled_token:
            ctx.pinned = torch.zeros(B, T, dtype=torch.bool, device=x.device)
            ctx.pinned[:, 0] = True  # the pooler (or RoBERTa's classification head) reads [CLS] / <s>
        x, all_hidden = run_layers(self.encoder.layer, x, ctx, output_hidden_states)
        return base_output(
            self.config,
            ctx,
            x,
            self.training or output_router_logits,
            output_router_logits,
            return_dict,
            pooler_output=self.pooler(x) if self.pooler is not None else None,
            hidden_states=all_hidden,
        )


class CondCompRobertaClassificationHead(nn.Module):
    """RoBERTa's sequence classification head: dense, tanh and a linear on the first token."""

    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        dropout = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        self.dropout = nn.Dropout(dropout)
        self.out_proj = nn.Linear(config.hidden_size, config.num_labels)

    def forward(self, hidden):
        x = torch.tanh(self.dense(self.dropout(hidden[:, 0])))
        return self.out_proj(self.dropout(x))


class CondCompBertForSequenceClassification(CondCompBertPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.num_labels = config.num_labels
        roberta = config.classifier_head == "roberta"
        self.bert = CondCompBertModel(config, add_pooling_layer=not roberta)
        dropout = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        self.dropout = nn.Dropout(dropout)
        self.classifier = CondCompRobertaClassificationHead(config) if roberta else nn.Linear(config.hidden_size,
                                                                                             config.num_labels)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None, inputs_embeds=None, labels=None, return_dict=None, **kwargs):
        base = self.bert(input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds, return_dict=True, **kwargs)
        if self.config.classifier_head == "roberta":
            logits = self.classifier(base.last_hidden_state)  # (B, num_labels)
        else:
            logits = self.classifier(self.dropout(base.pooler_output))  # (B, num_labels)
        loss = None
        if labels is not None:
            problem = self.config.problem_type
            if problem is None:
                problem = "regression" if self.num_labels == 1 else (
                    "single_label_classification" if labels.dtype in (torch.long, torch.int) else "multi_label_classification"
                )
            if problem == "regression":
                loss = F.mse_loss(logits.squeeze(-1), labels.squeeze(-1).to(logits.dtype))
            elif problem == "single_label_classification":
                loss = F.cross_entropy(logits.view(-1, self.num_labels), labels.view(-1))
            else:
                loss = F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))
        return head_output(self.config, base, loss, logits, return_dict)


class CondCompBertForTokenClassification(CondCompBertPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.bert = CondCompBertModel(config, add_pooling_layer=False)
        dropout = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None, inputs_embeds=None, labels=None, return_dict=None, **kwargs):
        base = self.bert(input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds, return_dict=True, **kwargs)
        logits = self.classifier(self.dropout(base.last_hidden_state))  # (B, T, num_labels)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.view(-1, self.num_labels), labels.view(-1), ignore_index=-100)
        return head_output(self.config, base, loss, logits, return_dict)


class CondCompBertPredictionHeadTransform(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.transform_act_fn = ACT2FN[config.hidden_act]
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x):
        return self.LayerNorm(self.transform_act_fn(self.dense(x)))


class CondCompBertLMPredictionHead(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.transform = CondCompBertPredictionHeadTransform(config)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size, bias=True)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, x):
        return self.decoder(self.transform(x))


class CondCompBertOnlyMLMHead(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.predictions = CondCompBertLMPredictionHead(config)

    def forward(self, x):
        return self.predictions(x)


class CondCompBertForMaskedLM(CondCompBertPreTrainedModel):
    _tied_weights_keys = {
        "cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight",
        "cls.predictions.decoder.bias": "cls.predictions.bias",
    }

    def __init__(self, config):
        super().__init__(config)
        self.bert = CondCompBertModel(config, add_pooling_layer=False)
        self.cls = CondCompBertOnlyMLMHead(config)
        self.post_init()

    def get_output_embeddings(self):
        return self.cls.predictions.decoder

    def set_output_embeddings(self, value):
        self.cls.predictions.decoder = value
        self.cls.predictions.bias = value.bias

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None, inputs_embeds=None, labels=None, return_dict=None, **kwargs):
        base = self.bert(input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds, return_dict=True, **kwargs)
        logits = self.cls(base.last_hidden_state)  # (B, T, V)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.view(-1, self.config.vocab_size), labels.view(-1), ignore_index=-100)
        return head_output(self.config, base, loss, logits, return_dict)


CondCompBertConfig.register_for_auto_class()
CondCompBertModel.register_for_auto_class("AutoModel")
CondCompBertForSequenceClassification.register_for_auto_class("AutoModelForSequenceClassification")
CondCompBertForTokenClassification.register_for_auto_class("AutoModelForTokenClassification")
CondCompBertForMaskedLM.register_for_auto_class("AutoModelForMaskedLM")
