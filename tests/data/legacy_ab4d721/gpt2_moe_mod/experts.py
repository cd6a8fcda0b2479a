"""Expert weights stored as 3-D parameters, and the named implementations of their compute.

The layout follows `transformers.integrations.moe` (the one Mixtral, Qwen-MoE and gpt-oss use):
`gate_up_proj` (E, 2I, H) holds [gate; up] for SwiGLU experts (Llama family), `up_proj` (E, I, H)
for plain experts (BERT, GPT-2), `down_proj` (E, H, I), with optional `*_bias` of shape (E, out).

Every implementation computes the same thing: rows of `x` (S, H) come sorted by expert, `counts`
(E,) says how many rows each expert owns, and expert e applies its FFN to its rows. Nothing is
padded to a capacity and no row is computed twice.

- `eager`: a Python loop over experts; the reference the others are tested against.
- `grouped`: one `torch.nn.functional.grouped_mm` per projection (CPU and CUDA), the default;
  the loop where this torch has no working `grouped_mm` (compat.py).
- `megablocks`: MegaBlocks' grouped GEMM (CUDA only; `pip install megablocks`, see README).
"""

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers.activations import ACT2FN

from .compat import COMPILABLE_GROUPED_MM, grouped_mm, grouped_mm_available

try:  # optional GPU kernels; the modeling code must load without them
    from megablocks import grouped_gemm_util as _megablocks_gg
except ImportError:  # pragma: no cover - depends on the machine
    _megablocks_gg = None


class Experts(nn.Module):
    """E feed-forward networks with stacked weights."""

    def __init__(self, num_experts, hidden_size, intermediate_size, hidden_act, gated, bias, implementation):
        super().__init__()
        self.num_experts = num_experts
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.gated = gated
        self.has_bias = bias
        self.implementation = implementation
        self.act_fn = ACT2FN[hidden_act]
        up_rows = 2 * intermediate_size if gated else intermediate_size
        up_name = "gate_up_proj" if gated else "up_proj"
        setattr(self, up_name, nn.Parameter(torch.empty(num_experts, up_rows, hidden_size)))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        if bias:
            setattr(self, f"{up_name}_bias", nn.Parameter(torch.zeros(num_experts, up_rows)))
            self.down_proj_bias = nn.Parameter(torch.zeros(num_experts, hidden_size))
        self.up_name = up_name

    @property
    def up_weight(self):
        return getattr(self, self.up_name)

    @property
    def up_bias(self):
        return getattr(self, f"{self.up_name}_bias") if self.has_bias else None

    @property
    def down_bias(self):
        return self.down_proj_bias if self.has_bias else None

    def activation(self, h: torch.Tensor) -> torch.Tensor:
        if self.gated:
            gate, up = h.chunk(2, dim=-1)
            return self.act_fn(gate) * up
        return self.act_fn(h)

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x: (S, H) rows sorted by expert; counts: (E,) rows per expert. Returns (S, H)."""
        return get_experts_implementation(self.implementation)(self, x, counts)


def eager_experts_forward(experts: Experts, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Reference: one pair of linear layers per expert, over that expert's rows."""
    out = x.new_empty(x.shape[0], experts.hidden_size)
    up_b, down_b = experts.up_bias, experts.down_bias
    start = 0
    for e, n in enumerate(counts.tolist()):
        if n == 0:
            continue
        rows = slice(start, start + n)
        h = F.linear(x[rows], experts.up_weight[e], None if up_b is None else up_b[e])  # (n, I or 2I)
        h = experts.activation(h)  # (n, I)
        out[rows] = F.linear(h, experts.down_proj[e], None if down_b is None else down_b[e])  # (n, H)
        start += n
    return out


def _bias_rows(bias: torch.Tensor, counts: torch.Tensor, num_rows: int) -> torch.Tensor:
    """Each expert's bias (E, out) repeated over its rows: (S, out), rows sorted by expert."""
    return torch.repeat_interleave(bias, counts, dim=0, output_size=num_rows)


def _grouped_mlp(x, up_w, up_b, down_w, down_b, offsets, counts, activation):
    """The expert FFN's forward: (output (S, H), pre-activation (S, I or 2I)).

    x (S, H) sorted by expert; up_w (E, I or 2I, H); down_w (E, H, I); biases (E, out) or None."""
    h = grouped_mm(x, up_w.transpose(-2, -1), offsets)  # (S, I or 2I)
    if up_b is not None:
        h += _bias_rows(up_b, counts, x.shape[0])
    out = grouped_mm(activation(h), down_w.transpose(-2, -1), offsets)  # (S, H)
    if down_b is not None:
        out += _bias_rows(down_b, counts, x.shape[0])
    return out, h


