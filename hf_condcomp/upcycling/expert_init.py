"""Expert initialisation: one layer's dense FFN, read in a canonical form, becomes E experts and
a router by `init` (`copy`, `noise`, `drop`, `split-random`, `split-kmeans`; see `hf_condcomp.upcycle`).

The conversion (convert_native.py) reads each FFN with `layout_ffn` and builds each MoE block's
tensors with `moe_block_tensors`.
"""

import torch


def layout_ffn(state, prefix, layout):
    """The dense FFN of one layer, read from `state` at `prefix` + the layout's weight names, in a
    canonical form: inputs (list of (I, H): one, or [gate, up]), their biases, out (H, I), out
    bias, and the source keys consumed."""
    def weight(name):
        w = state[f"{prefix}{name}.weight"]
        return w.t() if layout.conv1d else w

    def bias(name, rows):
        b = state.get(f"{prefix}{name}.bias")
        return torch.zeros(rows, dtype=state[f"{prefix}{name}.weight"].dtype) if b is None else b

    ins = [weight(n) for n in layout.inputs]
    in_b = [bias(n, w.shape[0]) for n, w in zip(layout.inputs, ins)] if layout.bias else None
    if layout.fused:  # one matrix holding [gate; up]
        ins = list(ins[0].chunk(2, dim=0))
        in_b = None if in_b is None else list(in_b[0].chunk(2))
    out = weight(layout.output)
    out_b = bias(layout.output, out.shape[0]) if layout.bias else None
    keys = [f"{prefix}{n}.{p}" for n in (*layout.inputs, layout.output) for p in ("weight", "bias")
            if f"{prefix}{n}.{p}" in state]
    return ins, in_b, out, out_b, keys


def _reinit_like(t, rows, gen):
    """Values drawn from N(mean, std) of `t`, for the given rows (dim 0)."""
    fresh = torch.randn((len(rows),) + tuple(t.shape[1:]), generator=gen, dtype=torch.float32)
    fresh = fresh * t.float().std() + t.float().mean()
    return fresh.to(t.dtype)


def balanced_kmeans(points: torch.Tensor, num_groups: int, gen: torch.Generator, iters: int = 15) -> list[torch.Tensor]:
    """Partition rows of `points` (I, D) into equal groups by cosine k-means with balanced assignment."""
    n = points.shape[0]
    size = n // num_groups
    x = torch.nn.functional.normalize(points.float(), dim=-1)
    centroids = x[torch.randperm(n, generator=gen)[:num_groups]]
    assign = torch.empty(n, dtype=torch.long)
    for _ in range(iters):
        sim = x @ centroids.t()  # (I, E)
        order = torch.argsort(sim.reshape(-1), descending=True).tolist()
        assign.fill_(-1)
        fill = [0] * num_groups
        left = n
        for flat in order:  # greedy: best (neuron, group) pairs first, groups capped at `size`
            i, g = divmod(flat, num_groups)
            if assign[i] < 0 and fill[g] < size:
                assign[i] = g
                fill[g] += 1
                left -= 1
                if left == 0:
                    break
        centroids = torch.nn.functional.normalize(
            torch.stack([x[assign == g].mean(0) for g in range(num_groups)]), dim=-1
        )
    return [torch.nonzero(assign == g).squeeze(-1) for g in range(num_groups)]


def _experts_from_dense(ffn, num_experts, top_k, init, gen, noise_std, drop_ratio, gated):
    """Returns {name: tensor} for the experts module and the router weight (or None)."""
    ins, in_b, out, out_b, _ = ffn
    inter = out.shape[1]
    experts_in, experts_in_b, experts_out, experts_out_b = [], [], [], []
    router = None
    if init.startswith("split"):
        if inter % num_experts:
            raise ValueError(
                f"`init`={init!r} splits the FFN's {inter} neurons into `num_experts`={num_experts} equal groups: "
                "choose a number of experts that divides it."
            )
        if init == "split-kmeans":
            groups = balanced_kmeans(torch.cat(ins, dim=1), num_experts, gen)
        else:
            groups = list(torch.randperm(inter, generator=gen).view(num_experts, -1))
        for g in groups:
            experts_in.append([w[g] for w in ins])
            experts_in_b.append(None if in_b is None else [b[g] for b in in_b])
            experts_out.append(out[:, g])
            experts_out_b.append(None if out_b is None else out_b / top_k)
        router = torch.stack([ins[0][g].float().mean(0) for g in groups]).to(ins[0].dtype)  # (E, H)
    else:
        for _ in range(num_experts):
            e_in, e_out = [w.clone() for w in ins], out.clone()
            e_in_b = None if in_b is None else [b.clone() for b in in_b]
            if init == "noise":
                e_in = [w + torch.randn(w.shape, generator=gen).to(w.dtype) * noise_std * w.float().std() for w in e_in]
                e_out = e_out + torch.randn(e_out.shape, generator=gen).to(e_out.dtype) * noise_std * out.float().std()
            elif init == "drop":
                rows = torch.randperm(inter, generator=gen)[: int(round(drop_ratio * inter))]
                for w in e_in:
                    w[rows] = _reinit_like(w, rows, gen)
                if e_in_b is not None:
                    for b in e_in_b:
                        b[rows] = _reinit_like(b.unsqueeze(-1), rows, gen).squeeze(-1)
                e_out[:, rows] = _reinit_like(e_out.t(), rows, gen).t()
            experts_in.append(e_in)
            experts_in_b.append(e_in_b)
            experts_out.append(e_out)
            experts_out_b.append(None if out_b is None else out_b.clone())
    up = torch.stack([torch.cat(e, dim=0) for e in experts_in])  # (E, I' or 2I', H), [gate; up] when gated
    tensors = {("gate_up_proj" if gated else "up_proj"): up, "down_proj": torch.stack(experts_out)}  # (E, H, I')
    if experts_in_b[0] is not None:
        tensors[("gate_up_proj_bias" if gated else "up_proj_bias")] = torch.stack([torch.cat(b) for b in experts_in_b])
        tensors["down_proj_bias"] = torch.stack(experts_out_b)
    return tensors, router


def moe_block_tensors(ffns, block_prefix, target_keys, config, gated, init, gen, noise_std, drop_ratio, router=None):
    """{target key: tensor} of the MoE block at `block_prefix` (experts and router) made from `ffns`:
    one dense FFN, or one per source, each giving an equal share of the experts in turn. `router`
    (E, H), when given, is the router's start (prompt-based `router_init`)."""
    if not isinstance(ffns, list):
        ffns = [ffns]
    per_source = config.num_local_experts // len(ffns)
    parts = [_experts_from_dense(ffn, per_source, config.num_experts_per_tok, init, gen, noise_std, drop_ratio, gated)
             for ffn in ffns]
    tensors = {name: torch.cat([p[0][name] for p in parts]) for name in parts[0][0]}
    out = {f"{block_prefix}experts.{name}": tensor.contiguous() for name, tensor in tensors.items()}
    router_key = f"{block_prefix}gate.weight"
    if router is None:
        router = parts[0][1]  # split inits: the groups' mean input weights (one source only)
    if router is None:
        router = torch.randn(target_keys[router_key].shape, generator=gen) * config.initializer_range
    out[router_key] = router.to(ffns[0][2].dtype).contiguous()
    return out
