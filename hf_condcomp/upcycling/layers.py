"""Which layers are upcycled: `layers` (and `mod_layers`) as the spec, YAML and flags write them,
read into sorted layer indices and checked against the source's depth."""

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
