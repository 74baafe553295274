"""
Attention kernels shared by the models, after a preamble of what they share (triton_dispatch, _launch):
  1. Block-sparse attention: attention (twin: dense_attention)
  2. LSH attention: lsh_attention (twin: torch_lsh_attention; on a CPU cpu_lsh_attention)
  3. AFT sums: aft_sums (twin: aft.py's PyTorch path)
Each chapter: (a) the definition and its dense PyTorch twin, which the tests hold the kernels to;
(b) the Triton kernels; (c) the launcher and its launch settings; (d) the public function.

Conventions used throughout the repository:
- q: (B, H, T, D), k and v: (B, H, S, D) with S >= T.
- causal masks are aligned bottom-right: query i sits at position S - T + i and sees keys 0 .. S - T + i (with
  T == S the usual causal mask, with T < S Perceiver AR's cross-attention).
- window w: query position p sees key j only when j > p - w (the last w positions, itself included).
- a tile is a square of the attention matrix: layout[h, m, n] lets query rows m*tile .. (m+1)*tile-1 (row index,
  not position) see key columns n*tile .. (n+1)*tile-1. S - T must be a multiple of tile, so that the layout's
  diagonal is the causal one.
- a query that sees no key at all gets a zero output (and passes no gradient), never NaN.

docs/kernels.md documents the kernels, their launch settings and measurements (bench.py's).
"""
from __future__ import annotations  # the kernels' `tl.constexpr` annotations stay strings without triton

import functools
import math
import os

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

try:
    import triton
    import triton.language as tl
except ImportError:  # then everything runs on the dense path
    triton = None

# ================================================================================================================
# Preamble: what the three families share

if triton is not None:
    jit = triton.jit
else:  # the kernels are then never launched; defining them as plain functions keeps the module importable
    def jit(fn=None, **options):
        return fn if fn is not None else (lambda fn: fn)

# Triton decides at a kernel's definition (this import) whether it runs in the interpreter; so does the dispatch
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
TRITON_HEAD_DIMS = (16, 32, 64, 128)  # head dims the block-sparse kernels take (and the LSH ones on a GPU)


@functools.cache  # asking the driver costs microseconds, and the dispatch asks on every call
def _arch(device):
    """A CUDA device's compute capability as one number (90 for sm_90); None elsewhere (the interpreter)."""
    if device.type != "cuda":
        return None
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


def _aligned(x):
    """x contiguous and 16-byte aligned, the case every compiled kernel is built and checked for (Triton would
    compile a slower one of its own for a pointer that is not)."""
    x = x.contiguous()
    return x if x.data_ptr() % 16 == 0 else x.clone()


def _gpu_unfit(arch):
    """Why no Triton kernel runs on GPU sm_`arch` (a sentence), or None (also for arch None, the interpreter)."""
    if arch is not None and arch < 80:
        return (f"the Triton kernels need sm_80 or newer, got sm_{arch} (Triton compiles tl.dot without tensor "
                f"cores there; the dense path uses them)")
    return None


def triton_dispatch(family, x, backend, family_unfit, *args):
    """The dispatch of every family: whether its Triton kernels run on inputs like x. backend None picks them for
    CUDA tensors they take, "triton" forces them (a ValueError says why they cannot), "dense" never runs them.
    family_unfit(arch, *args) is the family's own check (dtype, head dim, tile; arch None: the interpreter): a
    sentence, or None; the compile check in test_all.py compiles what it lets through."""
    if backend not in (None, "triton", "dense"):
        raise ValueError(f"unknown {family} backend {backend!r}; choose 'triton', 'dense' or leave it unset")
    if backend == "dense":
        return False
    if triton is None:
        why = f"the {family} Triton kernels need triton, which is not installed"
    elif not x.is_cuda and not INTERPRETED:
        why = f"the {family} Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 for the CPU interpreter)"
    else:
        arch = _arch(x.device)
        why = _gpu_unfit(arch) or family_unfit(arch, *args)
    if why and backend == "triton":
        raise ValueError(f"{why}; use backend='dense'")
    return why is None and (x.is_cuda or backend == "triton")  # the interpreter runs only when asked


def backend_info(device):
    """One line saying which attention backend `device` gets, for train.py to print at start."""
    if triton is None:
        return "attention backend: dense PyTorch fallback (triton not installed)"
    if torch.device(device).type != "cuda":
        return "attention backend: dense PyTorch fallback (no CUDA device)"
    return f"attention backend: triton {triton.__version__} (CUDA)"


@functools.cache  # the dispatch runs on every call of a model's layer
def _launch_settings(config, *args):
    """config(*args), a family's launch settings (they depend on shapes, dtype and arch only)."""
    return config(*args)


def _launch(forward, backward, inputs, settings):
    """Every family's launches: forward(*inputs, *settings) -> (out, *saved), saved the tensors the
    backward needs, and backward(out, *saved, dout, *settings) -> the inputs' gradients; settings are all
    else (lists, scalars, launch settings). The autograd Function only when a gradient is wanted."""
    if torch.is_grad_enabled() and any(x.requires_grad for x in inputs):
        return _Launches.apply((forward, backward, settings), *inputs)
    return forward(*inputs, *settings)[0]


class _Launches(torch.autograd.Function):
    @staticmethod
    def forward(ctx, family, *inputs):
        forward, ctx.backward, ctx.settings = family
        out, *saved = forward(*inputs, *ctx.settings)
        ctx.save_for_backward(out, *saved)
        return out

    @staticmethod
    def backward(ctx, dout):
        return None, *ctx.backward(*ctx.saved_tensors, _aligned(dout), *ctx.settings)


# ================================================================================================================
# 1. Block-sparse attention: softmax attention under a causal mask, a sliding window and a tile layout at once
#
# (a) The definition: softmax(q k^T * scale) v over the keys the three masks let through, 0 for a query that
# sees none; dense_attention computes it. The kernels visit only the tiles the layout lists (FlashAttention,
# section 3.3).

def causal_mask(T, S, device):
    """Bottom-right aligned causal mask [T, S]: query i (absolute position S - T + i) sees keys <= it."""
    q_pos = torch.arange(S - T, S, device=device)[:, None]
    return torch.arange(S, device=device)[None, :] <= q_pos


def attention_mask(T, S, causal=True, layout=None, tile=64, window=None, device=None):
    """Element mask [H or 1, T, S] (True = may attend) of causal & window & layout, or None for no mask."""
    q_pos = torch.arange(S - T, S, device=device)[:, None]
    k_pos = torch.arange(S, device=device)[None, :]
    mask = causal_mask(T, S, device) if causal else None
    if window is not None:
        mask = (k_pos > q_pos - window) if mask is None else mask & (k_pos > q_pos - window)
    if layout is not None:  # each tile's entry repeated over its tile x tile elements
        tiles = layout.to(device=device, dtype=torch.bool).repeat_interleave(tile, 1).repeat_interleave(tile, 2)
        mask = tiles[:, :T, :S] if mask is None else tiles[:, :T, :S] & mask
    return mask if mask is None or mask.dim() == 3 else mask[None]


def dense_attention(q, k, v, causal=True, layout=None, tile=64, window=None, scale=None):
    """softmax(q k^T * scale, masked) v by F.scaled_dot_product_attention; rows with no visible key give 0."""
    mask = attention_mask(q.size(-2), k.size(-2), causal, layout, tile, window, q.device)
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    empty = ~mask.any(-1, keepdim=True)  # (H or 1, T, 1)
    # open empty rows to every key so SDPA stays finite, then zero them: their gradient is then zero too
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=(mask | empty)[None], scale=scale)
    return out.masked_fill(empty[None], 0.0)


# (b) The kernels. A program walks a list of tiles (tile_lists, part (c)): first those the band's
# edge cuts, with a per-element mask, then the rest without one. The causal mask and the window are
# one band of visible keys, the same named values past, future, window everywhere:
#     past + i - window < j <= past + i + future    (query row i at position past + i, past = S - T)
# with future = 0 for causal attention (S otherwise) and window = S + 1 when there is none. Scores s
# are in log2 units (qk_scale = scale * log2(e)), so the kernels use exp2 and the forward saves per
# row lse2 = log2 sum_j 2^s_j. Masked scores are -inf.
SPARSE_SCALARS = ["H", "layout_heads", "future", "window"]  # scalar arithmetic only: one compiled kernel for all


# Forward. One program computes TILE_M output rows (of one query tile) of one (batch, head): grid
# (T / TILE_M, B * H). q, the running max m, the running sum l and the output accumulator stay in
# SRAM while the program walks its key list in sub-tiles of TILE_N keys, with s the scores:
#     m' = max(m, rowmax(s))
#     l' = l * 2^(m - m') + rowsum(2^(s - m'))
#     acc' = acc * 2^(m - m') + 2^(s - m') v            and at the end: out = acc / l, lse2 = m + log2(l)
@jit(do_not_specialize=SPARSE_SCALARS)
def _fwd_kernel(Q, K, V, O, LSE2, row_ptr, row_mid, cols, qk_scale, H, T, S, layout_heads, future, window,
                TILE: tl.constexpr, TILE_M: tl.constexpr, TILE_N: tl.constexpr, D: tl.constexpr):
    pid, bh = tl.program_id(0), tl.program_id(1)
    q_row, k_row = bh.to(tl.int64) * T, bh.to(tl.int64) * S  # first query and key row of bh
    Q, O, LSE2, K, V = Q + q_row * D, O + q_row * D, LSE2 + q_row, K + k_row * D, V + k_row * D
    offs_m = pid * TILE_M + tl.arange(0, TILE_M)
    offs_d = tl.arange(0, D)
    q = tl.load(Q + offs_m[:, None] * D + offs_d[None, :])
    m_i = tl.full([TILE_M], -1.0e30, tl.float32)  # finite, so a fully masked tile gives 2^(-inf) = 0, not NaN
    l_i = tl.zeros([TILE_M], tl.float32)
    acc = tl.zeros([TILE_M, D], tl.float32)
    row = (bh % H) % layout_heads * (T // TILE) + pid * TILE_M // TILE
    lo, mid, hi = tl.load(row_ptr + row), tl.load(row_mid + row), tl.load(row_ptr + row + 1)
    past = S - T
    acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, K, V, cols, lo, mid, qk_scale, offs_m, past,
                               future, window, TILE, TILE_N, D, True)
    acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, K, V, cols, mid, hi, qk_scale, offs_m, past,
                               future, window, TILE, TILE_N, D, False)
    l_i = tl.where(l_i == 0.0, 1.0, l_i)  # a row that saw no key has acc = 0: output 0, not 0/0
    tl.store(O + offs_m[:, None] * D + offs_d[None, :], (acc / l_i[:, None]).to(O.dtype.element_ty))
    tl.store(LSE2 + offs_m, m_i + tl.log2(l_i))