class _GroupedExpertMLP(torch.autograd.Function):
    """y_e = act(x_e U_e^T + b_e) D_e^T + c_e for the rows x_e of each expert e: two grouped GEMMs
    and their backward, written out by hand.

    - Memory: only the input rows and the pre-activation are kept for the backward; the activation
      is recomputed there (as MegaBlocks' memory-optimised MLP does). Autograd would also keep the
      activated (S, I) rows, and for SwiGLU experts the (S, I) SiLU output too.
    - The weight gradients come straight out in the stored (E, out, in) layout (dW_e = dY_e^T X_e,
      one 2-D x 2-D grouped GEMM; empty experts get zeros) and each bias gradient is one segmented
      sum over the expert groups. On the CPU autograd's `grouped_mm` derivative transposes and
      copies the weight gradient and rejects stride-0 gradients, and the per-row bias would be a
      gathered (S, out) tensor kept for the backward.
    """

    @staticmethod
    def forward(ctx, x, up_w, up_b, down_w, down_b, offsets, counts, activation):
        out, h = _grouped_mlp(x, up_w, up_b, down_w, down_b, offsets, counts, activation)
        ctx.save_for_backward(x, h, up_w, down_w, offsets, counts)
        ctx.activation = activation
        ctx.has_bias = (up_b is not None, down_b is not None)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, h, up_w, down_w, offsets, counts = ctx.saved_tensors
        need_x, need_up_w, need_up_b, need_down_w, need_down_b = ctx.needs_input_grad[:5]
        grad = grad.contiguous()  # (S, H); `.sum()` hands in a stride-0 gradient
        # recompute the activation (S, I); torch.func.vjp, as a compiled graph traces it (not autograd.grad)
        a, activation_vjp = torch.func.vjp(ctx.activation, h)
        grad_x = grad_up_w = grad_up_b = grad_down_w = grad_down_b = None
        if need_down_w:
            grad_down_w = grouped_mm(grad.t(), a, offsets)  # (E, H, I)
        if need_down_b and ctx.has_bias[1]:
            grad_down_b = torch.segment_reduce(grad, "sum", lengths=counts)  # (E, H)
        grad_a = grouped_mm(grad, down_w, offsets)  # (S, I)
        (grad_h,) = activation_vjp(grad_a)  # (S, I or 2I)
        del a, grad_a
        if need_up_w:
            grad_up_w = grouped_mm(grad_h.t(), x, offsets)  # (E, I or 2I, H)
        if need_up_b and ctx.has_bias[0]:
            grad_up_b = torch.segment_reduce(grad_h, "sum", lengths=counts)  # (E, I or 2I)
        if need_x:
            grad_x = grouped_mm(grad_h, up_w, offsets)  # (S, H)
        return grad_x, grad_up_w, grad_up_b, grad_down_w, grad_down_b, None, None, None


def _grouped_mm_aligned(experts: Experts, x: torch.Tensor) -> bool:
    """`grouped_mm` needs every row stride to be a multiple of 16 bytes."""
    per_16_bytes = max(1, 16 // x.element_size())
    widths = (experts.hidden_size, experts.intermediate_size, experts.up_weight.shape[1])
    return all(w % per_16_bytes == 0 for w in widths)


def grouped_experts_forward(experts: Experts, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Two grouped matrix multiplies over all experts at once (no per-expert Python loop).

    Widths that break `grouped_mm`'s 16-byte alignment (toy sizes such as 5), and torch builds
    without a working `grouped_mm` for this device and dtype (compat.py), use the reference loop.
    """
    if x.shape[0] == 0:
        return x.new_zeros(0, experts.hidden_size)
    if torch.compiler.is_compiling():  # no probe inside a traced graph
        available = COMPILABLE_GROUPED_MM is not None
    else:
        available = grouped_mm_available(x.device, x.dtype)
    if not _grouped_mm_aligned(experts, x) or not available:
        return eager_experts_forward(experts, x, counts)
    offsets = counts.cumsum(0).to(torch.int32)  # (E,)
    if not torch.is_grad_enabled():  # inference and decoding: no autograd node to build
        return _grouped_mlp(x, experts.up_weight, experts.up_bias, experts.down_proj, experts.down_bias, offsets,
                            counts, experts.activation)[0]
    return _GroupedExpertMLP.apply(x, experts.up_weight, experts.up_bias, experts.down_proj, experts.down_bias,
                                   offsets, counts, experts.activation)  # (S, H)


def megablocks_experts_forward(experts: Experts, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """MegaBlocks' grouped GEMM (CUTLASS) for the two projections; biases added per row."""
    if _megablocks_gg is None or not _megablocks_gg.grouped_gemm_is_available():
        raise ImportError(
            "`moe_implementation='megablocks'` needs the `megablocks` package with its grouped GEMM "
            "(CUDA only; see the README's GPU section). Use `moe_implementation='grouped'` otherwise."
        )
    if not x.is_cuda:
        raise ValueError("`moe_implementation='megablocks'` runs on CUDA tensors only; move the model to a GPU.")
    if x.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(
            f"`moe_implementation='megablocks'` needs bf16 or fp16 weights, got {x.dtype}: "
            "call `model.to(torch.bfloat16)` or use `moe_implementation='grouped'` for fp32."
        )
    batch_sizes = counts.to("cpu", torch.int64)  # the kernel takes group sizes on the host
    h = _megablocks_gg.ops.gmm(x, experts.up_weight, batch_sizes, trans_b=True)  # (S, I or 2I)
    if experts.has_bias:
        h = h + _bias_rows(experts.up_bias, counts, x.shape[0])
    h = experts.activation(h)
    out = _megablocks_gg.ops.gmm(h, experts.down_proj, batch_sizes, trans_b=True)  # (S, H)
    if experts.has_bias:
        out = out + _bias_rows(experts.down_bias, counts, x.shape[0])
    return out


EXPERTS_IMPLEMENTATIONS = {
    "eager": eager_experts_forward,
    "grouped": grouped_experts_forward,
    "megablocks": megablocks_experts_forward,
}


def get_experts_implementation(name: str):
    try:
        return EXPERTS_IMPLEMENTATIONS[name]
    except KeyError:
        raise ValueError(
            f"`moe_implementation` must be one of {sorted(EXPERTS_IMPLEMENTATIONS)}, got {name!r}."
        ) from None
