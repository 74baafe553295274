"""
Attention kernels shared by the models.

Two public functions, each a Triton kernel on CUDA and a dense PyTorch twin everywhere else that computes the
same function (`backend=` forces either; `last_backend` / `last_lsh_backend` say which one ran):
- `attention(q, k, v, ...)`: softmax attention under three masks at once: the causal mask, an optional sliding
  window, and an optional block layout (a boolean [H or 1, T/block, S/block] tensor saying which query-block x
  key-block tiles are computed). The kernel is block-sparse flash attention (forward, dQ and dK/dV kernels,
  online softmax, fp32 accumulation; fp32 inputs multiply in TF32 on the GPU, exactly in the interpreter).
  `backend_info(device)` says which backend a device gets.
- `lsh_attention(q, k, v, buckets, chunk, ...)`: the Reformer's LSH attention over hash rounds, the paper's
  chunked windows or an exactly causal variant (see its section).

Conventions used throughout the repository:
- q: (B, H, T, D), k and v: (B, H, S, D) with S >= T.
- causal masks are aligned bottom-right: query i sits at absolute position S - T + i and sees keys
  0 .. S - T + i. With T == S this is the usual causal mask; with T < S it is Perceiver AR's cross-attention.
- window w: query position p sees key j only when j > p - w (the last w positions, itself included).
- layout[h, m, n] allows query rows m*block .. (m+1)*block-1 (row index, not position) to see key columns
  n*block .. (n+1)*block-1. A layout needs S - T to be a multiple of block, so its diagonal is the causal one.
- a query that sees no key at all gets a zero output (and passes no gradient), never NaN.

`python bench.py` measures the kernels against FlexAttention, dense SDPA and the LSH twin (stages kernels, lsh).
"""
from __future__ import annotations  # the kernels' `tl.constexpr` annotations stay strings without triton

import math
import os

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # then everything runs on the dense path
    triton = None

last_backend = None  # "triton" or "dense": which path the most recent attention() call used
TRITON_BLOCKS = (16, 32, 64, 128)  # layout blocks and head dims the Triton kernel takes (64/128 are fast)
TRITON_HEAD_DIMS = (16, 32, 64, 128)


def backend_info(device):
    """One line saying which attention backend `device` gets, for train.py to print at start."""
    if triton is None:
        return "attention backend: dense PyTorch fallback (triton not installed)"
    if torch.device(device).type != "cuda":
        return "attention backend: dense PyTorch fallback (no CUDA device)"
    return f"attention backend: triton {triton.__version__} (CUDA)"


# ----------------------------------------------------------------------------------------------------------------
# The dense fallback: the definition every kernel is tested against

def layout_to_mask(layout, block, T, S):
    """Expand a block layout [H or 1, T/block, S/block] to an element mask [H or 1, T, S]."""
    return layout.repeat_interleave(block, dim=1).repeat_interleave(block, dim=2)[:, :T, :S]


def causal_mask(T, S, device):
    """Bottom-right aligned causal mask [T, S]: query i (absolute position S - T + i) sees keys <= it."""
    q_pos = torch.arange(S - T, S, device=device)[:, None]
    return torch.arange(S, device=device)[None, :] <= q_pos


def attention_mask(T, S, causal=True, layout=None, block=64, window=None, device=None):
    """Element mask [H or 1, T, S] (True = may attend) of causal & window & layout, or None for no mask."""
    q_pos = torch.arange(S - T, S, device=device)[:, None]
    k_pos = torch.arange(S, device=device)[None, :]
    mask = causal_mask(T, S, device) if causal else None
    if window is not None:
        mask = (k_pos > q_pos - window) if mask is None else mask & (k_pos > q_pos - window)
    if layout is not None:
        block_mask = layout_to_mask(layout.to(device=device, dtype=torch.bool), block, T, S)
        mask = block_mask if mask is None else block_mask & mask
    return mask if mask is None or mask.dim() == 3 else mask[None]


def dense_attention(q, k, v, causal=True, layout=None, block=64, window=None, scale=None):
    """softmax(q k^T * scale, masked) v by F.scaled_dot_product_attention; rows with no visible key give 0."""
    mask = attention_mask(q.size(-2), k.size(-2), causal, layout, block, window, q.device)
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    empty = ~mask.any(-1, keepdim=True)  # (H or 1, T, 1)
    # open empty rows to every key so SDPA stays finite, then zero them: their gradient is then zero too
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=(mask | empty)[None], scale=scale)
    return out.masked_fill(empty[None], 0.0)


# ----------------------------------------------------------------------------------------------------------------
# Block-sparse flash attention in Triton
#
# A layout becomes two lists in CSR form: for each (layout head, query block) the key blocks to visit, and for
# each (layout head, key block) the query blocks, with blocks that lie wholly outside the causal mask or the
# window dropped. Inside the kernels the causal mask and the window are one band of visible keys,
#     p - window < j <= p + future        (p: the query's absolute position),
# with future = 0 for causal attention (S otherwise) and window = S + 1 when there is none. Only tiles the
# band's edge cuts get a per-element mask; all others are computed whole. Scores live in log2 units
# (scale * log2(e) is folded into one multiplier) so the kernels use exp2, and the forward saves the
# log-sum-exp per query row (log2 units) for the backward. Masked scores are -inf and the running max starts
# finite, so a row that sees no key gets probabilities 2^(-inf) = 0, never NaN, forward and backward.

_index_cache = {}  # (layout content, shapes, band) -> CSR lists on the device; see block_lists
LOG2E = math.log2(math.e)  # 2^(x * LOG2E) = e^x


