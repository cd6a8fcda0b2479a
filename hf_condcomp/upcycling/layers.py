"""Which layers are upcycled: `layers` (and a gated variant's beside the MoE layers, `mod_layers`) as the
spec, YAML and flags write them, read into sorted layer indices and checked against the source's depth."""

from dataclasses import dataclass

from ..modeling.architectures import decoder_depth
from ..modeling.variants import GATED_VARIANTS
from ..spec import _error


def parse_layers(layers, num_layers: int, argument: str = "layers") -> list[int]:
    """`every_other` (layers 1, 3, 5, ... as in Switch/ST-MoE), `all`, '0,2,4', one int or a list of ints."""
    if isinstance(layers, int) and not isinstance(layers, bool):  # `layers=29` as YAML and flags read it
        layers = [layers]
    if layers == "every_other":
        return list(range(1, num_layers, 2))
    if layers == "all":
        return list(range(num_layers))
    if isinstance(layers, str):
        try:
            layers = [int(part) for part in layers.split(",") if part.strip()]
        except ValueError:
            raise _error(argument, layers,
                         "'every_other', 'all' or comma-separated layer indices like '0,2,4'") from None
    layers = [int(i) for i in layers]
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad or not layers:
        raise ValueError(
            f"`{argument}` has layer index {bad[0] if bad else None!r} out of range: the source has {num_layers} "
            f"layers, so indices must be in [0, {num_layers - 1}]."
        )
    return sorted(set(layers))


STACKS = ("encoder", "decoder")


def parse_stack_layers(layers, num_encoder: int, num_decoder: int, argument: str = "layers") -> tuple[list, list]:
    """(encoder layers, decoder layers) of an encoder-decoder source. `layers` is what `parse_layers`
    takes, for both stacks (`every_other`: layers 1, 3, ... of each), or names the stacks:
    'encoder:every_other,decoder:all', 'encoder:0,2,decoder:1', or {'encoder': ..., 'decoder': ...};
    a stack it does not name keeps dense FFNs."""
    if isinstance(layers, str) and any(f"{stack}:" in layers for stack in STACKS):
        parts, current = {}, None
        for part in (p.strip() for p in layers.split(",") if p.strip()):
            stack, colon, value = part.partition(":")
            if colon:
                if stack.strip() not in STACKS or stack.strip() in parts:
                    raise _error(argument, layers, "stacks named once each, as 'encoder:every_other,decoder:all'")
                current = stack.strip()
                parts[current] = [value.strip()]
            elif current is None:
                raise _error(argument, layers, "'encoder:...' or 'decoder:...' first, as 'encoder:0,2,decoder:all'")
            else:
                parts[current].append(part)
        layers = {stack: ",".join(values) for stack, values in parts.items()}
    if isinstance(layers, dict):
        unknown = set(layers) - set(STACKS)
        if unknown or not layers:
            raise _error(argument, layers, f"a mapping of {STACKS} to layers")
        counts = {"encoder": num_encoder, "decoder": num_decoder}
        return tuple(parse_layers(layers[stack], counts[stack], f"{argument} ({stack})") if stack in layers else []
                     for stack in STACKS)
    return parse_layers(layers, num_encoder, argument), parse_layers(layers, num_decoder, argument)


@dataclass(frozen=True)
class ChosenLayers:
    """The layers an upcycle makes conditional. stack: the (first) stack's layers that get the variant (MoE,
    or the gated variant); decoder: an encoder-decoder's decoder layers (None for other sources);
    gated_variant, gated: the gated variant (None for a plain MoE) and its layers (`mod_layers` with
    variant moe: the Mixture-of-Depths blocks beside the MoE layers)."""

    stack: list
    decoder: list | None
    gated_variant: object
    gated: list

    def record(self):
        """As `config.upcycling` records them: a list, or {encoder, decoder}."""
        return self.stack if self.decoder is None else {"encoder": self.stack, "decoder": self.decoder}


def choose_layers(spec, src_config, stacks) -> ChosenLayers:
    """`spec.layers` (and `spec.mod_layers`, ...) read against the source's stacks (`native_stacks`)."""
    num_layers = src_config.num_hidden_layers
    decoder = None
    if len(stacks) > 1:
        chosen, decoder = parse_stack_layers(spec.layers, num_layers, decoder_depth(src_config))
        if not chosen and not decoder:
            raise ValueError(f"`layers`={spec.layers!r} names no layer of either stack.")
    else:
        chosen = parse_layers(spec.layers, num_layers)
    variant = GATED_VARIANTS.get(spec.variant)
    beside = gated_beside_moe(spec)
    if variant is None and beside:  # MoE + Mixture-of-Depths (a variant's `layers_setting`)
        if len(beside) > 1:
            named = " and ".join(f"`{v.layers_field}`" for v in beside)
            raise ValueError(f"{named} are both given: the layers beside the MoE layers take one gated variant; "
                             "give one of them.")
        variant = beside[0]
        return ChosenLayers(chosen, decoder, variant, parse_layers(getattr(spec, variant.layers_field), num_layers,
                                                                   variant.layers_field))
    return ChosenLayers(chosen, decoder, variant, chosen if variant is not None else [])


def gated_beside_moe(spec) -> list:
    """The gated variants whose layers setting (`mod_layers`: `GatedVariant.layers_setting`) `spec` gives."""
    return [v for v in GATED_VARIANTS.values() if v.layers_setting and getattr(spec, v.layers_field, None) is not None]