@jit
def _fwd_tiles(acc, l_i, m_i, q, K, V, cols, lo, hi, qk_scale, offs_m, past, future, window,
               TILE: tl.constexpr, TILE_N: tl.constexpr, D: tl.constexpr, MASKED: tl.constexpr):
    """The recurrence over the key list's entries lo .. hi-1, for the query rows offs_m."""
    SPLIT = TILE // TILE_N  # sub-tiles per list entry
    offs_n = tl.arange(0, TILE_N)
    offs_d = tl.arange(0, D)
    for it in range(lo * SPLIT, hi * SPLIT):
        k_lo = tl.load(cols + it // SPLIT) * TILE + (it % SPLIT) * TILE_N
        kT = tl.load(K + (k_lo + offs_n)[None, :] * D + offs_d[:, None])  # (D, TILE_N)
        s = tl.dot(q, kT) * qk_scale
        if MASKED:
            keep = _band(past + offs_m[:, None], (k_lo + offs_n)[None, :], future, window)
            s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + (k_lo + offs_n)[:, None] * D + offs_d[None, :])  # (TILE_N, D)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    return acc, l_i, m_i


@jit
def _band(q_pos, k_pos, future, window):
    """Element mask of the band q_pos - window < k_pos <= q_pos + future, broadcast (absolute positions)."""
    return (k_pos <= q_pos + future) & (k_pos > q_pos - window)


