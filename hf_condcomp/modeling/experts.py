"""Expert weights stored as 3-D parameters, and the named implementations of their compute.

The layout follows `transformers.integrations.moe` (the one Mixtral, Qwen-MoE and gpt-oss use):
`gate_up_proj` (E, 2I, H) holds [gate; up] for SwiGLU experts (Llama family), `up_proj` (E, I, H)
for plain experts (BERT, GPT-2), `down_proj` (E, H, I), with optional `*_bias` of shape (E, out).

`Experts` is called as transformers' experts modules are (Mixtral, Qwen-MoE, and vLLM's
Transformers backend calls them so): `experts(hidden_states (N, H), top_k_index (N, k),
top_k_weights (N, k)) -> (N, H)`, each token's weighted sum over its k experts. It carries the
attributes transformers' experts functions read (`has_gate`, `has_bias`, `is_transposed`,
`act_fn`, `_apply_gate`, `num_experts`, `_is_expert_parallel`, `has_post_expert_norm`), so any
function of `transformers.integrations.moe.ALL_EXPERTS_FUNCTIONS` runs on it.

One registry, `EXPERTS_FUNCTIONS`, names every implementation: ours, registered here, and then
whatever transformers' `ALL_EXPERTS_FUNCTIONS` holds on the installed release (`grouped_mm`,
`batched_mm`, ...). Ours work on rows sorted by expert (`counts` (E,) rows per expert; nothing
padded to a capacity, no row computed twice), and their top-k entry point sorts, runs that, and
combines with our own autograd Functions:

- `eager`: a Python loop over experts; the reference the others are tested against.
- `grouped`: one `torch.nn.functional.grouped_mm` per projection (CPU and CUDA), the default;
  the loop where this torch has no working `grouped_mm` (compat.py); a single token without
  gradients on the CPU (batch-1 decoding) runs its k experts directly (`_one_token_forward`).
- `megablocks`: MegaBlocks' grouped GEMM (CUDA only; `pip install megablocks`, see docs/speed.md),
  registered only where the package imports.

Rows that cannot be written as a dense (N, k) top-k (capacity limits, expert choice) go through
`Experts.forward_sorted`; a transformers function runs them as a top-1 call with unit weights.

torch's `grouped_mm` needs every row stride to be a multiple of 16 bytes, and transformers'
`grouped_mm` passes it the experts' weights and activations as they are (its own check looks at
data pointers only), so widths such as the transformers testers' intermediate size 37 fail there,
for Mixtral's experts as for ours (torch 2.13, CPU). At such widths the function runs
on a zero-padded copy of the experts (`_PaddedExperts`), which gives the same outputs and gradients.

This file travels to the Hub with every saved model: only sibling relative imports.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers.activations import ACT2FN
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS as TRANSFORMERS_EXPERTS_FUNCTIONS

from .compat import COMPILABLE_GROUPED_MM, grouped_mm, grouped_mm_available

try:  # optional GPU kernels; the modeling code must load without them
    from megablocks import grouped_gemm_util as _megablocks_gg
except ImportError:  # pragma: no cover - depends on the machine
    _megablocks_gg = None


class Experts(nn.Module):
    """E feed-forward networks with stacked weights, called with the experts-interface signature.

    The implementation is `config._experts_implementation` where transformers set it
    (`from_pretrained(..., experts_implementation="grouped_mm")`, `set_experts_implementation`),
    else `implementation` (our `moe_implementation` field)."""

    def __init__(self, num_experts, hidden_size, intermediate_size, hidden_act, gated, bias, implementation,
                 config=None):
        super().__init__()
        self.num_experts = num_experts
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.gated = gated
        self.has_bias = bias
        self.implementation = implementation
        self.config = config
        self.act_fn = ACT2FN[hidden_act]
        # what transformers' experts functions read (`use_experts_implementation` sets the same)
        self.has_gate = gated
        self.is_transposed = False
        self.is_concatenated = True
        self.has_post_expert_norm = False
        self._is_expert_parallel = False
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

    @property
    def experts_implementation(self) -> str:
        requested = getattr(self.config, "_experts_implementation", None) if self.config is not None else None
        return requested or self.implementation

    def _apply_gate(self, gate_up_out: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up_out.chunk(2, dim=-1)
        return self.act_fn(gate) * up

    def activation(self, h: torch.Tensor) -> torch.Tensor:
        return self._apply_gate(h) if self.gated else self.act_fn(h)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        """hidden_states (N, H), top_k_index (N, k) long, top_k_weights (N, k). Returns (N, H):
        sum_c top_k_weights[n, c] * expert_{top_k_index[n, c]}(hidden_states[n])."""
        return EXPERTS_FUNCTIONS.get_interface(self.experts_implementation)(
            self, hidden_states, top_k_index, top_k_weights)

    def forward_sorted(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x: (S, H) rows sorted by expert; counts: (E,) rows per expert. Returns (S, H), unweighted."""
        return EXPERTS_FUNCTIONS.get_sorted(self.experts_implementation)(self, x, counts)


