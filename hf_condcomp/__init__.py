"""hf_condcomp: upcycle dense Transformers checkpoints into conditional-computation models."""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
)

from .insight import compare, inspect, routing_summary
from .modeling.configuration_condcomp import CondCompBertConfig, CondCompConfig, CondCompGPT2Config, CondCompLlamaConfig
from .modeling.modeling_condcomp import (
    CondCompForCausalLM,
    CondCompForMaskedLM,
    CondCompForSequenceClassification,
    CondCompForTokenClassification,
    CondCompModel,
)
from .modeling.modeling_condcomp_bert import (
    CondCompBertForMaskedLM,
    CondCompBertForSequenceClassification,
    CondCompBertForTokenClassification,
    CondCompBertModel,
)
from .modeling.modeling_condcomp_gpt2 import CondCompGPT2ForCausalLM, CondCompGPT2Model
from .modeling.modeling_condcomp_llama import CondCompLlamaForCausalLM, CondCompLlamaModel
from .upcycle import upcycle

__version__ = "0.1.0"

# Local registration: with hf_condcomp imported, Auto classes load saved models without remote code.
for _config, _models in (
    (CondCompBertConfig, {
        AutoModel: CondCompBertModel,
        AutoModelForSequenceClassification: CondCompBertForSequenceClassification,
        AutoModelForTokenClassification: CondCompBertForTokenClassification,
        AutoModelForMaskedLM: CondCompBertForMaskedLM,
    }),
    (CondCompGPT2Config, {AutoModel: CondCompGPT2Model, AutoModelForCausalLM: CondCompGPT2ForCausalLM}),
    (CondCompLlamaConfig, {AutoModel: CondCompLlamaModel, AutoModelForCausalLM: CondCompLlamaForCausalLM}),
    (CondCompConfig, {
        AutoModel: CondCompModel,
        AutoModelForSequenceClassification: CondCompForSequenceClassification,
        AutoModelForTokenClassification: CondCompForTokenClassification,
        AutoModelForMaskedLM: CondCompForMaskedLM,
        AutoModelForCausalLM: CondCompForCausalLM,
    }),
):
    AutoConfig.register(_config.model_type, _config, exist_ok=True)
    for _auto, _model in _models.items():
        _auto.register(_config, _model, exist_ok=True)

__all__ = [
    "upcycle",
    "inspect",
    "compare",
    "routing_summary",
    "CondCompBertConfig",
    "CondCompGPT2Config",
    "CondCompLlamaConfig",
    "CondCompBertModel",
    "CondCompBertForSequenceClassification",
    "CondCompBertForTokenClassification",
    "CondCompBertForMaskedLM",
    "CondCompGPT2Model",
    "CondCompGPT2ForCausalLM",
    "CondCompLlamaModel",
    "CondCompLlamaForCausalLM",
    "CondCompConfig",
    "CondCompModel",
    "CondCompForSequenceClassification",
    "CondCompForTokenClassification",
    "CondCompForMaskedLM",
    "CondCompForCausalLM",
]