# Backward, dQ, launched first. One program computes dq for TILE_M query rows (of one query tile) of
# one (batch, head): grid (T / TILE_M, B * H), and stores their delta = rowsum(out * dout) in fp32
# for the dK/dV kernel. q, dout, lse2, delta and the dq accumulator stay in SRAM while the program
# walks the forward's key list, in sub-tiles of TILE_N keys:
#     P = 2^(s - lse2)
#     dP = dout v^T
#     dq += scale * (P * (dP - delta)) k
@jit(do_not_specialize=SPARSE_SCALARS)
def _bwd_dq_kernel(Q, K, V, O, DO, LSE2, DELTA, DQ, row_ptr, row_mid, cols, qk_scale, scale, H, T, S,
                   layout_heads, future, window, TILE: tl.constexpr, TILE_M: tl.constexpr, TILE_N: tl.constexpr,
                   D: tl.constexpr):
    pid, bh = tl.program_id(0), tl.program_id(1)
    q_row, k_row = bh.to(tl.int64) * T, bh.to(tl.int64) * S
    Q, O, DO, DQ = Q + q_row * D, O + q_row * D, DO + q_row * D, DQ + q_row * D
    K, V, LSE2, DELTA = K + k_row * D, V + k_row * D, LSE2 + q_row, DELTA + q_row
    offs_m = pid * TILE_M + tl.arange(0, TILE_M)
    offs_d = tl.arange(0, D)
    q = tl.load(Q + offs_m[:, None] * D + offs_d[None, :])
    do = tl.load(DO + offs_m[:, None] * D + offs_d[None, :])
    o = tl.load(O + offs_m[:, None] * D + offs_d[None, :])
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + offs_m, delta)
    lse2 = tl.load(LSE2 + offs_m)
    dq = tl.zeros([TILE_M, D], tl.float32)
    row = (bh % H) % layout_heads * (T // TILE) + pid * TILE_M // TILE
    lo, mid, hi = tl.load(row_ptr + row), tl.load(row_mid + row), tl.load(row_ptr + row + 1)
    past = S - T
    dq = _dq_tiles(dq, q, do, lse2, delta, K, V, cols, lo, mid, qk_scale, offs_m, past, future,
                   window, TILE, TILE_N, D, True)
    dq = _dq_tiles(dq, q, do, lse2, delta, K, V, cols, mid, hi, qk_scale, offs_m, past, future,
                   window, TILE, TILE_N, D, False)
    tl.store(DQ + offs_m[:, None] * D + offs_d[None, :], (dq * scale).to(DQ.dtype.element_ty))


@jit
def _dq_tiles(dq, q, do, lse2, delta, K, V, cols, lo, hi, qk_scale, offs_m, past, future, window,
              TILE: tl.constexpr, TILE_N: tl.constexpr, D: tl.constexpr, MASKED: tl.constexpr):
    """The sum over the key list's entries lo .. hi-1, for the query rows offs_m."""
    SPLIT = TILE // TILE_N
    offs_n = tl.arange(0, TILE_N)
    offs_d = tl.arange(0, D)
    for it in range(lo * SPLIT, hi * SPLIT):
        k_lo = tl.load(cols + it // SPLIT) * TILE + (it % SPLIT) * TILE_N
        kT = tl.load(K + (k_lo + offs_n)[None, :] * D + offs_d[:, None])  # (D, TILE_N)
        vT = tl.load(V + (k_lo + offs_n)[None, :] * D + offs_d[:, None])
        s = tl.dot(q, kT) * qk_scale
        if MASKED:
            keep = _band(past + offs_m[:, None], (k_lo + offs_n)[None, :], future, window)
            s = tl.where(keep, s, float("-inf"))
        p = tl.exp2(s - lse2[:, None])
        ds = p * (tl.dot(do, vT) - delta[:, None])
        dq += tl.dot(ds.to(kT.dtype), tl.trans(kT))
    return dq


# Backward, dK and dV. One program computes the gradients of TILE_N keys (of one key tile) of one
# (batch, head): grid (S / TILE_N, B * H). k, v and the dk, dv accumulators stay in SRAM while the
# program walks the query tiles that visit its tile, in sub-tiles of TILE_M queries (delta: dQ's):
#     P = 2^(s - lse2)                     (the forward's softmax, exactly)
#     dv += P^T dout,   dP = dout v^T
#     dk += scale * (P * (dP - delta))^T q
@jit(do_not_specialize=SPARSE_SCALARS)
def _bwd_dkdv_kernel(Q, K, V, DO, LSE2, DELTA, DK, DV, col_ptr, col_mid, rows, qk_scale, scale, H, T,
                     S, layout_heads, future, window, TILE: tl.constexpr, TILE_M: tl.constexpr,
                     TILE_N: tl.constexpr, D: tl.constexpr):
    pid, bh = tl.program_id(0), tl.program_id(1)
    q_row, k_row = bh.to(tl.int64) * T, bh.to(tl.int64) * S
    Q, DO, LSE2, DELTA = Q + q_row * D, DO + q_row * D, LSE2 + q_row, DELTA + q_row
    K, V, DK, DV = K + k_row * D, V + k_row * D, DK + k_row * D, DV + k_row * D
    offs_n = pid * TILE_N + tl.arange(0, TILE_N)
    offs_d = tl.arange(0, D)
    k = tl.load(K + offs_n[:, None] * D + offs_d[None, :])
    v = tl.load(V + offs_n[:, None] * D + offs_d[None, :])
    dk, dv = tl.zeros([TILE_N, D], tl.float32), tl.zeros([TILE_N, D], tl.float32)
    col = (bh % H) % layout_heads * (S // TILE) + pid * TILE_N // TILE
    lo, mid, hi = tl.load(col_ptr + col), tl.load(col_mid + col), tl.load(col_ptr + col + 1)
    past = S - T
    dk, dv = _dkdv_tiles(dk, dv, k, v, Q, DO, LSE2, DELTA, rows, lo, mid, qk_scale, offs_n, past,
                         future, window, TILE, TILE_M, D, True)
    dk, dv = _dkdv_tiles(dk, dv, k, v, Q, DO, LSE2, DELTA, rows, mid, hi, qk_scale, offs_n, past,
                         future, window, TILE, TILE_M, D, False)
    tl.store(DK + offs_n[:, None] * D + offs_d[None, :], (dk * scale).to(DK.dtype.element_ty))
    tl.store(DV + offs_n[:, None] * D + offs_d[None, :], dv.to(DV.dtype.element_ty))


@jit
def _dkdv_tiles(dk, dv, k, v, Q, DO, LSE2, DELTA, rows, lo, hi, qk_scale, offs_n, past, future,
                window, TILE: tl.constexpr, TILE_M: tl.constexpr, D: tl.constexpr,
                MASKED: tl.constexpr):
    """The sums over the query list's entries lo .. hi-1, for the key rows offs_n (a key's row is its position)."""
    SPLIT = TILE // TILE_M
    offs_m = tl.arange(0, TILE_M)
    offs_d = tl.arange(0, D)
    for it in range(lo * SPLIT, hi * SPLIT):
        m_lo = tl.load(rows + it // SPLIT) * TILE + (it % SPLIT) * TILE_M  # first query row of the sub-tile
        qT = tl.load(Q + (m_lo + offs_m)[None, :] * D + offs_d[:, None])  # (D, TILE_M)
        sT = tl.dot(k, qT) * qk_scale
        if MASKED:
            keep = _band(past + (m_lo + offs_m)[None, :], offs_n[:, None], future, window)
            sT = tl.where(keep, sT, float("-inf"))
        pT = tl.exp2(sT - tl.load(LSE2 + m_lo + offs_m)[None, :])
        do = tl.load(DO + (m_lo + offs_m)[:, None] * D + offs_d[None, :])  # (TILE_M, D)
        dv += tl.dot(pT.to(do.dtype), do)
        dpT = tl.dot(v, tl.trans(do))
        dsT = pT * (dpT - tl.load(DELTA + m_lo + offs_m)[None, :])
        dk += tl.dot(dsT.to(qT.dtype), tl.trans(qT))
    return dk, dv


# (c) The launcher: the layout's tile lists (tile_lists), the launch settings (launch_config), the launches.

_index_cache = {}  # (layout content, shapes, band) -> CSR lists on the device; see tile_lists
_layout_keys = {}  # id(layout) -> (layout, its version, its content key); see _layout_key
LOG2E = math.log2(math.e)  # 2^(x * LOG2E) = e^x


def _layout_key(layout):
    """The layout's content as a hashable key, serialised once per tensor (models keep theirs) and again after an
    in-place change (torch bumps _version); the tensor is held, so that its id is not reused."""
    if layout is None:
        return None
    seen = _layout_keys.get(id(layout))
    if seen is None or seen[0] is not layout or seen[1] != layout._version:
        seen = (layout, layout._version, (tuple(layout.shape), layout.to("cpu", torch.bool).numpy().tobytes()))
        if len(_layout_keys) >= 64:
            _layout_keys.pop(next(iter(_layout_keys)))
        _layout_keys[id(layout)] = seen
    return seen[2]


def tile_lists(layout, tile, T, S, future, window, device):
    """The tiles to compute as CSR index lists, int32 on `device`: (row_ptr, cols, col_ptr, rows, row_mid,
    col_mid). Query tile m of layout head h (list row i = h*T/tile + m) visits key tiles cols[row_ptr[i] :
    row_ptr[i + 1]], those before row_mid[i] cut by the band's edge; key tile n (list column i = h*S/tile + n)
    is visited by query tiles rows[col_ptr[i] : col_ptr[i + 1]], split at col_mid[i] likewise. Tiles wholly
    outside the band are left out. Cached on the layout's content, shapes and band (future, window)."""
    key = (_layout_key(layout), tile, T, S, future, window, str(device))
    if key not in _index_cache:
        if layout is None:
            layout = torch.ones(1, T // tile, S // tile, dtype=torch.bool)
        q_first = S - T + torch.arange(T // tile)[:, None] * tile  # first query position of each tile
        k_first = torch.arange(S // tile)[None, :] * tile
        q_last, k_last = q_first + tile - 1, k_first + tile - 1
        visible = layout.to("cpu", torch.bool) & (k_first <= q_last + future) & (k_last > q_first - window)
        cut = (k_last > q_first + future) | (k_first <= q_last - window)  # (T/tile, S/tile)

        def csr(v, edge):  # (H', R, C) bools -> row pointers, tiles (cut ones first), row mids
            ptr = F.pad(v.sum(-1).flatten().cumsum(0), (1, 0))
            mid = ptr[:-1] + (v & edge).sum(-1).flatten()
            idx = torch.cat([v & edge, v & ~edge], dim=-1).nonzero()[:, 2] % v.size(-1)
            return [x.to(device, torch.int32) for x in (ptr, idx, mid)]

        if len(_index_cache) >= 64:  # a handful of layouts per model; keep memory bounded all the same
            _index_cache.pop(next(iter(_index_cache)))
        row_ptr, cols, row_mid = csr(visible, cut)
        col_ptr, rows, col_mid = csr(visible.mT, cut.T)
        _index_cache[key] = (row_ptr, cols, col_ptr, rows, row_mid, col_mid)
    return _index_cache[key]


def launch_config(tile, D, dtype, arch):
    """Per kernel: the rows (queries, or keys for dK/dV) a program owns, the width of the sub-tiles it walks,
    warps and pipeline stages, for sm_`arch` (None: the interpreter, which ignores warps and stages).
    docs/kernels.md says how they were chosen; the compile check in test_all.py checks them."""
    arch = arch or 90
    row_bytes = D * dtype.itemsize
    width = min(tile, 64 if row_bytes <= 256 else 32)
    inner = width if arch == 90 else min(tile, 32)
    fwd_rows, bwd_rows = min(tile, 128), min(tile, 128, 128 * 128 // row_bytes)
    stages = 3 if arch in (80, 90) else 2
    fwd = dict(num_warps=8 if fwd_rows == 128 and D >= 64 or fwd_rows * row_bytes >= 32768 else 4,
               num_stages=stages)
    bwd = dict(num_warps=8 if bwd_rows >= 64 and bwd_rows * D >= 4096 else 4)
    dkdv_stages = 1 if stages == 2 and dtype == torch.float32 and D >= 64 else stages  # 2 spill on sm_86/89
    return dict(fwd=dict(TILE_M=fwd_rows, TILE_N=width, **fwd),
                dkdv=dict(TILE_N=bwd_rows, TILE_M=inner, num_stages=dkdv_stages, **bwd),
                dq=dict(TILE_M=bwd_rows, TILE_N=inner, num_stages=stages, **bwd))


def _sparse_attention(q, k, v, layout, tile, future, window, scale, arch):
    """attention()'s Triton path after its checks, for sm_`arch`."""
    q, k, v = _aligned(q), _aligned(k), _aligned(v)
    cfg = _launch_settings(launch_config, tile, q.size(3), q.dtype, arch)
    lists = tile_lists(layout, tile, q.size(2), k.size(2), future, window, q.device)
    settings = (lists, 1 if layout is None else layout.size(0), tile, future, window, scale, cfg)
    return _launch(_sparse_forward, _sparse_backward, (q, k, v), settings)


def _sparse_forward(q, k, v, lists, layout_heads, tile, future, window, scale, cfg):
    """The forward's launch: out (B, H, T, D) and lse2 (B, H, T)."""
    (B, H, T, D), S = q.shape, k.size(2)
    row_ptr, cols, _, _, row_mid, _ = lists
    o = torch.empty_like(q)
    lse2 = torch.empty(B, H, T, device=q.device, dtype=torch.float32)
    _fwd_kernel[(T // cfg["fwd"]["TILE_M"], B * H)](
        q, k, v, o, lse2, row_ptr, row_mid, cols, scale * LOG2E, H, T, S, layout_heads, future,
        window, TILE=tile, D=D, **cfg["fwd"])
    return o, q, k, v, lse2


def _sparse_backward(o, q, k, v, lse2, do, lists, layout_heads, tile, future, window, scale, cfg):
    """The backward's launches: the dQ kernel, which writes delta, then the dK/dV kernel."""
    row_ptr, cols, col_ptr, rows, row_mid, col_mid = lists
    (B, H, T, D), S = q.shape, k.size(2)
    dq, dk, dv, delta = (torch.empty_like(x) for x in (q, k, v, lse2))
    _bwd_dq_kernel[(T // cfg["dq"]["TILE_M"], B * H)](
        q, k, v, o, do, lse2, delta, dq, row_ptr, row_mid, cols, scale * LOG2E, scale, H, T, S,
        layout_heads, future, window, TILE=tile, D=D, **cfg["dq"])
    _bwd_dkdv_kernel[(S // cfg["dkdv"]["TILE_N"], B * H)](
        q, k, v, do, lse2, delta, dk, dv, col_ptr, col_mid, rows, scale * LOG2E, scale, H, T, S,
        layout_heads, future, window, TILE=tile, D=D, **cfg["dkdv"])
    return dq, dk, dv


# (d) The public function, its family's checks, and the SDPA context for decoding loops

last_backend = None  # "triton" or "dense": which path the most recent attention() call used
TRITON_TILES = (16, 32, 64, 128)  # layout tiles the Triton kernels take (64/128 are fast)


def _sparse_unfit(arch, q, k, v, tile):
    """triton_dispatch's family check: why the block-sparse kernels cannot take q, k, v on sm_`arch`, or None."""
    T, S, D = q.size(2), k.size(2), q.size(3)
    if not q.dtype == k.dtype == v.dtype:
        return f"the block-sparse Triton kernels need q, k, v of one dtype; got {q.dtype}, {k.dtype}, {v.dtype}"
    if T % tile or S % tile:
        return (f"the block-sparse Triton kernels need T and S to be multiples of tile={tile}, got T={T}, S={S}; "
                f"pad the sequence")
    if tile not in TRITON_TILES:
        return f"the block-sparse Triton kernels take tiles {TRITON_TILES}, got {tile}"
    if D not in TRITON_HEAD_DIMS:
        return f"the block-sparse Triton kernels take head dims {TRITON_HEAD_DIMS}, got {D}"
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"the block-sparse Triton kernels take fp16/bf16/fp32 inputs, got {q.dtype}"
    return None


def attention(q, k, v, causal=True, layout=None, tile=64, window=None, scale=None, backend=None):
    """Masked softmax attention; q (B, H, T, D), k/v (B, H, S, D) -> (B, H, T, D).

    causal: bottom-right aligned causal mask. layout: optional boolean [H or 1, T/tile, S/tile] tiles to
    compute (rounded up when T or S is not a multiple of tile; the Triton kernels need exact multiples).
    window: query position p sees keys j > p - window only. scale: defaults to 1/sqrt(D). backend: see
    triton_dispatch (the kernels take TRITON_TILES and TRITON_HEAD_DIMS); `last_backend` records the choice."""
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
        shape = (-(-T // tile), -(-S // tile))
        if layout.dim() != 3 or layout.size(0) not in (1, H) or tuple(layout.shape[1:]) != shape:
            raise ValueError(f"layout must have shape (1 or H={H}, {shape[0]}, {shape[1]}) for T={T}, S={S}, "
                             f"tile={tile}; got {tuple(layout.shape)}")
        if (S - T) % tile:
            raise ValueError(f"with a layout, S - T must be a multiple of tile={tile} so the layout's diagonal "
                             f"is the causal one; got T={T}, S={S}")
    runs = triton_dispatch("attention", q, backend, _sparse_unfit, q, k, v, tile)
    last_backend = "triton" if runs else "dense"
    if not runs:
        return dense_attention(q, k, v, causal=causal, layout=layout, tile=tile, window=window, scale=scale)
    future = 0 if causal else S  # the band of the kernels' section comment
    window = S + 1 if window is None else min(window, S + 1)
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    return _sparse_attention(q, k, v, layout, tile, future, window, scale, _arch(q.device))


def decoding_sdpa():
    """A context for decoding loops: SDPA chooses among its flash, memory-efficient and math kernels only (its
    default choice is far slower for each new key length; docs/kernels.md)."""
    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


# ================================================================================================================
# 2. LSH attention (Reformer, Kitaev, Kaiser, Levskaya 2020, arXiv 2001.04451, section 3)
#
# (a) The definition. Per hash round every position carries a bucket id; positions are sorted by (bucket,
# position) and the sorted order is cut into chunks of `chunk` rows. A query's keys in a round, two ways:
# - the paper's (default): the keys of its own and of the previous chunk (the first chunk has none: unlike trax,
#   rounds are not concatenated and nothing wraps around) at an earlier or equal original position. Not causal,
#   in the paper and in trax alike: where a chunk boundary falls depends on how many later positions sort before.
# - causal=True: the `chunk` most recent keys of its own bucket up to itself, a sliding window in sorted order
#   that depends only on positions <= the query. Exactly causal in floating point too: each bucket starts a fresh
#   chunk (empty slots, st = -1, fill the end of its last one), so a query's sums run over earlier positions
#   alone; the window lies in the own and the previous chunk, so the kernels take it unchanged.
# Both are one test on a per-round integer `loc` (sort_by_bucket): key j is in query i's window exactly when
# loc_i - span < loc_j <= loc_i. A query sees itself only when nothing else is left (logit SELF_LOGIT, finite).
# The rounds' outputs o_r combine by their log-sum-exps: out = sum_r softmax_r(lse_r) o_r (combine_rounds). The
# paper's optional masks (off in trax's final code and here by default): same_bucket_mask masks a key of another
# bucket even inside the chunk window (causal implies it); dup_correction lowers the logit of a key seen in c of
# the rounds' windows by log(c), making the output the softmax over the union of the windows. k comes apart from
# q (the Reformer's k is the unit-normalised q); autograd adds the two gradients.

SELF_LOGIT = -5e4  # a query's logit on its own key: finite (the row may have no other key) and in fp16 range
last_lsh_backend = None  # "triton", "cpu" or "dense": which path the most recent lsh_attention call used


def sort_by_bucket(buckets, chunk, same_bucket_mask=False, causal=False):
    """buckets (B, H, R, T) -> st (B, H, R, P), rank, loc (B, H, R, T), span: st[..., s] is the original position
    at sorted index s (-1 for an empty slot), rank[..., t] the sorted index of position t; loc, span in_window's:
    loc is t's chunk, span 2 (own or previous chunk), plus 2 * bucket with same_bucket_mask (other buckets land 2
    or more away, or below). With causal every bucket starts a chunk (P >= T, a multiple of chunk), loc is t's
    sorted index plus chunk * bucket, span chunk (another bucket lands chunk or more away)."""
    T = buckets.shape[-1]
    pos = torch.arange(T, device=buckets.device)
    st = torch.argsort(buckets.long() * T + pos, dim=-1)  # keys are unique, so this is the stable order
    if causal:
        sorted_buckets = buckets.long().gather(-1, st)
        starts = torch.ones_like(st, dtype=torch.bool)
        starts[..., 1:] = sorted_buckets[..., 1:] != sorted_buckets[..., :-1]
        in_bucket = pos - torch.where(starts, pos, 0).cummax(-1).values  # how many earlier positions share it
        # the padded sorted index: the number of chunks begun before, plus the place in the own chunk
        padded = (torch.cumsum(in_bucket % chunk == 0, -1) - 1) * chunk + in_bucket % chunk  # (B, H, R, T)
        P = (int(padded[..., -1].max()) // chunk + 1) * chunk
        rank = torch.empty_like(padded).scatter_(-1, st, padded)  # position st[s] sits at padded[s]
        st = torch.full((*st.shape[:-1], P), -1, dtype=st.dtype, device=st.device).scatter_(-1, padded, st)
        return st, rank, rank + chunk * buckets.long(), chunk
    rank = torch.empty_like(st).scatter_(-1, st, pos.expand_as(st))
    loc = rank // chunk
    if same_bucket_mask:
        loc = loc + 2 * buckets.long()
    return st, rank, loc, 2


def in_window(loc_q, loc_k, span):
    """Whether a key with id loc_k is in the window of a query with id loc_q (compiled: _in_window)."""
    return (loc_k <= loc_q) & (loc_k > loc_q - span)


_in_window = jit(in_window)


def with_previous(x, chunks=3, rows=4):  # each chunk's rows: the previous chunk's, then its own
    return torch.cat([x.roll(1, dims=chunks), x], dim=rows)


def window_masks(st, loc, span, chunk, dup_correction, dtype):
    """Per round and chunk, over its m queries x 2m keys (previous chunk's, then own): which key is the query
    itself (m, 2m), log(count of rounds whose window holds the key) (B, H, R, N, m, 2m) in dtype with
    dup_correction (else 0), and which keys the query may see (B, H, R, N, m, 2m; an empty slot sees itself)."""
    B, H, R, P = st.shape
    N = P // chunk
    qpos = st.view(B, H, R, N, chunk)  # -1 in empty slots
    kpos = with_previous(qpos)  # (B, H, R, N, 2m)
    cols = torch.arange(2 * chunk, device=st.device)
    is_self = cols == cols[:chunk, None] + chunk
    log_count = 0.0
    if dup_correction:
        # loc of query and key rows in every round r2: (B, H, R2, R, N, m or 2m)
        qloc = loc.gather(3, qpos.clamp(min=0).reshape(B, H, 1, -1).expand(B, H, R, -1)).view(B, H, R, R, N, -1)
        kloc = loc.gather(3, kpos.clamp(min=0).reshape(B, H, 1, -1).expand(B, H, R, -1)).view(B, H, R, R, N, -1)
        log_count = in_window(qloc[..., :, None], kloc[..., None, :], span).sum(2).clamp(min=1).to(dtype).log()
    # keys that no query may see (empty slots; the first chunk's previous chunk, which it does not have) and the
    # queries of empty slots move to position P, later than every real query: one comparison masks them all
    first = (cols < chunk) & (torch.arange(N, device=st.device) == 0)[:, None]  # (N, 2m)
    kpos = kpos.masked_fill((kpos < 0) | first, P)
    allowed = kpos[..., None, :] <= qpos.masked_fill(qpos < 0, P)[..., :, None]
    sloc = loc.gather(3, st.clamp(min=0)).view(B, H, R, N, chunk)  # this round's loc of the sorted rows
    # the windows exclude more only where they are not simply the chunks (same_bucket_mask, causal)
    if not torch.equal(sloc, torch.arange(N, device=st.device)[:, None].expand_as(sloc)):
        allowed &= in_window(sloc[..., :, None], with_previous(sloc)[..., None, :], span)
    return is_self, log_count, allowed


def torch_lsh_attention(q, k, v, buckets, chunk, scale=1.0, same_bucket_mask=False, dup_correction=False,
                        causal=False):
    """The plain PyTorch twin: per-round outputs (B, H, R, T, D) and log-sum-exps (B, H, R, T) by sort + gather.
    T must be a multiple of chunk (lsh_attention pads any other length)."""
    B, H, T, D = q.shape
    st, rank, loc, span = sort_by_bucket(buckets, chunk, same_bucket_mask, causal)
    R, P = st.shape[2:]
    N = P // chunk

    def gather_rows(x):  # (B, H, T, E) -> rows in each round's sorted order, chunked: (B, H, R, N, m, E)
        E = x.shape[-1]
        rows = x[:, :, None].expand(B, H, R, T, E).gather(3, st.clamp(min=0)[..., None].expand(B, H, R, P, E))
        return rows.view(B, H, R, N, chunk, E)  # an empty slot holds row 0, masked below

    sq = gather_rows(q)  # (B, H, R, N, m, D)
    sk, sv = with_previous(gather_rows(k)), with_previous(gather_rows(v))  # (B, H, R, N, 2m, D)
    is_self, log_count, allowed = window_masks(st, loc, span, chunk, dup_correction, q.dtype)
    s = (sq @ sk.transpose(-1, -2)) * scale  # (B, H, R, N, m, 2m)
    s = s.masked_fill(is_self, SELF_LOGIT) - log_count
    s = s.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # (B, H, R, N, m)
    so = torch.exp(s - lse[..., None]) @ sv  # (B, H, R, N, m, D)
    o = so.view(B, H, R, P, D).gather(3, rank[..., None].expand(B, H, R, T, D))  # undo the sort
    return o, lse.view(B, H, R, P).gather(3, rank)


def combine_rounds(o, lse):
    """out = sum_r exp(lse_r - logsumexp_r lse_r) o_r: (B, H, R, T, D), (B, H, R, T) -> (B, H, T, D)."""
    w = torch.softmax(lse.to(torch.promote_types(lse.dtype, torch.float32)), dim=2)
    return (o * w[..., None].to(o.dtype)).sum(2)


# (a') On a CPU: each chunk's softmax by PyTorch's fused CPU attention with an additive mask (the self logit
# added, not set: a difference below rounding), which returns each row's log-sum-exp, so no logits are kept. The
# backward takes each round's log-sum-exp, dout * w_r (w_r the round's weight) and the combined output in place
# of the round's: the softmax backward's delta_i = w_r out_i . dout_i carries the round's share. Both go CPU_GROUP
# chunks at a time: the allocator reuses a group's buffers instead of faulting in fresh pages (docs/kernels.md).
_cpu_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_cpu_flash_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
CPU_GROUP = 256  # chunks: a group's additive mask is 8 MiB at m = 64 in float32


def _cpu_lsh_forward(q, k, v, st, rank, allowed, self_bias, scale):
    """The output; saved: q, k, v as rows (B*H*T, D), sorted rows, masks, lse, weights (st, rank are not)."""
    B, H, T, D = q.shape
    R, P = st.shape[2:]
    rows = (st.clamp(min=0) + T * torch.arange(B * H).view(B, H, 1, 1)).view(-1, allowed.size(2))  # (B*H*T)
    q, k, v = (x.reshape(-1, D) for x in (q, k, v))  # (B*H*T, D)
    o, lse = (torch.cat(parts) for parts in zip(*(
        _cpu_flash(rows_at(q, rows[g]), windows_at(k, rows, g), windows_at(v, rows, g), 0.0, False,
                   attn_mask=mask_at(allowed, self_bias, g), scale=scale) for g in groups(rows))))
    w = torch.softmax(lse.view(B, H, R, P).gather(3, rank), dim=2)  # (B, H, R, T): each round's weight
    w = (w.gather(3, st.clamp(min=0)) * (st >= 0)).view(lse.shape)  # in sorted order; 0 in empty slots
    out = torch.zeros(B * H * T, D, dtype=q.dtype)
    out.index_add_(0, rows.view(-1), o.mul_(w[..., None].to(o.dtype)).view(-1, D))  # undo the sort, add rounds
    return out.view(B, H, T, D), q, k, v, rows, allowed, self_bias, lse, w


def _cpu_lsh_backward(out, q, k, v, rows, allowed, self_bias, lse, w, dout, scale):
    """Each row's gradient, summed over the rounds and chunks that hold it."""
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(q), torch.zeros_like(q)  # (B*H*T, D)
    key_rows = with_previous(rows, 0, 1)
    for g in groups(rows):
        gq, gk, gv = _cpu_flash_backward(rows_at(dout, rows[g]) * w[g, ..., None].to(dout.dtype),
                                         rows_at(q, rows[g]), windows_at(k, rows, g), windows_at(v, rows, g),
                                         rows_at(out, rows[g]), lse[g], 0.0, False,
                                         attn_mask=mask_at(allowed, self_bias, g), scale=scale)
        dq.index_add_(0, rows[g].reshape(-1), gq.view(-1, q.size(1)))
        dk.index_add_(0, key_rows[g].reshape(-1), gk.view(-1, q.size(1)))
        dv.index_add_(0, key_rows[g].reshape(-1), gv.view(-1, q.size(1)))
    return dq.view(dout.shape), dk.view(dout.shape), dv.view(dout.shape), None, None, None, None


def groups(rows):  # CPU_GROUP chunks at a time
    return [slice(i, i + CPU_GROUP) for i in range(0, rows.size(0), CPU_GROUP)]


def mask_at(allowed, self_bias, g):
    """The additive mask of chunks g: self_bias (the self logit, minus log_count) where allowed, else -inf."""
    return torch.where(allowed[g], self_bias[g], float("-inf"))


def rows_at(x, rows):
    """Rows of x (B*H*T, D) or (B, H, T, D) at indices rows (chunks, m): (chunks, 1, m, D)."""
    return x.view(-1, x.size(-1)).index_select(0, rows.reshape(-1)).view(rows.size(0), 1, rows.size(1), -1)


def windows_at(x, rows, g):
    """x's (B*H*T, D) keys of chunks rows[g], the previous chunk's rows then its own (with_previous), (n, 1, 2m, D):
    a view of overlapping windows over rows gathered once (the last chunk's before the first, as its previous)."""
    (n, m), D = rows[g].shape, x.size(-1)
    flat = x.index_select(0, torch.cat([rows[g.start - 1], rows[g].reshape(-1)]))
    return flat.as_strided((n, 1, 2 * m, D), (m * D, m * D, D, 1))


def cpu_lsh_attention(q, k, v, buckets, chunk, scale=1.0, same_bucket_mask=False, dup_correction=False,
                      causal=False):
    """The twin's combined output (combine_rounds of torch_lsh_attention), by _cpu_lsh_forward."""
    st, rank, loc, span = sort_by_bucket(buckets, chunk, same_bucket_mask, causal)
    is_self, log_count, allowed = window_masks(st, loc, span, chunk, dup_correction, q.dtype)
    self_bias = (is_self * SELF_LOGIT - log_count).to(q.dtype).expand(allowed.shape)  # a view unless log_count
    window = (-1, 1, chunk, 2 * chunk)
    inputs = (q, k, v, st, rank, allowed.view(window), self_bias.reshape(window))
    return _launch(_cpu_lsh_forward, _cpu_lsh_backward, inputs, (scale,))


# (b) The kernels. Shared by the three: the logits s = scale * q.k of a tile of queries against a tile of keys,
# masked in the twin's order: the self logit; minus log(count of rounds whose window holds the key) with
# dup_correction; -inf for keys later in the original order or outside round r's window. qpos, kpos and k_ok
# broadcast against s (queries x keys, or keys x queries in the dK/dV kernel); LOC is sort_by_bucket's loc.
@jit
def _lsh_mask(s, qpos, kpos, k_ok, LOC, bh, r, R, T, span, self_logit, DUP_CORRECTION: tl.constexpr):
    s = tl.where(kpos == qpos, self_logit, s)
    if DUP_CORRECTION:
        count = tl.zeros(s.shape, dtype=tl.int32)
        for r2 in range(R):
            count += _lsh_window(LOC + (bh * R + r2) * T, qpos, kpos, span).to(tl.int32)
        s = s - tl.log(tl.maximum(count, 1).to(tl.float32))
    allowed = k_ok & (kpos <= qpos) & _lsh_window(LOC + (bh * R + r) * T, qpos, kpos, span)
    return tl.where(allowed, s, float("-inf"))


@jit
def _lsh_window(LOC_ROUND, qpos, kpos, span):
    """Whether each key is in each query's window, for the round whose loc row is LOC_ROUND."""
    return _in_window(tl.load(LOC_ROUND + qpos), tl.load(LOC_ROUND + kpos), span)


@jit
def _sorted_positions(ST_ROUND, idx, ok):
    """The original positions at sorted indices idx of a round (its row of ST), 0 where not real, and which are
    real: ok, and not an empty slot of the causal layout (-1)."""
    pos = tl.load(ST_ROUND + idx, mask=ok, other=-1)
    return tl.maximum(pos, 0), pos >= 0


@jit
def _load_rows(X, base, pos, ok, D: tl.constexpr, TILE_D: tl.constexpr):
    """Rows X[base + pos] of a row-major (.., T, D) tensor, (len(pos), TILE_D) with zeros past D and where not
    ok: the in-kernel gather that replaces a sorted copy."""
    offs_d = tl.arange(0, TILE_D)
    mask = ok[:, None] & (offs_d < D)[None, :]
    return tl.load(X + base + pos[:, None] * D + offs_d[None, :], mask=mask, other=0.0)


@jit
def _store_rows(X, base, pos, ok, x, D: tl.constexpr, TILE_D: tl.constexpr, ACCUMULATE):
    """X[base + pos] = x (plus what X held there when ACCUMULATE), for the rows that are ok."""
    offs_d = tl.arange(0, TILE_D)
    ptrs = X + base + pos[:, None] * D + offs_d[None, :]
    mask = ok[:, None] & (offs_d < D)[None, :]
    if ACCUMULATE:
        x += tl.load(ptrs, mask=mask, other=0.0)
    tl.store(ptrs, x.to(X.dtype.element_ty), mask=mask)


# Triton compiles a kernel of its own for ints equal to 1 or divisible by 16; these need none (D shows alignment)
LSH_SCALARS = ["r", "R", "span", "chunk", "T", "P"]


# Forward, one launch per round r. One program = one chunk c of one (batch, head) bh in round r; grid
# (B*H, P/chunk), P the length of the sorted order (T, or more with the causal layout's empty slots). SRAM: the
# chunk's TILE_M query rows (the chunk rounded up to a power of two, at least 16), then in turn tiles of TILE_N
# key and value rows of the previous and the own chunk, gathered from the unsorted q/k/v through ST, and their
# logits. The round's softmax over the key tiles (from m = -1e30, l = 0, o = 0):
#   m' = max(m, rowmax(s));  l' = l exp(m - m') + rowsum(exp(s - m'));  o' = o exp(m - m') + exp(s - m') v
# then merges into a running max M, sum L (relative to M) and output at the query's original position (in one
# chunk per round, so no two programs of a launch touch the same row):
#   M' = max(M, m);  a = exp(M - M'), b = exp(m - M');  L' = L a + l b;  out' = (out L a + (o / l) l b) / L'
# M and L stay apart, not one log-sum-exp: M is an exact logit, so a row whose only key is itself (SELF_LOGIT =
# -5e4, where an fp32 ulp is 0.004) keeps exact weights. The output is fp32 (ACC) until the last round writes O;
# the (B, H, R, T, D) per-round outputs are never stored.
@jit(do_not_specialize=LSH_SCALARS)
def _lsh_fwd_kernel(Q, K, V, ST, LOC, ACC, O, M, L, r, R, span, chunk, scale, self_logit, T, P,
                    TILE_M: tl.constexpr, TILE_N: tl.constexpr, D: tl.constexpr, TILE_D: tl.constexpr,
                    DUP_CORRECTION: tl.constexpr):
    bh, c = tl.program_id(0).to(tl.int64), tl.program_id(1)
    bhr = bh * R + r  # row of this round in ST (B, H, R, P) and LOC (B, H, R, T)
    offs_m, offs_n = tl.arange(0, TILE_M), tl.arange(0, TILE_N)
    # rows past chunk repeat real ones; like empty slots, they are never stored
    qpos, q_ok = _sorted_positions(ST + bhr * P, c * chunk + offs_m % chunk, offs_m >= 0)
    q_ok &= offs_m < chunk
    q = _load_rows(Q, bh * T * D, qpos, q_ok, D, TILE_D)
    m = tl.full([TILE_M], -1.0e30, tl.float32)
    l = tl.zeros([TILE_M], tl.float32)
    o = tl.zeros([TILE_M, TILE_D], tl.float32)
    for start in range((c - 1) * chunk, (c + 1) * chunk, TILE_N):  # keys: the previous chunk, then this one
        k_idx = start + offs_n  # sorted indices
        kpos, k_ok = _sorted_positions(ST + bhr * P, k_idx, (k_idx >= 0) & (k_idx < (c + 1) * chunk))
        k = _load_rows(K, bh * T * D, kpos, k_ok, D, TILE_D)
        v = _load_rows(V, bh * T * D, kpos, k_ok, D, TILE_D)
        s = _lsh_mask(tl.dot(q, tl.trans(k)) * scale, qpos[:, None], kpos[None, :], k_ok[None, :], LOC, bh, r, R,
                      T, span, self_logit, DUP_CORRECTION)
        m_new = tl.maximum(m, tl.max(s, 1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new[:, None])
        l = l * alpha + tl.sum(p, 1)
        o = o * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m = m_new
    l = tl.where(q_ok, l, 1.0)  # an empty slot's row saw no key: kept finite, never stored
    out = o / l[:, None]
    if r > 0:  # merge with the rounds before (every round has the self logit, so M is finite)
        m_before = tl.load(M + bh * T + qpos)
        l_before = tl.load(L + bh * T + qpos)
        m_new = tl.maximum(m_before, m)
        a = l_before * tl.exp(m_before - m_new)
        b = l * tl.exp(m - m_new)
        out = (_load_rows(ACC, bh * T * D, qpos, q_ok, D, TILE_D) * a[:, None] + out * b[:, None]) \
            / (a + b)[:, None]
        m, l = m_new, a + b
    if r == R - 1:
        _store_rows(O, bh * T * D, qpos, q_ok, out, D, TILE_D, False)
    else:
        _store_rows(ACC, bh * T * D, qpos, q_ok, out, D, TILE_D, False)
    tl.store(M + bh * T + qpos, m, mask=q_ok)
    tl.store(L + bh * T + qpos, l, mask=q_ok)


# The backward needs no per-round quantity: the combined output is one softmax over all rounds' windows,
# out_i = sum_r sum_j P_rij v_j with P_rij = exp(s_rij - M_i) / L_i. So, with delta_i = out_i . dout_i:
#   dv_j = sum_ri P_rij dout_i;  dS_rij = P_rij (dout_i . v_j - delta_i);
#   dk_j = scale * sum_ri dS_rij q_i;  dq_i = scale * sum_rj dS_rij k_j
# One launch per round adds its terms into fp32 (B, H, T, D) accumulators; the programs of a launch own
# disjoint rows, so the read-add-write needs no atomics and is deterministic.
#
# dK and dV. One program = the keys of chunk c of (bh, round r); grid (B*H, P/chunk). The queries that see them
# are those of chunks c and c+1, so one program gives a key row the round's whole gradient. SRAM: TILE_M key and
# value rows, then in turn tiles of TILE_N query and dout rows of those chunks with their M, L and delta; the
# logits transposed, (keys, queries), as in _bwd_dkdv_kernel.
@jit(do_not_specialize=LSH_SCALARS)
def _lsh_bwd_dkdv_kernel(Q, K, V, ST, LOC, DO, M, L, DELTA, DK, DV, r, R, span, chunk, scale, self_logit, T, P,
                         TILE_M: tl.constexpr, TILE_N: tl.constexpr, D: tl.constexpr, TILE_D: tl.constexpr,
                         DUP_CORRECTION: tl.constexpr):
    bh, c = tl.program_id(0).to(tl.int64), tl.program_id(1)
    bhr = bh * R + r
    offs_m, offs_n = tl.arange(0, TILE_M), tl.arange(0, TILE_N)
    kpos, k_ok = _sorted_positions(ST + bhr * P, c * chunk + offs_m, offs_m < chunk)
    k = _load_rows(K, bh * T * D, kpos, k_ok, D, TILE_D)
    v = _load_rows(V, bh * T * D, kpos, k_ok, D, TILE_D)
    dk, dv = tl.zeros([TILE_M, TILE_D], tl.float32), tl.zeros([TILE_M, TILE_D], tl.float32)
    for start in range(c * chunk, (c + 2) * chunk, TILE_N):  # queries: this chunk, then the next one
        q_idx = start + offs_n  # sorted indices
        qpos, q_ok = _sorted_positions(ST + bhr * P, q_idx, (q_idx < P) & (q_idx < (c + 2) * chunk))
        q = _load_rows(Q, bh * T * D, qpos, q_ok, D, TILE_D)
        do = _load_rows(DO, bh * T * D, qpos, q_ok, D, TILE_D)
        m = tl.load(M + bh * T + qpos, mask=q_ok, other=float("inf"))  # +inf: absent queries get P = 0
        l = tl.load(L + bh * T + qpos, mask=q_ok, other=1.0)
        delta = tl.load(DELTA + bh * T + qpos, mask=q_ok, other=0.0)
        sT = _lsh_mask(tl.dot(k, tl.trans(q)) * scale, qpos[None, :], kpos[:, None], k_ok[:, None], LOC, bh, r, R,
                       T, span, self_logit, DUP_CORRECTION)  # (TILE_M keys, TILE_N queries)
        pT = tl.exp(sT - m[None, :]) / l[None, :]
        dv += tl.dot(pT.to(do.dtype), do)
        dsT = pT * (tl.dot(v, tl.trans(do)) - delta[None, :])
        dk += tl.dot(dsT.to(q.dtype), q)
    _store_rows(DK, bh * T * D, kpos, k_ok, dk * scale, D, TILE_D, r > 0)
    _store_rows(DV, bh * T * D, kpos, k_ok, dv, D, TILE_D, r > 0)


# dQ. One program = the queries of chunk c of (bh, round r); grid (B*H, P/chunk); the forward's tiles plus the
# queries' dout, M, L and delta.
@jit(do_not_specialize=LSH_SCALARS)
def _lsh_bwd_dq_kernel(Q, K, V, ST, LOC, DO, M, L, DELTA, DQ, r, R, span, chunk, scale, self_logit, T, P,
                       TILE_M: tl.constexpr, TILE_N: tl.constexpr, D: tl.constexpr, TILE_D: tl.constexpr,
                       DUP_CORRECTION: tl.constexpr):
    bh, c = tl.program_id(0).to(tl.int64), tl.program_id(1)
    bhr = bh * R + r
    offs_m, offs_n = tl.arange(0, TILE_M), tl.arange(0, TILE_N)
    qpos, q_ok = _sorted_positions(ST + bhr * P, c * chunk + offs_m, offs_m < chunk)
    q = _load_rows(Q, bh * T * D, qpos, q_ok, D, TILE_D)
    do = _load_rows(DO, bh * T * D, qpos, q_ok, D, TILE_D)
    m = tl.load(M + bh * T + qpos, mask=q_ok, other=float("inf"))
    l = tl.load(L + bh * T + qpos, mask=q_ok, other=1.0)
    delta = tl.load(DELTA + bh * T + qpos, mask=q_ok, other=0.0)
    dq = tl.zeros([TILE_M, TILE_D], tl.float32)
    for start in range((c - 1) * chunk, (c + 1) * chunk, TILE_N):
        k_idx = start + offs_n
        kpos, k_ok = _sorted_positions(ST + bhr * P, k_idx, (k_idx >= 0) & (k_idx < (c + 1) * chunk))
        k = _load_rows(K, bh * T * D, kpos, k_ok, D, TILE_D)
        v = _load_rows(V, bh * T * D, kpos, k_ok, D, TILE_D)
        s = _lsh_mask(tl.dot(q, tl.trans(k)) * scale, qpos[:, None], kpos[None, :], k_ok[None, :], LOC, bh, r, R,
                      T, span, self_logit, DUP_CORRECTION)
        p = tl.exp(s - m[:, None]) / l[:, None]
        ds = p * (tl.dot(do, tl.trans(v)) - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k)
    _store_rows(DQ, bh * T * D, qpos, q_ok, dq * scale, D, TILE_D, r > 0)


# Backward, delta_i = out_i . dout_i in fp32, for the two kernels above. One program per TILE_M rows of the
# row-major (n_rows, D) out and dout; grid (n_rows / TILE_M).
@jit(do_not_specialize=["n_rows"])
def _delta_kernel(O, DO, DELTA, n_rows, D: tl.constexpr, TILE_D: tl.constexpr, TILE_M: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * TILE_M + tl.arange(0, TILE_M)
    offs_d = tl.arange(0, TILE_D)
    ok = (rows < n_rows)[:, None] & (offs_d < D)[None, :]
    o = tl.load(O + rows[:, None] * D + offs_d[None, :], mask=ok, other=0.0)
    do = tl.load(DO + rows[:, None] * D + offs_d[None, :], mask=ok, other=0.0)
    tl.store(DELTA + rows, tl.sum(o.to(tl.float32) * do.to(tl.float32), 1), mask=rows < n_rows)


# (c) The launcher: a launch per round, forward and backward (the rows' M and L carry the merge between them).

def lsh_launch_config(chunk, D, dtype, arch, dup_correction):
    """The LSH kernels' launch settings on sm_`arch` (None: the interpreter): a program's rows TILE_M (the chunk),
    the width TILE_N of the tiles it walks, the padded head dim TILE_D (tl.dot needs 16 or more: smaller or odd
    sizes are padded and masked), warps and stages; docs/kernels.md says how they were chosen."""
    tile_m, tile_d = max(16, triton.next_power_of_2(chunk)), max(16, triton.next_power_of_2(D))
    tile_n = 32
    if (arch or 90) == 90:  # 16 leaves room for dup_correction's count tile beside (64, 128) rows
        tile_n = 64 if tile_d <= 64 else 16 if dup_correction and tile_m * tile_d >= 8192 else 32
    tile_n = min(tile_m, tile_n)
    tile_bytes = tile_m * tile_d * dtype.itemsize
    warps = 8 if tile_bytes > 8192 or dup_correction and tile_m >= 64 else 4  # where 4 spill
    return dict(TILE_M=tile_m, TILE_N=tile_n, TILE_D=tile_d, num_warps=warps, num_stages=1)  # walks 2 chunks


def _lsh_attention_triton(q, k, v, buckets, chunk, scale, same_bucket_mask, dup_correction, causal, arch):
    """lsh_attention's Triton path after its checks and padding, for sm_`arch`."""
    q, k, v = _aligned(q), _aligned(k), _aligned(v)
    st, _, loc, span = sort_by_bucket(buckets, chunk, same_bucket_mask, causal)
    st, loc = st.to(torch.int32).contiguous(), loc.to(torch.int32).contiguous()
    cfg = _launch_settings(lsh_launch_config, chunk, q.size(3), q.dtype, arch, dup_correction)
    return _launch(_lsh_forward, _lsh_backward, (q, k, v, st, loc), (span, chunk, scale, dup_correction, cfg))


def _lsh_forward(q, k, v, st, loc, span, chunk, scale, dup_correction, cfg):
    """The forward launches, round by round: the output (B, H, T, D) and the rows' running max and sum m, l
    (B, H, T), for T a multiple of chunk and st, loc from sort_by_bucket (int32)."""
    B, H, T, D = q.shape
    R, P = st.shape[2:]
    out = torch.empty_like(q)
    acc = torch.empty(B, H, T, D, device=q.device, dtype=torch.float32) if R > 1 else out
    m, l = (torch.empty(B, H, T, device=q.device, dtype=torch.float32) for _ in range(2))
    for r in range(R):
        _lsh_fwd_kernel[(B * H, P // chunk)](q, k, v, st, loc, acc, out, m, l, r, R, span, chunk, scale, SELF_LOGIT,
                                             T, P, D=D, DUP_CORRECTION=dup_correction, **cfg)
    return out, q, k, v, st, loc, m, l


def _lsh_backward(out, q, k, v, st, loc, m, l, do, span, chunk, scale, dup_correction, cfg):
    """The backward launches: delta, then per round the dK/dV and the dQ kernel; dq, dk, dv."""
    B, H, T, D = q.shape
    R, P = st.shape[2:]
    delta = torch.empty(B, H, T, device=q.device, dtype=torch.float32)
    _delta_kernel[(triton.cdiv(B * H * T, 64),)](out, do, delta, B * H * T, D=D,
                                                 TILE_D=triton.next_power_of_2(D), TILE_M=64)
    grads = [torch.empty_like(q) for _ in range(3)]  # dq, dk, dv
    # The rounds add up in fp32; for 16-bit inputs a quarter of the heads at a time: three fp32 (B, H, T, D)
    # buffers at once would be the largest item of a long sequence's peak memory.
    group = B * H if q.dtype == torch.float32 else -(-B * H // 4)
    for g in range(0, B * H, group):  # (B * H, ...) views
        part = [x.flatten(0, 1)[g:g + group] for x in (q, k, v, st, loc, do, m, l, delta)]
        out = [x.flatten(0, 1)[g:g + group] for x in grads]
        acc = out if q.dtype == torch.float32 else [torch.empty_like(x, dtype=torch.float32) for x in out]
        grid = (part[0].size(0), P // chunk)
        for r in range(R):
            scalars = (r, R, span, chunk, scale, SELF_LOGIT, T, P)
            _lsh_bwd_dkdv_kernel[grid](*part, acc[1], acc[2], *scalars, D=D, DUP_CORRECTION=dup_correction, **cfg)
            _lsh_bwd_dq_kernel[grid](*part, acc[0], *scalars, D=D, DUP_CORRECTION=dup_correction, **cfg)
        if acc is not out:  # 16-bit inputs: their fp32 sums back into the gradients
            for o, a in zip(out, acc):
                o.copy_(a)
        del acc  # before the next group's buffers: one group's at a time
    return *grads, None, None


# (d) The public function and its family's checks

def _lsh_unfit(arch, dtype, D, chunk, dup_correction):
    """triton_dispatch's family check: why the LSH kernels cannot take these inputs on sm_`arch`, or None."""
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"the LSH Triton kernels take fp16/bf16/fp32 inputs, got {dtype}"
    if chunk > 64:
        return (f"the LSH Triton kernels take chunks of at most 64 (a program holds chunk x chunk logit tiles in "
                f"registers; 128 spills them), got {chunk}")
    if D > 128 or (dtype == torch.float32 and D > (32 if dup_correction else 64)):
        return (f"the LSH Triton kernels take head dims up to 128, in fp32 up to 64, 32 with dup_correction (wider "
                f"fp32 rows overflow shared memory or registers; use bf16 autocast), got {D} in {dtype}")
    if arch is not None and D not in TRITON_HEAD_DIMS:
        return f"the LSH Triton kernels take head dims {TRITON_HEAD_DIMS} on a GPU (those are compile-checked), got {D}"
    return None


def lsh_attention(q, k, v, buckets, chunk, scale=1.0, same_bucket_mask=False, dup_correction=False, causal=False,
                  backend=None):
    """LSH attention with rounds combined: q, k, v (B, H, T, D), buckets (B, H, R, T) ints -> (B, H, T, D).

    Any T (padded inside; the output is the unpadded sequence's, its last chunk shorter). causal=True: each query
    attends to the chunk most recent keys of its own bucket, exactly causal (the section comment). Triton on CUDA,
    cpu_lsh_attention on a CPU, the twin (torch_lsh_attention + combine_rounds) elsewhere; backend='triton' or
    'dense' (the twin) forces one and last_lsh_backend says which ran."""
    global last_lsh_backend
    runs = triton_dispatch("LSH attention", q, backend, _lsh_unfit, q.dtype, q.size(-1), chunk, dup_correction)
    on_cpu = not runs and q.device.type == "cpu" and backend != "dense"
    last_lsh_backend = "triton" if runs else "cpu" if on_cpu else "dense"
    T, pad = q.size(2), -q.size(2) % chunk
    if pad:  # zero rows in a bucket after every real one: they sort after all real positions, which keep the
        # chunks of the unpadded sequence, and are later than all, so never a real query's key
        q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
        buckets = torch.cat([buckets, (buckets.amax() + 1).expand(*buckets.shape[:3], pad)], dim=-1)
    mode = (same_bucket_mask, dup_correction, causal)
    if not runs and not on_cpu:
        return combine_rounds(*torch_lsh_attention(q, k, v, buckets, chunk, scale, *mode))[:, :, :T]
    k, v = k.to(q.dtype), v.to(q.dtype)
    if on_cpu:
        return cpu_lsh_attention(q, k, v, buckets, chunk, scale, *mode)[:, :, :T]
    return _lsh_attention_triton(q, k, v, buckets, chunk, scale, *mode, _arch(q.device))[:, :, :T]


# ================================================================================================================
# 3. AFT sums (Zhai et al. 2021, arXiv 2105.14103; aft.py holds the model and the PyTorch path)
#
# (a) The definition. Per row t and feature c:
#     o_t = sum_{t' <= t} exp(z) V_t' / sum_{t' <= t} exp(z),   z = K_t' + w_{t,t'}
# where w is band[g, t, t - t'] for lags below s (g = c // (C / G) the feature's group: AFT-conv's head) and 0
# beyond: AFT-local and -conv, and AFT-simple with s = 0. The PyTorch twin is aft.py's (aft_simple, aft_banded):
# running sums and scans, the path everywhere but CUDA; the tests hold the kernels to it.
#
# (b) The kernels. Row t's far keys (t' <= t - s, bias 0) enter as running sums, the s keys of its window one by
# one. A sum is a part as in aft.py: a stabiliser ref and two sums x, y referred to it; two parts merge by
# referring both to the larger ref (the online softmax):
#     ref = max(ref_a, ref_b);   x = x_a exp(ref_a - ref) + x_b exp(ref_b - ref);   y likewise
# Row t reads keys <= t alone, and a key it does not read never enters its sums: exactly causal in every bit.
# All arithmetic is float32 (float64 for float64 inputs, in the interpreter).

@jit
def _merge_parts(ref_a, x_a, y_a, ref_b, x_b, y_b):
    """Two parts (ref, x, y) -> their union, referred to the larger ref; ref = -inf is a part with no term."""
    ref = tl.maximum(ref_a, ref_b)
    finite = tl.where(ref == float("-inf"), 0.0, ref)
    a, b = tl.exp(ref_a - finite), tl.exp(ref_b - finite)
    return ref, x_a * a + x_b * b, y_a * a + y_b * b


@jit
def _aft_tile(X, b, rows, cols, T, C, other, ok, DT: tl.constexpr):
    """X[b, rows, cols] of a (B, T, C) tensor as DT, `other` outside 0 <= rows < T (and where ok is False)."""
    mask = ok & (rows >= 0)[:, None] & (rows < T)[:, None] & (cols < C)[None, :]
    return tl.load(X + b * T * C + rows[:, None] * C + cols[None, :], mask=mask, other=other).to(DT)


# Forward carry. One program walks the chunks of CHUNK rows in order for TILE_C features of one batch row:
# grid (C / TILE_C, B). Per chunk it stores the part (ref, x = sum e^K V, y = sum e^K) of the far keys of the
# rows before it, then merges in the chunk's own far keys t - s.
@jit
def _aft_fwd_carry_kernel(K, V, CARRY, T, C, s, n_chunks, CHUNK: tl.constexpr, TILE_C: tl.constexpr,
                          F64: tl.constexpr):
    DT: tl.constexpr = tl.float64 if F64 else tl.float32
    cb, b = tl.program_id(0), tl.program_id(1)
    cols = cb * TILE_C + tl.arange(0, TILE_C)
    ref = tl.full((TILE_C,), float("-inf"), DT)
    x, y = tl.zeros((TILE_C,), DT), tl.zeros((TILE_C,), DT)
    for i in range(n_chunks):
        out = CARRY + ((b * n_chunks + i) * 3) * C + cols  # (B, n_chunks, 3, C): the far keys before chunk i's
        tl.store(out, ref, mask=cols < C)
        tl.store(out + C, x, mask=cols < C)
        tl.store(out + 2 * C, y, mask=cols < C)
        keys = i * CHUNK - s + tl.arange(0, CHUNK)  # the far keys of chunk i's rows t, t' = t - s
        k = _aft_tile(K, b, keys, cols, T, C, float("-inf"), True, DT)
        v = _aft_tile(V, b, keys, cols, T, C, 0.0, True, DT)
        top = tl.max(k, axis=0)
        e = tl.exp(k - tl.where(top == float("-inf"), 0.0, top)[None, :])
        ref, x, y = _merge_parts(ref, x, y, top, tl.sum(e * v, axis=0), tl.sum(e, axis=0))


# Forward. One program = CHUNK rows and TILE_C features of one batch row: grid (C / TILE_C, chunks, B). It
# scans its rows' far keys (tl.associative_scan of the merge) after the carry, adds the window's s terms
# e^(K_t' + w) in two passes (the row's largest term, then the sums under it) and stores o = x / y and
# lse = log of the sum of e^z.
@jit
def _aft_fwd_kernel(K, V, W, CARRY, O, LSE, T, C, s, n_chunks, w_group, w_row, group_size,
                    CHUNK: tl.constexpr, TILE_C: tl.constexpr, F64: tl.constexpr):
    DT: tl.constexpr = tl.float64 if F64 else tl.float32
    cb, i, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = i * CHUNK + tl.arange(0, CHUNK)
    cols = cb * TILE_C + tl.arange(0, TILE_C)
    carry = CARRY + ((b * n_chunks + i) * 3) * C + cols
    ref_c = tl.load(carry, mask=cols < C, other=float("-inf")).to(DT)
    x_c = tl.load(carry + C, mask=cols < C, other=0.0).to(DT)
    y_c = tl.load(carry + 2 * C, mask=cols < C, other=0.0).to(DT)
    # the keys beyond the window: running sums over t' = t - s of this chunk, after the carry
    k = _aft_tile(K, b, rows - s, cols, T, C, float("-inf"), True, DT)
    v = _aft_tile(V, b, rows - s, cols, T, C, 0.0, True, DT)
    ref, x, y = tl.associative_scan((k, v, tl.where(k == float("-inf"), 0.0, 1.0).to(DT)), 0, _merge_parts)
    ref, x, y = _merge_parts(ref_c[None, :], x_c[None, :], y_c[None, :], ref, x, y)
    # the window: lags j < s with their bias, first the row's largest term, then the sums under it
    w = W + ((cb * TILE_C) // group_size) * w_group + rows * w_row  # (CHUNK,) pointers to band[g, t, 0]
    top = ref
    for j in range(s):
        z = _aft_tile(K, b, rows - j, cols, T, C, float("-inf"), True, DT)
        top = tl.maximum(top, z + tl.load(w + j, mask=(rows < T) & (rows >= j), other=0.0).to(DT)[:, None])
    top = tl.where(top == float("-inf"), 0.0, top)  # only rows past the end have no term
    scale = tl.exp(ref - top)
    num, den = x * scale, y * scale
    for j in range(s):
        z = _aft_tile(K, b, rows - j, cols, T, C, float("-inf"), True, DT)
        e = tl.exp(z + tl.load(w + j, mask=(rows < T) & (rows >= j), other=0.0).to(DT)[:, None] - top)
        num += e * _aft_tile(V, b, rows - j, cols, T, C, 0.0, True, DT)
        den += e
    ok = (rows < T)[:, None] & (cols < C)[None, :]
    offsets = b * T * C + rows[:, None] * C + cols[None, :]
    tl.store(O + offsets, num / den, mask=ok)
    tl.store(LSE + offsets, top + tl.log(den), mask=ok)


# Backward carry: the forward carry's mirror, from the last chunk. Row t weighs key t' by e^(K_t' - lse_t), so
# per chunk of keys t' it stores the part of the far rows after its own (t >= t' + s) of e^-lse dO and
# e^-lse dO o, then merges in the chunk's own far rows t' + s.
@jit
def _aft_bwd_carry_kernel(LSE, O, DO, CARRY, T, C, s, n_chunks, CHUNK: tl.constexpr, TILE_C: tl.constexpr,
                          F64: tl.constexpr):
    DT: tl.constexpr = tl.float64 if F64 else tl.float32
    cb, b = tl.program_id(0), tl.program_id(1)
    cols = cb * TILE_C + tl.arange(0, TILE_C)
    ref = tl.full((TILE_C,), float("-inf"), DT)
    x, y = tl.zeros((TILE_C,), DT), tl.zeros((TILE_C,), DT)
    for n in range(n_chunks):
        i = n_chunks - 1 - n
        out = CARRY + ((b * n_chunks + i) * 3) * C + cols  # the far rows after chunk i's
        tl.store(out, ref, mask=cols < C)
        tl.store(out + C, x, mask=cols < C)
        tl.store(out + 2 * C, y, mask=cols < C)
        rows = i * CHUNK + s + tl.arange(0, CHUNK)  # the rows t = t' + s of chunk i's keys t'
        neg_lse = -_aft_tile(LSE, b, rows, cols, T, C, float("inf"), True, DT)
        do = _aft_tile(DO, b, rows, cols, T, C, 0.0, True, DT)
        top = tl.max(neg_lse, axis=0)
        e = tl.exp(neg_lse - tl.where(top == float("-inf"), 0.0, top)[None, :]) * do
        ref, x, y = _merge_parts(ref, x, y, top, tl.sum(e, axis=0),
                                 tl.sum(e * _aft_tile(O, b, rows, cols, T, C, 0.0, True, DT), axis=0))


# Backward. One program = CHUNK keys and TILE_C features of one batch row, last key first: grid as the
# forward's. The suffix scan of its keys' far rows after the carry gives, with f = e^(K_t' + ref),
# dv = f x and dk = f (v x - y); the rows t' + j inside the window (j < s) add p dO and p dO (v - o), p =
# e^(z - lse_t), and dw's sums over the program's features (summed over the batch by the launcher).
@jit
def _aft_bwd_kernel(K, V, W, O, LSE, DO, CARRY, DK, DV, DW, T, C, s, n_chunks, w_group, w_row, group_size,
                    CHUNK: tl.constexpr, TILE_C: tl.constexpr, F64: tl.constexpr):
    DT: tl.constexpr = tl.float64 if F64 else tl.float32
    cb, i, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    keys = i * CHUNK + CHUNK - 1 - tl.arange(0, CHUNK)  # last first: the scan below runs to earlier keys
    cols = cb * TILE_C + tl.arange(0, TILE_C)
    carry = CARRY + ((b * n_chunks + i) * 3) * C + cols
    ref_c = tl.load(carry, mask=cols < C, other=float("-inf")).to(DT)
    x_c = tl.load(carry + C, mask=cols < C, other=0.0).to(DT)
    y_c = tl.load(carry + 2 * C, mask=cols < C, other=0.0).to(DT)
    # the rows t >= t' + s, which weigh key t' by exp(K_t' - lse_t): suffix sums of exp(-lse) dO and exp(-lse) dO o
    neg_lse = -_aft_tile(LSE, b, keys + s, cols, T, C, float("inf"), True, DT)
    do = _aft_tile(DO, b, keys + s, cols, T, C, 0.0, True, DT)
    do_o = do * _aft_tile(O, b, keys + s, cols, T, C, 0.0, True, DT)
    ref, x, y = tl.associative_scan((neg_lse, do, do_o), 0, _merge_parts)
    ref, x, y = _merge_parts(ref_c[None, :], x_c[None, :], y_c[None, :], ref, x, y)
    k = _aft_tile(K, b, keys, cols, T, C, 0.0, True, DT)
    v = _aft_tile(V, b, keys, cols, T, C, 0.0, True, DT)
    f = tl.exp(k + ref)  # <= 1: every such row's lse includes exp(K_t')
    dv = f * x
    dk = f * (v * x - y)
    # the rows t' + j inside the window, with their bias
    key_ok = keys < T
    w = W + ((cb * TILE_C) // group_size) * w_group + keys * w_row
    for j in range(s):
        row_ok = key_ok & (keys + j < T)
        z = k + tl.load(w + j * w_row + j, mask=row_ok, other=0.0).to(DT)[:, None]
        p = tl.exp(z - _aft_tile(LSE, b, keys + j, cols, T, C, float("inf"), key_ok[:, None], DT))
        do = _aft_tile(DO, b, keys + j, cols, T, C, 0.0, key_ok[:, None], DT)
        dz = p * do * (v - _aft_tile(O, b, keys + j, cols, T, C, 0.0, key_ok[:, None], DT))
        dv += p * do
        dk += dz
        # (B, n_tiles, T, s): this program's sum over its features of dw[g, t' + j, j]
        tl.store(DW + ((b * tl.num_programs(0) + cb) * T + keys + j) * s + j, tl.sum(dz, axis=1), mask=row_ok)
    ok = key_ok[:, None] & (cols < C)[None, :]
    offsets = b * T * C + keys[:, None] * C + cols[None, :]
    tl.store(DK + offsets, dk.to(DK.dtype.element_ty), mask=ok)
    tl.store(DV + offsets, dv.to(DV.dtype.element_ty), mask=ok)


# (c) The launcher: a carry launch, then the main launch, forward and backward.

def aft_launch_config(C, group_size):
    """Rows and features of a program: CHUNK = 64 positions, TILE_C up to 64 features (128 bytes of float32 per
    row), a power of two dividing the feature group's size so that a program reads one group's band."""
    return dict(CHUNK=64, TILE_C=min(64, group_size & -group_size, triton.next_power_of_2(C)), num_warps=8)


def _aft_triton(k, v, band):
    """aft_sums after its check."""
    acc = torch.float64 if k.dtype == torch.float64 else torch.float32
    band = k.new_zeros(1, 1, 0, dtype=acc) if band is None else band.to(acc)  # s = 0: AFT-simple
    cfg = _launch_settings(aft_launch_config, k.size(2), k.size(2) // band.size(0))
    cfg = dict(cfg, F64=acc == torch.float64)
    return _launch(_aft_forward, _aft_backward, (_aligned(k), _aligned(v.to(k.dtype)), band), (cfg,))


def _aft_forward(k, v, band, cfg):
    """The carry launch and the main launch: o and lse (B, T, C) in band's dtype."""
    (B, T, C), (G, _, s) = k.shape, band.shape
    n_chunks, n_tiles = -(-T // cfg["CHUNK"]), -(-C // cfg["TILE_C"])
    carry = torch.empty(B, n_chunks, 3, C, device=k.device, dtype=band.dtype)
    o, lse = (torch.empty(B, T, C, device=k.device, dtype=band.dtype) for _ in range(2))
    _aft_fwd_carry_kernel[(n_tiles, B)](k, v, carry, T, C, s, n_chunks, **cfg)
    _aft_fwd_kernel[(n_tiles, n_chunks, B)](k, v, band, carry, o, lse, T, C, s, n_chunks,
                                            band.stride(0), band.stride(1), C // G, **cfg)
    return o, k, v, band, lse


def _aft_backward(o, k, v, band, lse, do, cfg):
    """The backward's carry launch and main launch: dk, dv, and dband from per-program sums."""
    (B, T, C), (G, _, s) = k.shape, band.shape
    n_chunks, n_tiles = -(-T // cfg["CHUNK"]), -(-C // cfg["TILE_C"])
    carry = torch.empty(B, n_chunks, 3, C, device=k.device, dtype=lse.dtype)
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    dw = torch.zeros(B, n_tiles, T, s, device=k.device, dtype=lse.dtype)  # a sum per program
    _aft_bwd_carry_kernel[(n_tiles, B)](lse, o, do, carry, T, C, s, n_chunks, **cfg)
    _aft_bwd_kernel[(n_tiles, n_chunks, B)](k, v, band, o, lse, do, carry, dk, dv, dw, T, C, s,
                                            n_chunks, band.stride(0), band.stride(1), C // G, **cfg)
    return dk, dv, dw.view(B, G, n_tiles // G, T, s).sum((0, 2))


# (d) The public function and its family's checks

def aft_unfit(arch, k, band=None):
    """triton_dispatch's family check (aft.py's too): why the AFT kernels cannot take k (B, T, C) and band
    (G, T, s) or None on sm_`arch`, or None."""
    B, T, C = k.shape
    G, s = (1, 0) if band is None else (band.size(0), band.size(2))
    if C % G:
        return f"the AFT band's {G} feature groups must divide the {C} features"
    partials = B * C // aft_launch_config(C, C // G)["TILE_C"] * T * s  # the backward's dw sums per program
    if max(k.numel(), partials) >= 2**31:
        return (f"the AFT Triton kernels index in 32 bits: B * T * C ({k.numel()}) and B * T * window * C / 64 "
                f"({partials}) must stay below 2^31")
    if k.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        return f"the AFT Triton kernels take fp16/bf16/fp32/fp64 inputs, got {k.dtype}"
    if arch is not None and k.dtype == torch.float64:
        return "the AFT Triton kernels take fp64 in the interpreter only (the tests'); on a GPU fp16/bf16/fp32"
    return None


def aft_sums(k, v, band=None):
    """The causal AFT sums o_t of the section's definition, by the Triton kernels only (aft.py holds the PyTorch
    path and calls triton_dispatch to choose): k, v (B, T, C), band None (w = 0, AFT-simple) or (G, T, s) ->
    o (B, T, C) in float32 (float64 for float64 inputs), the precision of all its arithmetic."""
    triton_dispatch("AFT", k, "triton", aft_unfit, k, band)  # a ValueError says why the kernels cannot run
    return _aft_triton(k, v, band)