def _expert_ffn(experts: Experts, x: torch.Tensor, e: int) -> torch.Tensor:
    """Expert e's FFN on rows x (n, H), as a pair of linear layers on views of the stacked weights: (n, H)."""
    up_b, down_b = experts.up_bias, experts.down_bias
    h = F.linear(x, experts.up_weight[e], None if up_b is None else up_b[e])  # (n, I or 2I)
    return F.linear(experts.activation(h), experts.down_proj[e], None if down_b is None else down_b[e])  # (n, H)


def eager_experts_forward(experts: Experts, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Reference: one pair of linear layers per expert, over that expert's rows."""
    out = x.new_empty(x.shape[0], experts.hidden_size)
    start = 0
    for e, n in enumerate(counts.tolist()):
        if n == 0:
            continue
        rows = slice(start, start + n)
        out[rows] = _expert_ffn(experts, x[rows], e)
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
            grad_down_b = _sum_per_expert(grad, counts)  # (E, H)
        grad_a = grouped_mm(grad, down_w, offsets)  # (S, I)
        (grad_h,) = activation_vjp(grad_a)  # (S, I or 2I)
        del a, grad_a
        if need_up_w:
            grad_up_w = grouped_mm(grad_h.t(), x, offsets)  # (E, I or 2I, H)
        if need_up_b and ctx.has_bias[0]:
            grad_up_b = _sum_per_expert(grad_h, counts)  # (E, I or 2I)
        if need_x:
            grad_x = grouped_mm(grad_h, up_w, offsets)  # (S, H)
        return grad_x, grad_up_w, grad_up_b, grad_down_w, grad_down_b, None, None, None


def _sum_per_expert(rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Sum of the rows sorted by expert, per expert: (S, D) -> (E, D). `index_add_` rather than
    `torch.segment_reduce`, which is several times slower on the CPU."""
    ids = torch.repeat_interleave(torch.arange(counts.numel(), device=rows.device), counts, output_size=rows.shape[0])
    return rows.new_zeros(counts.numel(), rows.shape[1]).index_add_(0, ids, rows)


def _per_16_bytes(x: torch.Tensor) -> int:
    """Elements of x's dtype in 16 bytes, the row-stride multiple `grouped_mm` needs."""
    return max(1, 16 // x.element_size())


def _grouped_mm_aligned(experts: Experts, x: torch.Tensor) -> bool:
    """`grouped_mm` needs every row stride to be a multiple of 16 bytes."""
    widths = (experts.hidden_size, experts.intermediate_size, experts.up_weight.shape[1])
    return all(w % _per_16_bytes(x) == 0 for w in widths)


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
            "(CUDA only; see the GPU section of docs/speed.md). Use `moe_implementation='grouped'` otherwise."
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


class _PermuteRows(torch.autograd.Function):
    """out = x[index] where `index` is a permutation; its backward is the inverse gather.

    Autograd's derivative of `x[index]` is a scatter-add (`index_put_` with accumulation), which on
    the CPU is much slower than a gather; a permutation needs no accumulation.
    """

    @staticmethod
    def forward(ctx, x, index):
        inverse = torch.empty_like(index).scatter_(0, index, torch.arange(index.numel(), device=index.device))
        ctx.save_for_backward(inverse)
        return x.index_select(0, index)

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None


class _DispatchRows(torch.autograd.Function):
    """x_sorted = x[token_index] when every token owns exactly k rows; the backward sums each
    token's k row gradients through `inverse` (a gather and a reshape-sum) instead of a scatter-add."""

    @staticmethod
    def forward(ctx, x, token_index, inverse):
        ctx.save_for_backward(inverse)
        return x.index_select(0, token_index)  # (S, H)

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        num_tokens, top_k = inverse.shape
        grad_tok = grad.index_select(0, inverse.reshape(-1)).view(num_tokens, top_k, -1)  # (N, k, H)
        return grad_tok.sum(1), None, None


def combine_topk(y: torch.Tensor, top_k_weights: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """Sum each token's k expert outputs with its weights: gathers and one batched GEMM, no scatter.

    y (S, H) sorted by expert, top_k_weights (N, k), inverse (N, k): sorted row of token n's c-th choice.
    """
    num_tokens, top_k = inverse.shape
    flat = inverse.reshape(-1)  # (N * k,) token-major
    y_tok = _PermuteRows.apply(y, flat) if torch.is_grad_enabled() else y.index_select(0, flat)
    if top_k == 1:  # one weight per row: a multiply (a batched GEMM of 1 x 1 matrices is ~5x slower on the CPU)
        return y_tok * top_k_weights.reshape(num_tokens, 1).to(y.dtype)  # (N, H)
    y_tok = y_tok.view(num_tokens, top_k, -1)  # (N, k, H)
    w_tok = top_k_weights.reshape(num_tokens, 1, top_k).to(y.dtype)  # (N, 1, k)
    return torch.bmm(w_tok, y_tok).squeeze(1)  # (N, H)


def combine_dropless(y: torch.Tensor, weights: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """`combine_topk` with the weights (S,) sorted by expert, as a routing `Dispatch` holds them."""
    return combine_topk(y, weights[inverse], inverse)


def sort_by_expert(top_k_index: torch.Tensor, num_experts: int):
    """(token_index (S,), counts (E,), inverse (N, k)) of top-k choices (N, k): the S = N * k rows
    sorted by expert (stable: within an expert, in token order), each row's token, the rows per
    expert, and the sorted row of token n's c-th choice."""
    num_tokens, top_k = top_k_index.shape
    expert_ids = top_k_index.reshape(-1)  # (N * k,) token-major: choice c of token n is n * k + c
    order = torch.argsort(expert_ids, stable=True)
    # (E,) whatever the ids: bincount's length depends on the largest id, which a traced graph can't know
    counts = torch.zeros(num_experts, dtype=torch.long, device=top_k_index.device)
    counts = counts.index_add_(0, expert_ids, torch.ones_like(expert_ids))
    inverse = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
    token_index = torch.div(order, top_k, rounding_mode="floor")
    return token_index, counts, inverse.view(num_tokens, top_k)


def _one_token_forward(experts, x, top_k_index, top_k_weights):
    """One token without gradients on the CPU (batch-1 decoding): its k experts one after another
    (`_expert_ffn`, the eager reference's products), combined by the grouped path's batched GEMM,
    without sorting, offsets or a pass over the unchosen experts' empty groups, which at one token
    cost about a tenth of the experts' time."""
    y = torch.cat([_expert_ffn(experts, x, e) for e in top_k_index[0].tolist()]).unsqueeze(0)  # (1, k, H)
    return torch.bmm(top_k_weights.reshape(1, 1, -1).to(y.dtype), y).squeeze(1)  # (1, H)


def _topk_from_sorted(sorted_forward: Callable, one_token: bool = False) -> Callable:
    """The experts-interface entry point of an implementation over sorted rows: sort the (token,
    expert) pairs (`_DispatchRows`: the backward is a gather and a sum), run the experts, combine
    (`combine_topk`: gathers and a batched GEMM). With `one_token`, a single token without gradients
    on the CPU takes `_one_token_forward`."""

    def experts_forward(experts, hidden_states, top_k_index, top_k_weights):
        # Under transformers' expert parallelism a rank holds `num_experts` of the experts, and its
        # all-reduce dispatch marks a route to another rank's expert with id `num_experts` (weight 0):
        # one more group, sorted last and not computed.
        skipped = int(experts._is_expert_parallel)
        if (one_token and not skipped and hidden_states.shape[0] == 1 and hidden_states.device.type == "cpu"
                and not torch.is_grad_enabled() and not torch.compiler.is_compiling()):
            return _one_token_forward(experts, hidden_states, top_k_index, top_k_weights)
        token_index, counts, inverse = sort_by_expert(top_k_index, experts.num_experts + skipped)
        if torch.is_grad_enabled():
            x_sorted = _DispatchRows.apply(hidden_states, token_index, inverse)  # (S, H)
        else:
            x_sorted = hidden_states.index_select(0, token_index)
        if skipped:
            kept = x_sorted.shape[0] - int(counts[-1])
            y = F.pad(sorted_forward(experts, x_sorted[:kept], counts[:-1]), (0, 0, 0, x_sorted.shape[0] - kept))
        else:
            y = sorted_forward(experts, x_sorted, counts)  # (S, H)
        return combine_topk(y, top_k_weights, inverse)  # (N, H)

    experts_forward.__name__ = experts_forward.__qualname__ = sorted_forward.__name__.replace("_forward", "_topk")
    experts_forward.__doc__ = sorted_forward.__doc__
    return experts_forward


class _PaddedExperts:
    """The experts with hidden size H and intermediate size I zero-padded to multiples of `multiple`,
    carrying the attributes transformers' experts functions read. The padding adds nothing: padded
    input columns meet zero weight columns, and the padded hidden units (whatever their activation)
    meet zero down-projection columns. Built from the parameters at each call (`F.pad`), so the
    gradients reach them; only at widths that break `grouped_mm`'s alignment, which real models'
    sizes do not."""

    def __init__(self, experts: Experts, multiple: int):
        E, H, intermediate = experts.num_experts, experts.hidden_size, experts.intermediate_size
        self.hidden_size = -(-H // multiple) * multiple
        self.intermediate_size = -(-intermediate // multiple) * multiple
        dh, di = self.hidden_size - H, self.intermediate_size - intermediate
        halves = 2 if experts.gated else 1  # [gate; up] are padded apart, so that `chunk(2)` still splits them
        up = experts.up_weight.reshape(E, halves, intermediate, H)
        up = F.pad(up, (0, dh, 0, di)).view(E, halves * self.intermediate_size, self.hidden_size)
        setattr(self, experts.up_name, up)  # (E, I' or 2I', H')
        self.down_proj = F.pad(experts.down_proj, (0, di, 0, dh))  # (E, H', I')
        if experts.has_bias:
            up_bias = F.pad(experts.up_bias.reshape(E, halves, intermediate), (0, di)).view(E, -1)
            setattr(self, f"{experts.up_name}_bias", up_bias)  # (E, I' or 2I')
            self.down_proj_bias = F.pad(experts.down_bias, (0, dh))  # (E, H')
        for name in ("num_experts", "has_gate", "has_bias", "is_transposed", "is_concatenated",
                     "has_post_expert_norm", "_is_expert_parallel", "act_fn", "config"):
            setattr(self, name, getattr(experts, name))

    def _apply_gate(self, gate_up_out: torch.Tensor) -> torch.Tensor:
        return Experts._apply_gate(self, gate_up_out)


# transformers' experts functions that call torch's `grouped_mm` (16-byte row strides)
_STRIDE_ALIGNED = ("grouped_mm",)


def _transformers_forward(name: str) -> Callable:
    """transformers' experts function `name`, looked up at each call (a test may patch the mapping);
    those in `_STRIDE_ALIGNED` run on `_PaddedExperts` where the experts' widths are not aligned."""

    def forward(experts, hidden_states, top_k_index, top_k_weights):
        function = TRANSFORMERS_EXPERTS_FUNCTIONS[name]
        weights = experts.down_proj
        if name not in _STRIDE_ALIGNED or _grouped_mm_aligned(experts, weights):
            return function(experts, hidden_states, top_k_index, top_k_weights)
        padded = _PaddedExperts(experts, _per_16_bytes(weights))
        x = F.pad(hidden_states, (0, padded.hidden_size - experts.hidden_size))  # (N, H')
        return function(padded, x, top_k_index, top_k_weights)[:, :experts.hidden_size]  # (N, H)

    forward.__name__ = forward.__qualname__ = f"{name}_experts_forward"
    return forward


def _sorted_from_topk(topk_forward: Callable) -> Callable:
    """Rows sorted by expert through an experts-interface function: one top-1 call with weight 1."""

    def forward_sorted(experts, x, counts):
        ids = torch.arange(experts.num_experts, device=x.device)
        expert_ids = torch.repeat_interleave(ids, counts, output_size=x.shape[0]).unsqueeze(-1)  # (S, 1)
        return topk_forward(experts, x, expert_ids, x.new_ones(x.shape[0], 1))

    return forward_sorted


@dataclass(frozen=True)
class ExpertsImplementation:
    """forward(experts, hidden_states, top_k_index, top_k_weights) -> (N, H), the experts-interface
    call; forward_sorted(experts, x_sorted, counts) -> (S, H), the rows of capacity-limited and
    expert-choice routing."""

    forward: Callable
    forward_sorted: Callable


class ExpertsFunctions:
    """Every experts implementation by name: ours (`register`), then transformers'
    `ALL_EXPERTS_FUNCTIONS` of the installed release (`grouped_mm`, `batched_mm`, ...; read at
    each look-up, so one registered there later is found too). Ours win a name both hold (`eager`:
    transformers' is the module's own forward)."""

    def __init__(self):
        self._local: dict[str, ExpertsImplementation] = {}

    def register(self, name: str, forward_sorted: Callable, one_token: bool = False) -> None:
        """Register an implementation over rows sorted by expert; its top-k entry point is built
        (with the single-token CPU path where `one_token`)."""
        self._local[name] = ExpertsImplementation(_topk_from_sorted(forward_sorted, one_token), forward_sorted)

    def valid_keys(self) -> list[str]:
        theirs = [k for k in TRANSFORMERS_EXPERTS_FUNCTIONS.keys() if k not in self._local]
        return list(self._local) + sorted(theirs)

    def __contains__(self, name) -> bool:
        return name in self._local or name in TRANSFORMERS_EXPERTS_FUNCTIONS.keys()

    def __getitem__(self, name: str) -> ExpertsImplementation:
        if name in self._local:
            return self._local[name]
        if name in TRANSFORMERS_EXPERTS_FUNCTIONS.keys():
            forward = _transformers_forward(name)
            return ExpertsImplementation(forward, _sorted_from_topk(forward))
        raise ValueError(
            f"`moe_implementation` / `experts_implementation` must be one of {self.valid_keys()}, got {name!r}."
        )

    def get_interface(self, name: str) -> Callable:
        return self[name].forward

    def get_sorted(self, name: str) -> Callable:
        return self[name].forward_sorted


EXPERTS_FUNCTIONS = ExpertsFunctions()
EXPERTS_FUNCTIONS.register("eager", eager_experts_forward)
EXPERTS_FUNCTIONS.register("grouped", grouped_experts_forward, one_token=True)
# Registered whether or not the package imports, so a saved config naming it still loads without
# it; the call then says what to install.
EXPERTS_FUNCTIONS.register("megablocks", megablocks_experts_forward)


def get_experts_implementation(name: str) -> Callable:
    """The experts-interface function named `name` (ValueError listing the valid names otherwise)."""
    return EXPERTS_FUNCTIONS.get_interface(name)
