"""`transformers.Trainer` fine-tunes an upcycled model: the loss it optimises and logs is the
model's, router losses included, and gradient accumulation is scaled as for any model."""

import pytest
import torch

import hf_condcomp


@pytest.fixture(scope="module")
def minilm_moe(minilm_path):
    model = hf_condcomp.upcycle("all-MiniLM-L6-v2", num_experts=4, top_k=2, task="sequence-classification",
                                num_labels=3, init="noise", noise_std=0.05, router_aux_loss_coef=1.0,
                                # dropout off: the training forward repeats exactly
                                hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    assert not any(m.p for m in model.modules() if isinstance(m, torch.nn.Dropout))
    return model


def test_trainer_loss_includes_the_router_losses(minilm_moe, minilm_path, tmp_path):
    from transformers import AutoTokenizer, DataCollatorWithPadding, Trainer, TrainingArguments

    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    # Eight copies of one example: every micro-batch the shuffled sampler draws is the same, so the
    # loss Trainer logs can be compared with the model's own training forward exactly.
    rows = [{**tokenizer("My card payment was declined twice today"), "labels": 1}] * 8
    collate = DataCollatorWithPadding(tokenizer)
    minilm_moe.train()
    with torch.no_grad():
        out = minilm_moe(**collate(rows[:2]))
    config = minilm_moe.config
    task = out.loss - config.router_aux_loss_coef * out.aux_loss - config.router_z_loss_coef * out.z_loss
    assert out.aux_loss > 0.5  # with coefficient 1 the router loss is a visible part of the total

    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=2,
                             max_steps=2, learning_rate=0.0, logging_steps=1, report_to=[], save_strategy="no",
                             use_cpu=True, seed=0)
    trainer = Trainer(model=minilm_moe, args=args, train_dataset=rows, data_collator=collate)
    trainer.train()
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    # learning_rate 0 keeps the weights: every step logs the model's total loss (task + router
    # losses), not the task loss alone, and not twice it (a loss left unscaled by the two
    # accumulation steps, as Trainer does for models that normalise by `num_items_in_batch`).
    assert len(logged) == 2
    for value in logged:
        assert value == pytest.approx(float(out.loss), rel=1e-4), (value, float(out.loss), float(task))
    assert abs(float(out.loss) - float(task)) > 0.5
