"""What the three recipes in `recipes/` share, one module per concern:

- `arguments`: flags, YAML configs, `key=value` overrides, `RecipeError` and `run_recipe`;
- `data`: data files, Hub datasets, splits, column checks, padding;
- `models`: the model (upcycled on the fly or loaded), tokenizer, LoRA, routing parameters, optimizer;
- `loop`: accelerator, schedule, the training loop with exact resume, saving checkpoints;
- `checkpoints`: where checkpoints live and how `--resume_from_checkpoint` finds one;
- `errors`: `RecipeError`, raised by all of them;
- `evaluation`: held-out loss, generation, routing statistics;
- `publish`: the output folder, native export, results, model card, Hub upload.

The recipes call them as `training.<name>`; each stays a plain function. Task-specific data
formats live in their recipe (translation pairs in `recipes/translation.py`, chat conversations
in `recipes/dialogue.py`).
"""

from .arguments import (
    NULL_WORDS,
    UPCYCLING_KEYS,
    RecipeError,
    add_common_arguments,
    load_config,
    parallel_sizes,
    parse_args,
    run_recipe,
    validate_args,
    yaml_value,
)
from .checkpoints import CHECKPOINT_DIR, STATE_FILE, find_checkpoint
from .data import check_file, load_splits, load_table, pad_collate, require_columns, seq2seq_collate, split_source
from .evaluation import evaluate_loss, generate, routing_stats
from .loop import (
    check_engine,
    clip_grad_norm,
    engine_record,
    make_accelerator,
    prepare,
    prepare_for_engine,
    prepare_training,
    router_loss_parts,
    save_checkpoint,
    schedule,
    start_run,
    train,
)
from .models import (
    apply_lora,
    count_parameters,
    decays,
    distributed_config,
    is_encoder_decoder,
    load_model,
    load_tokenizer,
    lora_targets,
    make_optimizer,
    routing_parameter_names,
    source_config,
    unwrap,
)
from .publish import (
    HUB_IGNORE,
    NATIVE_DIR,
    end_training,
    native_dir,
    push_to_hub,
    save_model,
    write_model_card,
    write_predictions,
    write_results,
)

__all__ = [
    "NULL_WORDS", "UPCYCLING_KEYS", "RecipeError", "add_common_arguments", "load_config", "parallel_sizes",
    "parse_args", "run_recipe", "validate_args", "yaml_value", "check_file", "load_splits", "load_table",
    "pad_collate", "require_columns", "seq2seq_collate", "split_source", "evaluate_loss", "generate", "routing_stats",
    "CHECKPOINT_DIR", "STATE_FILE", "find_checkpoint", "check_engine", "clip_grad_norm", "engine_record",
    "make_accelerator", "prepare", "prepare_for_engine", "prepare_training", "router_loss_parts", "save_checkpoint",
    "schedule",
    "start_run", "train", "apply_lora", "count_parameters", "decays", "distributed_config", "is_encoder_decoder",
    "load_model", "load_tokenizer", "lora_targets", "make_optimizer", "routing_parameter_names", "source_config",
    "unwrap", "HUB_IGNORE", "NATIVE_DIR", "end_training", "native_dir", "push_to_hub", "save_model",
    "write_model_card", "write_predictions", "write_results",
]
