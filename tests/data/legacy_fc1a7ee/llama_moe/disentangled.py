"""DeBERTa's disentangled attention on a per-sequence subset of tokens (routed and gated layers).

DeBERTa-v2/v3 add to every attention score a relative-position bias (He et al. 2021, DeBERTa,
eq. 4: content-to-position and position-to-content terms), indexed by `relative_pos`, which the
encoder builds once for the whole batch: bucket(i - j), (1, T, T). A routed or gated layer runs
each sequence on its own kept positions, so the relative positions of its sub-batch differ per row:
`subset_relative_positions` gathers them from the encoder's table (so the buckets are transformers'),
and `per_row_bias`, installed on the attention module for that call only, computes the bias with a
(B, C, C) index, where transformers' `disentangled_attention_bias` takes one index for every row.
The rest of the layer (projections, softmax, mask, FFN) is transformers' own.

This file travels to the Hub with every saved model: only sibling relative imports.
"""

import contextlib
import functools

import torch


def disentangled_attention(layer):
    """The disentangled self-attention module of a DeBERTa-v2-type layer, or None."""
    attn = getattr(getattr(layer, "attention", None), "self", None)
    needed = ("disentangled_attention_bias", "transpose_for_scores", "pos_ebd_size", "pos_att_type")
    return attn if attn is not None and all(hasattr(attn, name) for name in needed) else None


def subset_relative_positions(relative_pos, index):
    """(B, C, C) relative positions among the kept tokens `index` (B, C), gathered from the whole
    sequence's table ((T, T), (1 or B, T, T) or (1 or B, 1, T, T))."""
    B, C = index.shape
    table = relative_pos.reshape(-1, *relative_pos.shape[-2:]).expand(B, -1, -1)  # (B, T, T)
    rows = table.gather(1, index.unsqueeze(-1).expand(B, C, table.shape[-1]))  # (B, C, T)
    return rows.gather(2, index.unsqueeze(1).expand(B, C, C))  # (B, C, C)


def per_row_bias(attn, query_layer, key_layer, relative_pos, rel_embeddings, scale_factor):
    """transformers' `DisentangledSelfAttention.disentangled_attention_bias` for a relative-position
    index per sequence: query_layer / key_layer (B * h, C, d), relative_pos (B, C, C); returns
    (B * h, C, C). The positional projections are computed once for the batch."""
    h = attn.num_attention_heads
    B = relative_pos.shape[0]
    _, C, d = query_layer.shape
    span = attn.pos_ebd_size
    rel = relative_pos.to(device=query_layer.device, dtype=torch.long).reshape(B, 1, C, C)
    rel_embeddings = rel_embeddings[: span * 2, :].unsqueeze(0)  # (1, 2S, H)

    def positional(proj):  # (1, h, 2S, d)
        return attn.transpose_for_scores(proj(rel_embeddings), h).unsqueeze(0)

    def scale(dim):  # as transformers' scaled_size_sqrt
        return torch.sqrt(torch.tensor(dim, dtype=torch.float) * scale_factor)

    q = query_layer.view(B, h, C, d)
    k = key_layer.view(B, h, C, d)
    score = 0
    if "c2p" in attn.pos_att_type:
        pos_key = positional(attn.key_proj if attn.share_att_key else attn.pos_key_proj)
        c2p = torch.matmul(q, pos_key.transpose(-1, -2))  # (B, h, C, 2S)
        index = torch.clamp(rel + span, 0, span * 2 - 1).expand(B, h, C, C)
        c2p = c2p.gather(-1, index)  # (B, h, C, C)
        score = score + c2p / scale(pos_key.size(-1)).to(dtype=c2p.dtype)
    if "p2c" in attn.pos_att_type:
        pos_query = positional(attn.query_proj if attn.share_att_key else attn.pos_query_proj)
        p2c = torch.matmul(k, pos_query.transpose(-1, -2))  # (B, h, C, 2S)
        index = torch.clamp(-rel + span, 0, span * 2 - 1).expand(B, h, C, C)
        p2c = p2c.gather(-1, index).transpose(-1, -2)  # (B, h, C, C)
        score = score + p2c / scale(pos_query.size(-1)).to(dtype=p2c.dtype)
    return score.reshape(B * h, C, C) if torch.is_tensor(score) else score


@contextlib.contextmanager
def per_row_positions(attn):
    """Within the block, `attn` computes its relative-position bias with `per_row_bias`."""
    attn.disentangled_attention_bias = functools.partial(per_row_bias, attn)
    try:
        yield
    finally:
        del attn.disentangled_attention_bias
