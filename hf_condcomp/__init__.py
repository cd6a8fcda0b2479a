"""hf_condcomp: upcycle dense Transformers checkpoints into conditional-computation models."""

from transformers import AutoConfig

from . import legacy
from .insight import compare, inspect, routing_summary
from .modeling.configuration_condcomp import CondCompConfig
from .modeling.modeling_condcomp import (
    TASK_CLASSES,
    CondCompForCausalLM,
    CondCompForConditionalGeneration,
    CondCompForMaskedLM,
    CondCompForSequenceClassification,
    CondCompForTokenClassification,
    CondCompModel,
)
from .upcycle import upcycle

__version__ = "0.1.0"

# Local registration: with hf_condcomp imported, Auto classes load saved models without remote code.
AutoConfig.register(CondCompConfig.model_type, CondCompConfig, exist_ok=True)
for _model in TASK_CLASSES.values():
    _model._auto_class_of_task.register(CondCompConfig, _model, exist_ok=True)
# Folders saved with the BERT / GPT-2 / Llama model types of earlier releases load as this kind.
legacy.register()

__all__ = [
    "upcycle",
    "inspect",
    "compare",
    "routing_summary",
    "CondCompConfig",
    "CondCompModel",
    "CondCompForSequenceClassification",
    "CondCompForTokenClassification",
    "CondCompForMaskedLM",
    "CondCompForCausalLM",
    "CondCompForConditionalGeneration",
]