def block_lists(layout, block, T, S, future, window, device):
    """CSR index lists of the tiles to compute: (row_ptr, cols, col_ptr, rows), int32 on `device`.
    Query block m of layout head h visits key blocks cols[row_ptr[h*T/block + m] : row_ptr[h*T/block + m + 1]];
    key block n is visited by query blocks rows[col_ptr[h*S/block + n] : col_ptr[h*S/block + n + 1]].
    Cached on the layout's content (not identity: models rebuild their layouts every call), shapes and band."""
    content = None if layout is None else (tuple(layout.shape), layout.to("cpu", torch.bool).numpy().tobytes())
    key = (content, block, T, S, future, window, str(device))
    if key not in _index_cache:
        if layout is None:
            layout = torch.ones(1, T // block, S // block, dtype=torch.bool)
        q_first = S - T + torch.arange(T // block)[:, None] * block  # first query position of each block
        k_first = torch.arange(S // block)[None, :] * block
        visible = layout.to("cpu", torch.bool) & (k_first <= q_first + block - 1 + future) \
            & (k_first + block - 1 > q_first - window)  # (H or 1, T/block, S/block)

        def csr(v):  # (H', R, C) bool -> row pointers over the H'*R rows, column indices
            ptr = F.pad(v.sum(-1).flatten().cumsum(0), (1, 0))
            return ptr.to(device, torch.int32), v.nonzero()[:, 2].to(device, torch.int32)

        if len(_index_cache) >= 64:  # a handful of layouts per model; keep memory bounded all the same
            _index_cache.pop(next(iter(_index_cache)))
        _index_cache[key] = (*csr(visible), *csr(visible.transpose(1, 2)))
    return _index_cache[key]


if triton is not None:
    jit = triton.jit
else:  # the kernels are then never launched; defining them as plain functions keeps the module importable
    def jit(fn=None, **options):
        return fn if fn is not None else (lambda fn: fn)


@jit
def _band(q_pos, k_pos, future, window):
    """Element mask of the band, broadcast over q_pos and k_pos (absolute positions)."""
    return (k_pos <= q_pos + future) & (k_pos > q_pos - window)


@jit
def _cut(q_lo, q_hi, k_lo, k_hi, future, window):
    """Whether the band's edge crosses the tile [q_lo, q_hi] x [k_lo, k_hi]: only then is a mask needed."""
    return (k_hi > q_lo + future) | (k_lo <= q_hi - window)


# Forward. One program computes the output rows of one query block (BLOCK rows) of one (batch, head):
# grid (T / BLOCK, B * H). q, the running max m, the running sum l and the output accumulator stay in SRAM
# while the program walks its list of key blocks in sub-tiles of BLOCK_N keys. Per sub-tile, with s the
# scores in log2 units:
#     m' = max(m, rowmax(s))
#     l' = l * 2^(m - m') + rowsum(2^(s - m'))
#     acc' = acc * 2^(m - m') + 2^(s - m') v            and at the end: out = acc / l, lse = m + log2(l)
@jit
def _fwd_kernel(Q, K, V, O, LSE, row_ptr, cols, qk_scale, H, T, S, layout_heads, future, window,
                BLOCK: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr):
    qb, bh = tl.program_id(0), tl.program_id(1)
    Q += bh.to(tl.int64) * T * D
    O += bh.to(tl.int64) * T * D
    K += bh.to(tl.int64) * S * D
    V += bh.to(tl.int64) * S * D
    LSE += bh.to(tl.int64) * T
    offs_m = qb * BLOCK + tl.arange(0, BLOCK)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    q = tl.load(Q + offs_m[:, None] * D + offs_d[None, :])
    q_lo = S - T + qb * BLOCK  # absolute position of the block's first query
    m_i = tl.full([BLOCK], -1.0e30, tl.float32)  # finite, so a fully masked tile gives 2^(-inf) = 0, not NaN
    l_i = tl.zeros([BLOCK], tl.float32)
    acc = tl.zeros([BLOCK, D], tl.float32)
    SPLIT = BLOCK // BLOCK_N
    row = (bh % H) % layout_heads * (T // BLOCK) + qb
    for it in range(tl.load(row_ptr + row) * SPLIT, tl.load(row_ptr + row + 1) * SPLIT):
        k_lo = tl.load(cols + it // SPLIT) * BLOCK + (it % SPLIT) * BLOCK_N
        kT = tl.load(K + (k_lo + offs_n)[None, :] * D + offs_d[:, None])  # (D, BLOCK_N)
        s = tl.dot(q, kT) * qk_scale
        if _cut(q_lo, q_lo + BLOCK - 1, k_lo, k_lo + BLOCK_N - 1, future, window):
            s = tl.where(_band(q_lo + tl.arange(0, BLOCK)[:, None], (k_lo + offs_n)[None, :], future, window),
                         s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + (k_lo + offs_n)[:, None] * D + offs_d[None, :])  # (BLOCK_N, D)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    l_i = tl.where(l_i == 0.0, 1.0, l_i)  # a row that saw no key has acc = 0: output 0, not 0/0
    tl.store(O + offs_m[:, None] * D + offs_d[None, :], (acc / l_i[:, None]).to(O.dtype.element_ty))
    tl.store(LSE + offs_m, m_i + tl.log2(l_i))


# Backward, dK and dV. One program computes the gradients of one key block (BLOCK keys) of one (batch, head):
# grid (S / BLOCK, B * H). k, v and the dk, dv accumulators stay in SRAM while the program walks the query
# blocks that visit it, in sub-tiles of BLOCK_M queries. With P recomputed from the saved lse and
# delta_i = sum_d out_id * dout_id:
#     P = 2^(s - lse)                      (the forward's softmax, exactly)
#     dv += P^T dout,   dP = dout v^T
#     dk += scale * (P * (dP - delta))^T q
@jit
def _bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, col_ptr, rows, qk_scale, scale, H, T, S, layout_heads,
                     future, window, BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, D: tl.constexpr):
    kb, bh = tl.program_id(0), tl.program_id(1)
    Q += bh.to(tl.int64) * T * D
    DO += bh.to(tl.int64) * T * D
    K += bh.to(tl.int64) * S * D
    V += bh.to(tl.int64) * S * D
    DK += bh.to(tl.int64) * S * D
    DV += bh.to(tl.int64) * S * D
    LSE += bh.to(tl.int64) * T
    DELTA += bh.to(tl.int64) * T
    offs_n = kb * BLOCK + tl.arange(0, BLOCK)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    k = tl.load(K + offs_n[:, None] * D + offs_d[None, :])
    v = tl.load(V + offs_n[:, None] * D + offs_d[None, :])
    dk = tl.zeros([BLOCK, D], tl.float32)
    dv = tl.zeros([BLOCK, D], tl.float32)
    SPLIT = BLOCK // BLOCK_M
    col = (bh % H) % layout_heads * (S // BLOCK) + kb
    for it in range(tl.load(col_ptr + col) * SPLIT, tl.load(col_ptr + col + 1) * SPLIT):
        m_lo = tl.load(rows + it // SPLIT) * BLOCK + (it % SPLIT) * BLOCK_M  # first query row of the sub-tile
        qT = tl.load(Q + (m_lo + offs_m)[None, :] * D + offs_d[:, None])  # (D, BLOCK_M)
        sT = tl.dot(k, qT) * qk_scale
        q_lo = S - T + m_lo
        if _cut(q_lo, q_lo + BLOCK_M - 1, kb * BLOCK, kb * BLOCK + BLOCK - 1, future, window):
            sT = tl.where(_band((q_lo + offs_m)[None, :], offs_n[:, None], future, window), sT, float("-inf"))
        pT = tl.exp2(sT - tl.load(LSE + m_lo + offs_m)[None, :])
        do = tl.load(DO + (m_lo + offs_m)[:, None] * D + offs_d[None, :])  # (BLOCK_M, D)
        dv += tl.dot(pT.to(do.dtype), do)
        dpT = tl.dot(v, tl.trans(do))
        dsT = pT * (dpT - tl.load(DELTA + m_lo + offs_m)[None, :])
        dk += tl.dot(dsT.to(qT.dtype), tl.trans(qT))
    tl.store(DK + offs_n[:, None] * D + offs_d[None, :], (dk * scale).to(DK.dtype.element_ty))
    tl.store(DV + offs_n[:, None] * D + offs_d[None, :], dv.to(DV.dtype.element_ty))


# Backward, dQ. One program computes dq for one query block (BLOCK rows) of one (batch, head): grid
# (T / BLOCK, B * H). q, dout, lse, delta and the dq accumulator stay in SRAM while the program walks the same
# key list as the forward, in sub-tiles of BLOCK_N keys:
#     P = 2^(s - lse)
#     dP = dout v^T
#     dq += scale * (P * (dP - delta)) k
@jit
def _bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, row_ptr, cols, qk_scale, scale, H, T, S, layout_heads,
                   future, window, BLOCK: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr):
    qb, bh = tl.program_id(0), tl.program_id(1)
    Q += bh.to(tl.int64) * T * D
    DO += bh.to(tl.int64) * T * D
    DQ += bh.to(tl.int64) * T * D
    K += bh.to(tl.int64) * S * D
    V += bh.to(tl.int64) * S * D
    LSE += bh.to(tl.int64) * T
    DELTA += bh.to(tl.int64) * T
    offs_m = qb * BLOCK + tl.arange(0, BLOCK)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    q = tl.load(Q + offs_m[:, None] * D + offs_d[None, :])
    do = tl.load(DO + offs_m[:, None] * D + offs_d[None, :])
    lse = tl.load(LSE + offs_m)
    delta = tl.load(DELTA + offs_m)
    q_lo = S - T + qb * BLOCK
    dq = tl.zeros([BLOCK, D], tl.float32)
    SPLIT = BLOCK // BLOCK_N
    row = (bh % H) % layout_heads * (T // BLOCK) + qb
    for it in range(tl.load(row_ptr + row) * SPLIT, tl.load(row_ptr + row + 1) * SPLIT):
        k_lo = tl.load(cols + it // SPLIT) * BLOCK + (it % SPLIT) * BLOCK_N
        kT = tl.load(K + (k_lo + offs_n)[None, :] * D + offs_d[:, None])  # (D, BLOCK_N)
        vT = tl.load(V + (k_lo + offs_n)[None, :] * D + offs_d[:, None])
        s = tl.dot(q, kT) * qk_scale
        if _cut(q_lo, q_lo + BLOCK - 1, k_lo, k_lo + BLOCK_N - 1, future, window):
            s = tl.where(_band(q_lo + tl.arange(0, BLOCK)[:, None], (k_lo + offs_n)[None, :], future, window),
                         s, float("-inf"))
        p = tl.exp2(s - lse[:, None])
        ds = p * (tl.dot(do, vT) - delta[:, None])
        dq += tl.dot(ds.to(kT.dtype), tl.trans(kT))
    tl.store(DQ + offs_m[:, None] * D + offs_d[None, :], (dq * scale).to(DQ.dtype.element_ty))


def launch_config(block, D, itemsize=2):
    """Inner tile sizes and launch parameters (chosen for H100s, checked to fit A100s; the interpreter ignores
    warps and stages). A program owns one layout block; the tiles it walks may be narrower (the list entry is
    split). Fewer pipeline stages for wide rows keep the buffers inside shared memory."""
    row_bytes = D * itemsize
    return dict(fwd_n=min(block, 64), bwd_inner=min(block, 32), fwd_warps=8 if block >= 128 else 4,
                bwd_warps=8 if block * D >= 128 * 64 else 4,
                stages=3 if row_bytes <= 128 else 2 if row_bytes <= 256 else 1)


class _BlockSparseAttention(torch.autograd.Function):
    """Launches the three kernels; q, k, v contiguous (B, H, T or S, D), lists from block_lists."""

    @staticmethod
    def forward(ctx, q, k, v, lists, block, future, window, scale):
        B, H, T, D = q.shape
        S = k.size(2)
        row_ptr, cols, col_ptr, rows = lists
        layout_heads = (row_ptr.numel() - 1) // (T // block)
        cfg = launch_config(block, D, q.element_size())
        o = torch.empty_like(q)
        lse = torch.empty(B, H, T, device=q.device, dtype=torch.float32)
        _fwd_kernel[(T // block, B * H)](
            q, k, v, o, lse, row_ptr, cols, scale * LOG2E, H, T, S, layout_heads, future, window,
            BLOCK=block, BLOCK_N=cfg["fwd_n"], D=D,
            num_warps=cfg["fwd_warps"], num_stages=cfg["stages"])
        ctx.save_for_backward(q, k, v, o, lse, row_ptr, cols, col_ptr, rows)
        ctx.args = (block, future, window, scale, layout_heads)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, row_ptr, cols, col_ptr, rows = ctx.saved_tensors
        block, future, window, scale, layout_heads = ctx.args
        B, H, T, D = q.shape
        S = k.size(2)
        cfg = launch_config(block, D, q.element_size())
        do = do.contiguous()
        delta = (o.float() * do.float()).sum(-1)  # (B, H, T)
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        common = dict(D=D, num_warps=cfg["bwd_warps"], num_stages=cfg["stages"])
        _bwd_dkdv_kernel[(S // block, B * H)](
            q, k, v, do, lse, delta, dk, dv, col_ptr, rows, scale * LOG2E, scale, H, T, S,
            layout_heads, future, window, BLOCK=block, BLOCK_M=cfg["bwd_inner"], **common)
        _bwd_dq_kernel[(T // block, B * H)](
            q, k, v, do, lse, delta, dq, row_ptr, cols, scale * LOG2E, scale, H, T, S,
            layout_heads, future, window, BLOCK=block, BLOCK_N=cfg["bwd_inner"], **common)
        return dq, dk, dv, None, None, None, None, None


# ----------------------------------------------------------------------------------------------------------------
# The public function

def _triton_unfit(q, k, v, block):
    """Why the Triton kernel cannot take these inputs (a sentence), or None when it can."""
    T, S, D = q.size(2), k.size(2), q.size(3)
    if triton is None:
        return "triton is not installed; use backend='dense' or install triton"
    if not q.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        return "the Triton kernel needs CUDA tensors (or TRITON_INTERPRET=1 for the CPU interpreter)"
    if block not in TRITON_BLOCKS:
        return f"the Triton kernel takes block sizes {TRITON_BLOCKS}, got {block}"
    if D not in TRITON_HEAD_DIMS:
        return f"the Triton kernel takes head dims {TRITON_HEAD_DIMS}, got {D}"
    if T % block or S % block:
        return (f"the Triton kernel needs T and S to be multiples of block={block}, got T={T}, S={S}; "
                f"pad the sequence or use backend='dense'")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32) or not q.dtype == k.dtype == v.dtype:
        return f"the Triton kernel needs q, k, v of one dtype, fp16/bf16/fp32; got {q.dtype}, {k.dtype}, {v.dtype}"
    return None


def attention(q, k, v, causal=True, layout=None, block=64, window=None, scale=None, backend=None):
    """Masked softmax attention; q (B, H, T, D), k/v (B, H, S, D) -> (B, H, T, D).

    causal: bottom-right aligned causal mask. layout: optional boolean [H or 1, T/block, S/block] tiles to
    compute (rounded up when T or S is not a multiple of block; the Triton kernel needs exact multiples).
    window: query position p sees keys j > p - window only. scale: defaults to 1/sqrt(D).
    backend: None picks Triton for CUDA tensors whose shapes the kernel takes (see TRITON_BLOCKS,
    TRITON_HEAD_DIMS) and the dense fallback otherwise; "triton" or "dense" forces one (ValueError if the
    kernel cannot take the inputs). `last_backend` records the choice."""
    global last_backend
    if q.dim() != 4 or k.shape != v.shape or k.shape[:2] != q.shape[:2] or k.size(3) != q.size(3):
        raise ValueError(f"attention needs q (B, H, T, D) and k, v (B, H, S, D); got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    (_, H, T, D), S = q.shape, k.size(2)
    if S < T:
        raise ValueError(f"attention needs at least as many keys as queries (S >= T), got T={T}, S={S}")
    if window is not None and window < 1:
        raise ValueError(f"window must be a positive number of positions (or None), got {window}")
    if layout is not None:
        shape = (-(-T // block), -(-S // block))
        if layout.dim() != 3 or layout.size(0) not in (1, H) or tuple(layout.shape[1:]) != shape:
            raise ValueError(f"layout must have shape (1 or H={H}, {shape[0]}, {shape[1]}) for T={T}, S={S}, "
                             f"block={block}; got {tuple(layout.shape)}")
        if (S - T) % block:
            raise ValueError(f"with a layout, S - T must be a multiple of block={block} so the layout's diagonal "
                             f"is the causal one; got T={T}, S={S}")
    if backend not in (None, "triton", "dense"):
        raise ValueError(f"unknown attention backend {backend!r}; choose 'triton', 'dense' or leave it unset")
    unfit = _triton_unfit(q, k, v, block)
    if backend == "triton" and unfit:
        raise ValueError(unfit)
    if backend == "dense" or unfit or (backend is None and not q.is_cuda):
        last_backend = "dense"
        return dense_attention(q, k, v, causal=causal, layout=layout, block=block, window=window, scale=scale)
    last_backend = "triton"
    future = 0 if causal else S  # the band p - window < j <= p + future of the kernels' section comment
    window = S + 1 if window is None else min(window, S + 1)
    lists = block_lists(layout, block, T, S, future, window, q.device)
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    return _BlockSparseAttention.apply(q, k, v, lists, block, future, window, scale)


# ---------------------------------------------------------------------------------------------------------------
# LSH attention (Reformer, Kitaev, Kaiser, Levskaya 2020, arXiv 2001.04451, section 3)
#
# Per hash round r every position carries a bucket id. Positions are sorted by (bucket, position) and the sorted
# sequence is cut into chunks of `chunk` rows. A query's keys in a round, two ways:
# - the paper's (default): the keys of its own chunk and of the previous chunk (the first chunk has no previous
#   one: unlike trax, rounds are not concatenated and there is no wrap-around) at an earlier or equal *original*
#   position. Where a chunk boundary falls depends on how many later positions sort before it, so a later token
#   can move an earlier output: not causal, in the paper and in trax alike.
# - causal=True: the `chunk` most recent keys of its own bucket up to itself, i.e. the keys of its bucket at sorted
#   indices s - chunk + 1 .. s for a query at sorted index s: a sliding window in sorted order. A position's
#   bucket depends on that position alone, so the window depends only on positions <= the query: exactly causal.
#   The window lies in the own and previous chunk, so the kernels below take it unchanged.
# Both are one test on a per-round integer `loc` of every position (sort_by_bucket): key j is in query i's window
# exactly when loc_i - span < loc_j <= loc_i. A query sees itself only when nothing else is left (its logit is
# SELF_LOGIT, finite). Each round gives an output o_r and the log-sum-exp lse_r of the logits of each query; the
# rounds combine as out = sum_r softmax_r(lse_r) * o_r. The dense twin below computes exactly that; the Triton
# kernels merge the rounds as they go and never store the per-round outputs.
# Two optional masks of the paper, both off in trax's final code and here by default:
# - same_bucket: a key in another bucket is masked even when it shares the chunk window (causal implies it);
# - dedup: a key seen in c of the rounds' windows gets its logit lowered by log(c), so that the combined
#   output is the softmax over the union of the windows, each key counted once.
# Keys are passed separately from queries (the Reformer's k is the unit-normalised q); autograd adds the two
# gradients when the caller computes k from q.
# ---------------------------------------------------------------------------------------------------------------

SELF_LOGIT = -5e4  # a query's logit on its own key: finite (the row may have no other key) and in fp16 range
last_lsh_backend = None  # "triton" or "dense": which path the most recent lsh_attention call used


def sort_by_bucket(buckets, chunk, same_bucket=False, causal=False):
    """buckets (B, H, R, T) -> sorted positions st, inverse permutation rank, window ids loc, all (B, H, R, T),
    and span: key j lies in query i's window of a round exactly when in_window(loc_i, loc_j, span).

    st[..., s] is the original position at sorted index s; rank[..., t] the sorted index of position t.
    loc[..., t] is t's chunk (span 2: own or previous chunk), plus 2 * bucket with same_bucket (rank grows with
    the bucket, so other buckets land 2 or more away, or below); with causal, t's sorted index plus
    chunk * bucket (span chunk: the chunk latest sorted indices of the same bucket).
    """
    T = buckets.shape[-1]
    pos = torch.arange(T, device=buckets.device)
    st = torch.argsort(buckets.long() * T + pos, dim=-1)  # keys are unique, so this is the stable order
    rank = torch.empty_like(st).scatter_(-1, st, pos.expand_as(st))
    if causal:
        return st, rank, rank + chunk * buckets.long(), chunk
    loc = rank // chunk
    if same_bucket:
        loc = loc + 2 * buckets.long()
    return st, rank, loc, 2


def in_window(loc_q, loc_k, span):
    """Whether a key with window id loc_k is in the window of a query with id loc_q (see sort_by_bucket); the
    dense twin calls it on tensors, the kernels compiled (_in_window)."""
    return (loc_k <= loc_q) & (loc_k > loc_q - span)


_in_window = jit(in_window)


def dense_lsh_attention(q, k, v, buckets, chunk, scale=1.0, same_bucket=False, dedup=False, causal=False):
    """The plain PyTorch twin: per-round outputs (B, H, R, T, D) and log-sum-exps (B, H, R, T) by sort + gather.
    T must be a multiple of chunk (lsh_attention pads any other length)."""
    B, H, T, D = q.shape
    R, N = buckets.shape[2], T // chunk
    st, rank, loc, span = sort_by_bucket(buckets, chunk, same_bucket, causal)

    def gather_rows(x):  # (B, H, T, E) -> rows in each round's sorted order, chunked: (B, H, R, N, m, E)
        E = x.shape[-1]
        rows = x[:, :, None].expand(B, H, R, T, E).gather(3, st[..., None].expand(B, H, R, T, E))
        return rows.view(B, H, R, N, chunk, E)

    def with_previous(x):  # (B, H, R, N, m, ...) -> (B, H, R, N, 2m, ...): previous chunk's rows, then own
        return torch.cat([x.roll(1, dims=3), x], dim=4)

    sq = gather_rows(q)  # (B, H, R, N, m, D)
    sk, sv = with_previous(gather_rows(k)), with_previous(gather_rows(v))  # (B, H, R, N, 2m, D)
    qpos = st.view(B, H, R, N, chunk)
    kpos = with_previous(qpos)  # (B, H, R, N, 2m)
    s = (sq @ sk.transpose(-1, -2)) * scale  # (B, H, R, N, m, 2m)
    is_self = kpos[..., None, :] == qpos[..., :, None]
    s = s.masked_fill(is_self, SELF_LOGIT)
    if dedup:
        # loc of query and key rows in every round r2: (B, H, R2, R, N, m or 2m)
        qloc = loc.gather(3, qpos.reshape(B, H, 1, R * T).expand(B, H, R, R * T)).view(B, H, R, R, N, chunk)
        kloc = loc.gather(3, kpos.reshape(B, H, 1, 2 * R * T).expand(B, H, R, 2 * R * T))
        kloc = kloc.view(B, H, R, R, N, 2 * chunk)
        count = in_window(qloc[..., :, None], kloc[..., None, :], span).sum(2)  # (B, H, R, N, m, 2m)
        s = s - count.clamp(min=1).to(s.dtype).log()
    first = torch.zeros(N, 2 * chunk, dtype=torch.bool, device=q.device)
    first[0, :chunk] = True  # the first chunk has no previous chunk
    sloc = loc.gather(3, st).view(B, H, R, N, chunk)  # this round's loc of the sorted rows
    allowed = (kpos[..., None, :] <= qpos[..., :, None]) & ~first[:, None, :] \
        & in_window(sloc[..., :, None], with_previous(sloc)[..., None, :], span)
    s = s.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # (B, H, R, N, m)
    so = torch.exp(s - lse[..., None]) @ sv  # (B, H, R, N, m, D)
    o = so.view(B, H, R, T, D).gather(3, rank[..., None].expand(B, H, R, T, D))  # undo the sort
    return o, lse.view(B, H, R, T).gather(3, rank)


# Shared by the three kernels: the masked logits of a tile of queries (rows) against a tile of keys (columns).
# Order of operations, same as the reference: q.k * scale; the self logit; minus log(count of rounds whose
# window holds the key) with dedup; -inf for keys later in the original order or outside round r's window.
# LOC holds loc (B, H, R, T) of sort_by_bucket; bh * R + r is the row of round r.
@jit
def _lsh_logits(q, k, qpos, kpos, k_ok, LOC, bh, r, R, T, span, scale, self_logit, DEDUP: tl.constexpr):
    s = tl.dot(q, tl.trans(k)) * scale
    s = tl.where(kpos[None, :] == qpos[:, None], self_logit, s)
    if DEDUP:
        count = tl.zeros(s.shape, dtype=tl.int32)
        for r2 in range(R):
            count += _lsh_window(LOC + (bh * R + r2) * T, qpos, kpos, span).to(tl.int32)
        s = s - tl.log(tl.maximum(count, 1).to(tl.float32))
    allowed = k_ok[None, :] & (kpos[None, :] <= qpos[:, None]) \
        & _lsh_window(LOC + (bh * R + r) * T, qpos, kpos, span)
    return tl.where(allowed, s, float("-inf"))


@jit
def _lsh_window(LOC_ROUND, qpos, kpos, span):
    """(queries, keys) mask of the keys in each query's window, for the round whose loc row is LOC_ROUND."""
    return _in_window(tl.load(LOC_ROUND + qpos)[:, None], tl.load(LOC_ROUND + kpos)[None, :], span)


@jit
def _load_rows(X, base, pos, ok, offs_d, d_ok, D: tl.constexpr):
    # rows X[base + pos] of a row-major (.., T, D) tensor: the in-kernel gather that replaces a sorted copy
    return tl.load(X + base + pos[:, None] * D + offs_d[None, :], mask=ok[:, None] & d_ok[None, :], other=0.0)


# Triton compiles a kernel of its own for int arguments equal to 1 or divisible by 16. These only count (round r
# of R, the window's span) or give lengths whose alignment the constexpr D already shows, so one compiled
# kernel serves every value.
LSH_SCALARS = ["r", "R", "span", "T"]


# Forward, one launch per round r. One program = one chunk c of one (batch, head) bh in round r; grid
# (B*H, T/chunk). SRAM: the chunk's BLOCK_M query rows and the 2*BLOCK_M key and value rows of the previous and
# own chunk, each gathered from the unsorted q/k/v through the sorted positions ST; the (BLOCK_M, 2*BLOCK_M)
# logit tile. The whole window fits in one tile, so the round's softmax is exact in one pass:
#   m_i = max_j s_ij;  l_i = sum_j exp(s_ij - m_i);  o_i = sum_j exp(s_ij - m_i) v_j / l_i
# Rounds then merge like flash attention's key blocks, into a running max M, sum L (relative to M) and output
# kept at the query's original position (the store undoes the sort); every position sits in exactly one chunk
# per round, so no two programs of a launch touch the same row:
#   M' = max(M, m);  a = exp(M - M'), b = exp(m - M');  L' = L a + l b;  out' = (out L a + o l b) / L'
# M and L stay separate rather than one log-sum-exp M + log L: M is an exact logit, so a row whose only key is
# itself (logit SELF_LOGIT = -5e4, where one fp32 ulp is 0.004) keeps exact weights. The running output is
# fp32 (ACC) until the last round writes O in the input dtype. Only (B, H, T, D) is ever stored, never the
# (B, H, R, T, D) per-round outputs.
@jit(do_not_specialize=LSH_SCALARS)
def _lsh_fwd_kernel(Q, K, V, ST, LOC, ACC, O, M, L, r, R, span, scale, self_logit, T,
                    CHUNK: tl.constexpr, BLOCK_M: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
                    DEDUP: tl.constexpr, FIRST: tl.constexpr, LAST: tl.constexpr):
    bh = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    bhr = bh * R + r  # row of this round in ST and LOC: (B, H, R, T)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, 2 * BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    q_ok = offs_m < CHUNK
    qpos = tl.load(ST + bhr * T + c * CHUNK + offs_m % CHUNK)  # padding rows repeat real ones, never stored
    k_chunk = c - 1 + offs_n // BLOCK_M  # keys: the previous chunk, then this one
    k_ok = ((offs_n % BLOCK_M) < CHUNK) & (k_chunk >= 0)
    kpos = tl.load(ST + bhr * T + k_chunk * CHUNK + offs_n % BLOCK_M, mask=k_ok, other=0)
    q = _load_rows(Q, bh * T * D, qpos, q_ok, offs_d, d_ok, D)
    k = _load_rows(K, bh * T * D, kpos, k_ok, offs_d, d_ok, D)
    v = _load_rows(V, bh * T * D, kpos, k_ok, offs_d, d_ok, D)
    s = _lsh_logits(q, k, qpos, kpos, k_ok, LOC, bh, r, R, T, span, scale, self_logit, DEDUP)
    m = tl.max(s, axis=1)
    p = tl.exp(s - m[:, None])
    l = tl.sum(p, axis=1)
    out = tl.dot(p.to(v.dtype), v) / l[:, None]
    rows = bh * T * D + qpos[:, None] * D + offs_d[None, :]
    row_ok = q_ok[:, None] & d_ok[None, :]
    if not FIRST:  # merge with the rounds before (every round has the self logit, so M is finite)
        m_before = tl.load(M + bh * T + qpos)
        l_before = tl.load(L + bh * T + qpos)
        m_new = tl.maximum(m_before, m)
        a = l_before * tl.exp(m_before - m_new)
        b = l * tl.exp(m - m_new)
        out = (tl.load(ACC + rows, mask=row_ok, other=0.0) * a[:, None] + out * b[:, None]) / (a + b)[:, None]
        m, l = m_new, a + b
    if LAST:
        tl.store(O + rows, out.to(O.dtype.element_ty), mask=row_ok)
    else:
        tl.store(ACC + rows, out, mask=row_ok)
    tl.store(M + bh * T + qpos, m, mask=q_ok)
    tl.store(L + bh * T + qpos, l, mask=q_ok)


# The backward needs no per-round quantity: the combined output is one softmax over all rounds' windows, a key
# counted once per round that sees it, out_i = sum_r sum_j P_rij v_j with P_rij = exp(s_rij - M_i) / L_i.
# So, as in flash attention, with delta_i = sum_d out_id * dout_id:
#   dv_j = sum_ri P_rij dout_i;  dS_rij = P_rij (dout_i . v_j - delta_i);
#   dk_j = scale * sum_ri dS_rij q_i;  dq_i = scale * sum_rj dS_rij k_j
# One launch per round adds that round's terms into fp32 (B, H, T, D) accumulators; as in the forward, the
# programs of one launch own disjoint rows, so the read-add-write needs no atomics and is deterministic.
#
# dK and dV. One program = the keys of chunk c of (bh, round r); grid (B*H, T/chunk). The queries that see
# these keys are those of chunk c and chunk c+1, so each key row gets the round's whole gradient from one
# program. SRAM: BLOCK_M key/value rows, 2*BLOCK_M query/dout rows with their M, L and delta.
@jit(do_not_specialize=LSH_SCALARS)
def _lsh_bwd_dkdv_kernel(Q, K, V, ST, LOC, DO, M, L, DELTA, DK, DV, r, R, span, scale, self_logit, T,
                         CHUNK: tl.constexpr, BLOCK_M: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
                         DEDUP: tl.constexpr, FIRST: tl.constexpr):
    bh = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    bhr = bh * R + r
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, 2 * BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    k_ok = offs_m < CHUNK
    kpos = tl.load(ST + bhr * T + c * CHUNK + offs_m, mask=k_ok, other=0)
    q_chunk = c + offs_n // BLOCK_M  # queries: this chunk, then the next one
    q_ok = ((offs_n % BLOCK_M) < CHUNK) & (q_chunk < T // CHUNK)
    qpos = tl.load(ST + bhr * T + q_chunk * CHUNK + offs_n % BLOCK_M, mask=q_ok, other=0)
    k = _load_rows(K, bh * T * D, kpos, k_ok, offs_d, d_ok, D)
    v = _load_rows(V, bh * T * D, kpos, k_ok, offs_d, d_ok, D)
    q = _load_rows(Q, bh * T * D, qpos, q_ok, offs_d, d_ok, D)
    do = _load_rows(DO, bh * T * D, qpos, q_ok, offs_d, d_ok, D)
    m = tl.load(M + bh * T + qpos, mask=q_ok, other=float("inf"))  # +inf: absent queries get P = 0
    l = tl.load(L + bh * T + qpos, mask=q_ok, other=1.0)
    delta = tl.load(DELTA + bh * T + qpos, mask=q_ok, other=0.0)
    # (2*BLOCK_M queries, BLOCK_M keys)
    s = _lsh_logits(q, k, qpos, kpos, k_ok, LOC, bh, r, R, T, span, scale, self_logit, DEDUP)
    p = tl.exp(s - m[:, None]) / l[:, None]
    dv = tl.dot(tl.trans(p.to(do.dtype)), do)
    ds = p * (tl.dot(do, tl.trans(v)) - delta[:, None])
    dk = tl.dot(tl.trans(ds.to(q.dtype)), q) * scale
    rows = bh * T * D + kpos[:, None] * D + offs_d[None, :]
    row_ok = k_ok[:, None] & d_ok[None, :]
    if not FIRST:
        dk += tl.load(DK + rows, mask=row_ok, other=0.0)
        dv += tl.load(DV + rows, mask=row_ok, other=0.0)
    tl.store(DK + rows, dk, mask=row_ok)
    tl.store(DV + rows, dv, mask=row_ok)


# dQ. One program = the queries of chunk c of (bh, round r); grid (B*H, T/chunk); the forward's tiles plus the
# queries' dout, M, L and delta.
@jit(do_not_specialize=LSH_SCALARS)
def _lsh_bwd_dq_kernel(Q, K, V, ST, LOC, DO, M, L, DELTA, DQ, r, R, span, scale, self_logit, T,
                       CHUNK: tl.constexpr, BLOCK_M: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
                       DEDUP: tl.constexpr, FIRST: tl.constexpr):
    bh = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    bhr = bh * R + r
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, 2 * BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    q_ok = offs_m < CHUNK
    qpos = tl.load(ST + bhr * T + c * CHUNK + offs_m, mask=q_ok, other=0)
    k_chunk = c - 1 + offs_n // BLOCK_M
    k_ok = ((offs_n % BLOCK_M) < CHUNK) & (k_chunk >= 0)
    kpos = tl.load(ST + bhr * T + k_chunk * CHUNK + offs_n % BLOCK_M, mask=k_ok, other=0)
    q = _load_rows(Q, bh * T * D, qpos, q_ok, offs_d, d_ok, D)
    k = _load_rows(K, bh * T * D, kpos, k_ok, offs_d, d_ok, D)
    v = _load_rows(V, bh * T * D, kpos, k_ok, offs_d, d_ok, D)
    do = _load_rows(DO, bh * T * D, qpos, q_ok, offs_d, d_ok, D)
    m = tl.load(M + bh * T + qpos, mask=q_ok, other=float("inf"))
    l = tl.load(L + bh * T + qpos, mask=q_ok, other=1.0)
    delta = tl.load(DELTA + bh * T + qpos, mask=q_ok, other=0.0)
    s = _lsh_logits(q, k, qpos, kpos, k_ok, LOC, bh, r, R, T, span, scale, self_logit, DEDUP)
    p = tl.exp(s - m[:, None]) / l[:, None]
    ds = p * (tl.dot(do, tl.trans(v)) - delta[:, None])
    dq = tl.dot(ds.to(k.dtype), k) * scale
    rows = bh * T * D + qpos[:, None] * D + offs_d[None, :]
    row_ok = q_ok[:, None] & d_ok[None, :]
    if not FIRST:
        dq += tl.load(DQ + rows, mask=row_ok, other=0.0)
    tl.store(DQ + rows, dq, mask=row_ok)


class _LSHAttentionTriton(torch.autograd.Function):
    """Launches the kernels round by round; returns the combined output (B, H, T, D), T a multiple of chunk."""

    @staticmethod
    def forward(ctx, q, k, v, buckets, chunk, scale, same_bucket, dedup, causal):
        B, H, T, D = q.shape
        R = buckets.shape[2]
        st, _, loc, span = sort_by_bucket(buckets, chunk, same_bucket, causal)
        st, loc = st.to(torch.int32).contiguous(), loc.to(torch.int32).contiguous()
        q, k, v = (x.contiguous() for x in (q, k, v))
        out = torch.empty_like(q)
        acc = torch.empty(B, H, T, D, device=q.device, dtype=torch.float32) if R > 1 else out
        m, l = (torch.empty(B, H, T, device=q.device, dtype=torch.float32) for _ in range(2))
        # tl.dot needs tiles of at least 16: smaller or non-power-of-two chunks and widths are padded and masked.
        # A program holds (BLOCK_M, 2 * BLOCK_M) logits and 2 * BLOCK_M rows of width BLOCK_D; warps grow with
        # them, as far as that keeps them in registers when compiled for sm_90 (8 warps at chunk 64, as in
        # Triton's fused-attention tutorial; 16 warps cap a thread at 128 registers and spill more there). At
        # chunk 128 even 16 warps spill: correct, but slower. Not timed on a GPU: none was at hand.
        block_m, block_d = max(16, triton.next_power_of_2(chunk)), max(16, triton.next_power_of_2(D))
        warps = 16 if block_m >= 128 else 8 if block_m >= 64 or block_d >= 128 else 4
        meta = dict(CHUNK=chunk, BLOCK_M=block_m, D=D, BLOCK_D=block_d, DEDUP=dedup, num_warps=warps)
        grid = (B * H, T // chunk)
        for r in range(R):
            _lsh_fwd_kernel[grid](q, k, v, st, loc, acc, out, m, l, r, R, span, scale, SELF_LOGIT, T,
                                  FIRST=r == 0, LAST=r == R - 1, **meta)
        ctx.save_for_backward(q, k, v, st, loc, out, m, l)
        ctx.grid, ctx.meta, ctx.scalars = grid, meta, (R, span, scale)
        return out

    @staticmethod
    def backward(ctx, do):
        q, k, v, st, loc, out, m, l = ctx.saved_tensors
        B, H, T, D = q.shape
        R, span, scale = ctx.scalars
        do = do.to(q.dtype).contiguous()
        delta = (do.float() * out.float()).sum(-1)  # (B, H, T)
        dq, dk, dv = (torch.empty(B, H, T, D, device=q.device, dtype=torch.float32) for _ in range(3))
        args = (q, k, v, st, loc, do, m, l, delta)
        for r in range(R):
            scalars = (r, R, span, scale, SELF_LOGIT, T)
            _lsh_bwd_dkdv_kernel[ctx.grid](*args, dk, dv, *scalars, FIRST=r == 0, **ctx.meta)
            _lsh_bwd_dq_kernel[ctx.grid](*args, dq, *scalars, FIRST=r == 0, **ctx.meta)
        return dq.to(q.dtype), dk.to(q.dtype), dv.to(q.dtype), None, None, None, None, None, None


def combine_rounds(o, lse):
    """out = sum_r exp(lse_r - logsumexp_r lse_r) o_r: (B, H, R, T, D), (B, H, R, T) -> (B, H, T, D)."""
    w = torch.softmax(lse.to(torch.promote_types(lse.dtype, torch.float32)), dim=2)
    return (o * w[..., None].to(o.dtype)).sum(2)


def _lsh_triton_unfit(q, chunk):
    """Why the LSH kernels cannot take these inputs (a sentence), or None when they can. A program holds a
    chunk's whole (chunk, 2 * chunk) logit tile, so chunks beyond 128 do not fit (128 already spills registers),
    and fp32 rows of 128 would need more shared memory than an H100 has (both found by compiling for sm_90)."""
    if triton is None:
        return "the LSH Triton kernel needs triton, which is not installed"
    if not q.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        return "the LSH Triton kernel needs CUDA tensors (or TRITON_INTERPRET=1 for the CPU interpreter)"
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"the LSH Triton kernel takes fp16/bf16/fp32 inputs, got {q.dtype}"
    if chunk > 128:
        return f"the LSH Triton kernel takes chunks of at most 128, got {chunk}"
    if q.dtype == torch.float32 and q.size(-1) > 64:
        return f"the LSH Triton kernel takes fp32 inputs up to head dim 64 (use bf16 autocast), got {q.size(-1)}"
    return None


def pad_to_chunks(q, k, v, buckets, chunk):
    """Pad the sequence to a multiple of chunk with zero rows in a bucket after every real one (the largest + 1).
    They sort after all real positions, so those keep the chunks of the unpadded sequence (its last chunk
    shorter), and being later than every real position they are never a real query's key."""
    pad = -q.size(2) % chunk
    if pad == 0:
        return q, k, v, buckets
    q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
    sentinel = (buckets.amax() + 1).expand(*buckets.shape[:3], pad)  # (B, H, R, pad)
    return q, k, v, torch.cat([buckets, sentinel], dim=-1)


def lsh_attention(q, k, v, buckets, chunk, scale=1.0, same_bucket=False, dedup=False, causal=False, backend=None):
    """LSH attention with rounds combined: q, k, v (B, H, T, D), buckets (B, H, R, T) ints -> (B, H, T, D).

    Any T: a sequence that chunk does not divide is padded inside (pad_to_chunks), its output the function of
    the unpadded sequence with a shorter last chunk. causal=True: each query attends to the chunk most recent
    keys of its own bucket, exactly causal (see the section comment). Triton on CUDA, the dense PyTorch twin
    (dense_lsh_attention + combine_rounds) elsewhere; backend='triton' or 'dense' forces one and
    last_lsh_backend says which ran.
    """
    global last_lsh_backend
    if backend not in (None, "triton", "dense"):
        raise ValueError(f"unknown LSH attention backend {backend!r}; choose 'triton', 'dense' or leave it unset")
    unfit = _lsh_triton_unfit(q, chunk)
    if backend == "triton" and unfit:
        raise ValueError(unfit + "; use backend='dense'")
    if backend is None:
        backend = "triton" if q.is_cuda and not unfit else "dense"
    last_lsh_backend = backend
    T = q.size(2)
    q, k, v, buckets = pad_to_chunks(q, k, v, buckets, chunk)
    if backend == "dense":
        out = combine_rounds(*dense_lsh_attention(q, k, v, buckets, chunk, scale, same_bucket, dedup, causal))
    else:
        k, v = k.to(q.dtype), v.to(q.dtype)
        out = _LSHAttentionTriton.apply(q, k, v, buckets, chunk, scale, same_bucket, dedup, causal)
    return out[:, :, :T]
