"""The steps of upcycling, one module per concern; `hf_condcomp.upcycle.upcycle` composes them.

- `sources`: the dense source resolved, refused early when it cannot be upcycled, and loaded;
- `targets`: the target classes, the task check, and the checks of config overrides;
- `layers`: which layers are upcycled;
- `expert_init`: a dense FFN read in canonical form and turned into experts and a router
  (`copy`, `noise`, `drop`, `split-random`, `split-kmeans`);
- `merging`: several dense sources as the experts, shared weights from a base or their average;
- `router_init`: routers that start from each expert's prompts (`hidden`, `cheap_embed`);
- `convert_native`: the target config and state dict;
- `copy_weights`: every other weight, copied key for key with shapes asserted.

Import from `hf_condcomp.upcycle` (the public entry point), or from the module that owns a step.
"""
