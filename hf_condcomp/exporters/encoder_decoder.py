"""What the native encoder-decoder MoE formats (Switch Transformers, NLLB-MoE) share: where their
configs place MoE layers, a capacity above any length, and a check of logits and greedy tokens."""

import torch

from .base import ExportError, ExportFormat

DROPLESS_CAPACITY = 1 << 30  # tokens per expert and sequence: above any length, so nothing is dropped


def layer_setting(moe_layers, num_layers: int, placed) -> int | None:
    """The value v in 0..num_layers of a config's layer setting (a sparse step, a count of sparse
    layers) for which `placed(v, num_layers)`, the layers that config makes MoE, are exactly
    `moe_layers`; None where no value places them."""
    want = sorted(moe_layers or [])
    return next((v for v in range(num_layers + 1) if placed(v, num_layers) == want), None)


class EncoderDecoderFormat(ExportFormat):
    """A native encoder-decoder MoE: its check adds the greedy tokens of the batch to the logits."""

    encoder_decoder = True
    architecture_name = None  # how a refusal names the architecture ("Switch")

    def verification_inputs(self, config) -> dict:
        g = torch.Generator().manual_seed(0)
        return {"input_ids": torch.randint(0, config.vocab_size, (2, 16), generator=g),
                "decoder_input_ids": torch.randint(0, config.vocab_size, (2, 8), generator=g)}

    def verify(self, native, ours) -> float:
        diff = super().verify(native, ours)
        ids = self.verification_inputs(native.config)["input_ids"]
        greedy = [model.generate(ids, max_new_tokens=5, do_sample=False) for model in (native, ours)]
        if not torch.equal(*greedy):
            raise ExportError(f"the {self.name} export's greedy tokens differ from the model's; nothing written. "
                              "Keep this model as remote code and report it.")
        return diff

    def stacks(self, config):
        """(name, our MoE layers, number of layers) of the encoder and the decoder."""
        raise NotImplementedError

    def stack_blockers(self, config, placed, rule: str):
        """(blocked, feature) for each stack whose MoE layers no value of the config's layer setting
        places (`placed`); `rule` says how the architecture places them (`{stack}`: the stack's name)."""
        return [(layer_setting(layers, n, placed) is None,
                 f"{stack} MoE layers {layers or []} of {n}: {self.architecture_name} {rule.format(stack=stack)}")
                for stack, layers, n in self.stacks(config)]


def first_blocker(blockers) -> str | None:
    return next((feature for blocked, feature in blockers if blocked), None)
