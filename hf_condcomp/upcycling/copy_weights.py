"""Every target weight that is not an expert or a router: copied key for key from the source with
its shape asserted, or initialised by its module when the source has none (gates); a source weight
that nothing consumed is refused rather than dropped."""

import re


def copy_rest(src_state, target, target_keys, out, consumed, config, gen):
    """Every target weight not built yet is the source's of the same name, shape asserted; a
    source weight that nothing consumed is refused rather than dropped."""
    for key, param in target_keys.items():
        if key in out:
            continue
        src_key = key
        if src_key not in src_state:
            fresh = _fresh_parameter(target, key, param, config, gen)
            if fresh is None:
                raise KeyError(f"upcycling: target weight {key!r} has no source weight and no initialiser")
            out[key] = fresh
            continue
        if tuple(src_state[src_key].shape) != tuple(param.shape):
            raise ValueError(f"upcycling: shape of {key!r} is {tuple(src_state[src_key].shape)} in the source, "
                             f"{tuple(param.shape)} in the target")
        out[key] = src_state[src_key]
        consumed.add(src_key)
    for key, tensor in out.items():
        if tuple(tensor.shape) != tuple(target_keys[key].shape):
            raise ValueError(f"upcycling: {key!r} built with shape {tuple(tensor.shape)}, "
                             f"expected {tuple(target_keys[key].shape)}")
    left = [k for k in src_state if k not in consumed and not _ignorable(k)]
    if left:
        raise ValueError(f"upcycling would drop source weights {left[:5]}{'...' if len(left) > 5 else ''}: refusing")
    return out


def _ignorable(key):
    # Buffers that the target recomputes (position ids, rotary frequencies), never learned weights.
    return bool(re.search(r"(position_ids|token_type_ids|inv_freq|masked_bias|attn\.bias)$", key))


def _fresh_parameter(target, key, param, config, gen):
    """Initial value of a weight the source does not have (gates, routers of routed blocks)."""
    module_name, _, name = key.rpartition(".")
    module = target.get_submodule(module_name)
    fresh = getattr(module, "_condcomp_fresh", None)
    if fresh is not None:
        return fresh(name, config, gen)
    return None
