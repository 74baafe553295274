"""
Attention Free Transformer (Zhai, Talbott, Srivastava, Huang, Goh, Zhang, Susskind 2021, "An Attention
Free Transformer", arXiv 2105.14103): the Transformer of sparse_transformer.py with dot-product attention
replaced by an element-wise operation. With Q = X Wq, K = X Wk, V = X Wv (all of width d) and a learned
pairwise position bias w, causal AFT-full (section 3, sums over t' <= t) is

    Y_t = sigmoid(Q_t) * sum_t' exp(K_t' + w_{t,t'}) * V_t' / sum_t' exp(K_t' + w_{t,t'})

element-wise over the d features: every feature is a "head" of its own whose weights over the past are
softmax_t'(K_t' + w_{t,t'}); no T x T x d tensor is ever needed. Config.variant picks one of:

- "full":   w is a [block_size, block_size] parameter, or the paper's factorisation w = w_u w_v^T of
            rank `w_rank` (64 on CIFAR-10, 256 on enwik8). O(T^2 d), as products of blocks of w.
- "simple": w = 0. Running sums along time, O(T d).
- "local":  w_{t,t'} learned for t - t' < window and 0 (not -inf) beyond, so the whole past still counts
            through the w = 0 term; w stored as its band [block_size, window] or factorised as for full.
            Running sums plus a band of `window` terms, O(T s d).
- "conv":   n_head heads; per head a causal kernel of length `window` is the bias inside the window,
            w_{t,t'} = kernel_h[t - t'], and 0 beyond: the paper's numerator conv(exp(K) * V, exp(w) - 1) +
            sum(exp(K) * V), its denominator the same with exp(K). The kernel is reparameterised per head as
            gain * (kernel - mean) / std + bias, gain = bias = 0 at the start (the layer starts as AFT-simple);
            docs/design.md says what of this is checked against the paper.

Numerics: the exps run in float32 at least (also under autocast), and every output is computed from the
positions <= t alone: a later token changes no earlier output, not even in the last bit, at any scale of the
keys. Sums are carried as parts: per row and feature a detached stabiliser ref and the sums of
exp(K + w - ref) [V, 1] over a set of keys, with a denominator of at least 1; two parts merge by referring
both to the larger ref, as online softmax does (merge). AFT-simple's running sums are a scan of merges, up
and down a binary tree (log2 T rounds, O(T d)). Terms with a bias come in blocks of keys that all precede a
block of rows, stabilised by the keys' maximum per feature plus each row's largest bias, which every row of
the block may know, so one matrix product serves the whole block; the earlier keys of a row's own block
come in log2 levels of halves (runs of 2, 4, 8, ... positions). AFT-full is those levels over the whole
sequence; AFT-local and AFT-conv are those over blocks of the window's size, the block before, and the
running sums of the keys beyond the window (the paper's exp(w) - 1 form without its cancellation when w is
very negative). The output equals the paper's formula stabilised row by row, and the recurrent step(), to
rounding (the tests take keys x100, spread wider than even float64's exp covers). One limit: that needs a
row's position biases (with the 0 beyond the window) to spread by less than about 27 in float32 (about 300 in
float64): a block whose terms all lie 43+ below its stabiliser (354+) is left out rather than divided by.

Generation: AFT-simple and AFT-local are recurrent (constant work per token: per feature a running
maximum of K, the sums of exp(K - max) V and exp(K - max), plus the last `window` keys and values for
local); AFT-full and AFT-conv recompute the whole context each step.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels
from sparse_transformer import Block, init_weights, sample_next

VARIANTS = ("full", "simple", "local", "conv")


@dataclass
class Config:
    block_size: int = 1024  # the longest sequence the model takes (w and position embeddings are learned)
    vocab_size: int = 256
    n_layer: int = 6
    n_head: int = 8  # used by AFT-conv only: one kernel per head
    n_embd: int = 512
    dropout: float = 0.0
    bias: bool = True  # biases in the linear layers and LayerNorms
    variant: str = "full"  # "full", "simple", "local" or "conv"
    window: int = 32  # AFT-local / AFT-conv: biases for t - t' < window (the paper's best s = 32)
    w_rank: int = 0  # AFT-full / AFT-local: 0 learns w itself, r > 0 learns w = w_u w_v^T of rank r


def padded(k, v, n):
    """k and v padded to n positions with keys and values of 0: after the sequence, in no row's past."""
    return F.pad(k, (0, 0, 0, n - k.size(1))), F.pad(v, (0, 0, 0, n - v.size(1)))


def values(v):
    return torch.stack([v, torch.ones_like(v)], dim=2)  # (B, T, 2, C): numerator and denominator in one pass


def alone(z, x):
    """The part of one key with logit z = K + w and x = [V, 1]: (z, exp(z - z) x), worth x, with the exp's gradient."""
    ref = z.detach()
    return ref, torch.exp(z - ref).unsqueeze(-2) * x


def merge(a, b):
    """Two parts over disjoint sets of keys, at least one of them with a key -> the part over their union.

    A part is (ref, sums): a detached stabiliser ref (..., C) and sums (..., 2, C), the sum over its keys of
    exp(K + w - ref) [V, 1], with a denominator sums[..., 1, :] of at least 1, or no key at all (ref = -inf,
    sums = 0). The union is referred to the larger ref: no term is scaled up, and its den is again >= 1."""
    (ref_a, sums_a), (ref_b, sums_b) = a, b
    ref = torch.maximum(ref_a, ref_b)
    return ref, torch.exp(ref_a - ref).unsqueeze(-2) * sums_a + torch.exp(ref_b - ref).unsqueeze(-2) * sums_b


def running_sums(k, v):
    """For every t the part of all keys t' <= t with w = 0; k, v (B, T, C).

    An exclusive scan over parts, each position starting alone. Going up, neighbours merge into blocks of 2,
    4, 8, ... positions; going down, the first half of a block is preceded by what precedes the block, its
    second half by that and the first half. Every merge combines earlier positions only, so row t depends on
    positions <= t alone; log2(T) rounds each way, O(T C) work and memory."""
    T = k.size(1)
    k, v = padded(k, v, 1 << (T - 1).bit_length())
    ups = [alone(k, values(v))]
    while ups[-1][0].size(1) > 1:
        ref, sums = ups[-1]
        ups.append(merge((ref[:, 0::2], sums[:, 0::2]), (ref[:, 1::2], sums[:, 1::2])))  # (B, n / 2, ...)
    ref, sums = ups[-1]
    before = (torch.full_like(ref, float("-inf")), torch.zeros_like(sums))  # nothing precedes the sequence
    for ref, sums in reversed(ups[:-1]):
        before_second_half = merge(before, (ref[:, 0::2], sums[:, 0::2]))
        # interleave: block 2i gets before[i], block 2i + 1 before_second_half[i]; (B, m, ...) -> (B, 2m, ...)
        before = tuple(torch.stack(halves, dim=2).flatten(1, 2) for halves in zip(before, before_second_half))
    ref, sums = merge(before, ups[0])
    return ref[:, :T], sums[:, :T]


def per_feature(b, C):
    """(G, ...) -> (..., C): the value of feature group g for each of its C // G features."""
    return b.movedim(0, -1).repeat_interleave(C // b.size(0), dim=-1)


def block_sums(k, x, bias):
    """Parts of n blocks of S keys, each for R rows that follow all of them, with one matrix product per block.

    k (B, n, S, C), x (B, n, S, 2, C); bias (G, n, R, S): w of each row for each key, -inf where not weighted,
    with the features in G equal groups (AFT-conv's heads; G = 1 otherwise). The exps subtract the block's
    largest key per feature and the row's largest bias, both known to every row since the block's keys all
    come first: no term exceeds 1. The part is then referred to its own denominator (den = 1). A part whose
    den fell below sqrt(tiny) (1e-19 in float32: every term 43+ below that bound) is left out, as dividing by
    it could overflow in the backward; it is negligible unless the row's biases spread by 27+ (float32).
    Returns ref (B, n, R, C) and sums (B, n, R, 2, C)."""
    B, n, S, C = k.shape
    G = bias.size(0)
    key_max = k.amax(dim=2, keepdim=True).detach()  # (B, n, 1, C)
    bias_max = bias.amax(dim=3).detach().clamp_min(torch.finfo(bias.dtype).min)  # (G, n, R); finite if no key
    weights = torch.exp(bias - bias_max[..., None])  # (G, n, R, S)
    p = torch.exp(k - key_max).unsqueeze(3) * x  # (B, n, S, 2, C)
    sums = torch.einsum("gnrs,bnsxgd->bnrxgd", weights, p.view(B, n, S, 2, G, C // G)).reshape(B, n, -1, 2, C)
    den = sums[..., 1, :].detach()
    kept = den > torch.finfo(den.dtype).tiny ** 0.5
    ref = torch.where(kept, key_max + per_feature(bias_max, C) + den.log(), float("-inf"))
    return ref, sums / torch.where(kept, den, 1.0).unsqueeze(-2)


def within_blocks(k, x, level_bias, L, state):
    """Merge into state, for every row, the earlier keys of its own block of L positions (L a power of two).

    Level b = 1, 2, ..., L/2: the rows of the second half of each run of 2b positions receive the keys of
    its first half; level_bias(b) gives their biases (G, T / 2b, b, b). state starts as each row's own key,
    so after level b it holds the row's run of 2b positions."""
    B, T, C = k.shape
    b = 1
    while b < L:
        n = T // (2 * b)
        part = block_sums(k.view(B, n, 2, b, C)[:, :, 0], x.view(B, n, 2, b, 2, C)[:, :, 0], level_bias(b))
        ref, sums = state[0].view(B, n, 2, b, C), state[1].view(B, n, 2, b, 2, C)  # [batch, run, half, i, ...]
        second = merge((ref[:, :, 1], sums[:, :, 1]), part)
        state = (torch.stack([ref[:, :, 0], second[0]], dim=2).view(B, T, C),
                 torch.stack([sums[:, :, 0], second[1]], dim=2).view(B, T, 2, C))
        b *= 2
    return state


def from_previous_block(k, x, bias_of, L):
    """The part of the keys of block i - 1 for the rows of block i, blocks of L positions (L dividing T)."""
    B, T, C = k.shape
    n = T // L
    blocks = torch.arange(T, device=k.device).view(n, L)
    ref, sums = block_sums(k.view(B, n, L, C)[:, :-1], x.view(B, n, L, 2, C)[:, :-1],
                           bias_of(blocks[1:, :, None], blocks[:-1, None, :]))  # (B, n - 1, L, ...): blocks 1 ..
    ref = F.pad(ref, (0, 0, 0, 0, 1, 0), value=float("-inf"))  # block 0 has no block before it
    return ref.flatten(1, 2), F.pad(sums, (0, 0, 0, 0, 0, 0, 1, 0)).flatten(1, 2)


def gated_ratio(q, part):
    """sigmoid(Q) * num / den from the part of all keys t' <= t of every row (den >= 1)."""
    num, den = part[1].unbind(2)
    return torch.sigmoid(q) * num / den


def kernel_runs(k, backend, band=None):
    """Whether kernels.aft_sums computes the sums: by default for CUDA tensors it takes; backend "triton" or
    "dense" forces the Triton kernels or the PyTorch path here (kernels.triton_dispatch decides, as for attention)."""
    return kernels.triton_dispatch("AFT", k, backend, kernels.aft_unfit, k, band)


def aft_simple(q, k, v, backend=None):
    """Causal AFT-simple (w = 0): running sums of exp(K) V and exp(K)."""
    if kernel_runs(k, backend):
        return torch.sigmoid(q) * kernels.aft_sums(k, v)
    return gated_ratio(q, running_sums(k, v))


def aft_full(q, k, v, w):
    """Causal AFT-full. w (T, T) with w[t, t'] the bias of key t' for query t.

    Each row merges its own key and, level by level, the earlier keys of its run of 2, 4, ..., L positions
    (within_blocks, L >= T a power of two): (T/2b) products of (b x b) @ (b x 2C) per level, T^2 C in all."""
    T = k.size(1)
    L = 1 << (T - 1).bit_length()
    k, v = padded(k, v, L)
    w = F.pad(w, (0, L - T, 0, L - T))

    def level_bias(b):  # w of the second half of each run of 2b positions for its first half: a view of w
        n = L // (2 * b)
        return w.view(n, 2 * b, n, 2 * b).diagonal(dim1=0, dim2=2).movedim(-1, 0)[None, :, b:, :b]

    x = values(v)
    ref, sums = within_blocks(k, x, level_bias, L, alone(k + w.diagonal()[:, None], x))
    return gated_ratio(q, (ref[:, :T], sums[:, :T]))


def aft_banded(q, k, v, band, backend=None):
    """Causal AFT with w_{t,t'} = band[g, t, t - t'] for t - t' < s and 0 beyond; band (G, T, s), G feature groups.

    Time is cut into blocks of L >= s positions (a power of two), so the window of a row lies in its own block
    and the one before. Each row merges its own key, the earlier keys of its block (within_blocks), those of
    the block before (from_previous_block) and, for t >= s, all keys t' <= t - s with w = 0 (running_sums)."""
    if kernel_runs(k, backend, band):
        return torch.sigmoid(q) * kernels.aft_sums(k, v, band)
    B, T, C = k.shape
    G, _, s = band.shape
    L = 1 << (s - 1).bit_length()
    n = -(-T // L) * L  # whole blocks
    k, v = padded(k, v, n)
    band = F.pad(band, (0, 0, 0, n - T))
    pos = torch.arange(n, device=k.device)

    def bias_of(rows, keys):  # (G, ...) biases of rows for earlier keys; -inf beyond the window
        lag = rows - keys
        return band[:, rows, lag.clamp(max=s - 1)].masked_fill(lag >= s, float("-inf"))

    def level_bias(b):
        runs = pos.view(n // (2 * b), 2, b)  # [run, half, i]
        return bias_of(runs[:, 1, :, None], runs[:, 0, None, :])

    x = values(v)
    part = within_blocks(k, x, level_bias, L, alone(k + per_feature(band[:, :, 0], C), x))
    if n > L:
        part = merge(part, from_previous_block(k, x, bias_of, L))
    if T > s:  # the keys beyond the window: running sums delayed by s
        ref, sums = running_sums(k[:, : n - s], v[:, : n - s])
        part = merge(part, (F.pad(ref, (0, 0, s, 0), value=float("-inf")), F.pad(sums, (0, 0, 0, 0, s, 0))))
    return gated_ratio(q, (part[0][:, :T], part[1][:, :T]))


def aft_local(q, k, v, w, backend=None):
    """Causal AFT-local. w (T, s): w[t, j] is the bias of key t - j for query t (j < s); 0 beyond the window."""
    return aft_banded(q, k, v, w[None], backend)


def aft_conv(q, k, v, kernel, backend=None):
    """Causal AFT-conv. kernel (H, s): kernel[h, j] is the bias of key t - j for query t in head h; 0 beyond."""
    return aft_banded(q, k, v, kernel[:, None].expand(-1, k.size(1), -1), backend)


class AFTMixer(nn.Module):
    """The token mixer of one block: (B, T, C) -> (B, T, C), in place of self-attention."""

    def __init__(self, config):
        super().__init__()
        C, L, r = config.n_embd, config.block_size, config.w_rank
        self.variant = config.variant
        self.backend = None  # AFT-simple, -local, -conv: "triton" or "dense" forces a path; None: Triton on CUDA
        self.window = 0 if config.variant == "simple" else config.window  # keys not yet in the running sums
        self.qkv = nn.Linear(C, 3 * C, bias=config.bias)
        self.proj = nn.Linear(C, C, bias=config.bias)
        if config.variant in ("full", "local"):
            if r > 0:  # w = w_u w_v^T
                self.w_u = nn.Parameter(torch.zeros(L, r))
                self.w_v = nn.Parameter(torch.zeros(L, r))
            else:  # full: w[t, t']; local stores only the band, w[t, j] = w_{t, t-j}
                self.w = nn.Parameter(torch.zeros(L, L if config.variant == "full" else config.window))
        elif config.variant == "conv":
            self.kernel = nn.Parameter(torch.zeros(config.n_head, config.window))
            self.kernel_gain = nn.Parameter(torch.zeros(config.n_head))
            self.kernel_bias = nn.Parameter(torch.zeros(config.n_head))

    def position_bias(self, T):
        """full: w (T, T); local: the band (T, s) with [t, j] = w_{t,t-j}; conv: the kernels (H, s)."""
        if self.variant == "conv":
            # AFT-conv's reparameterisation per head, w = gain * (w - mean(w)) / std(w) + bias with gain and bias
            # learned and 0 at the start: our reading of the paper, unchecked against its text (docs/design.md);
            # the epsilon and the population std are our choices
            kernel = self.kernel - self.kernel.mean(dim=1, keepdim=True)
            kernel = kernel / (kernel.std(dim=1, keepdim=True, correction=0) + 1e-5)
            return self.kernel_gain[:, None] * kernel + self.kernel_bias[:, None]
        if not hasattr(self, "w_u"):
            return self.w[:T, :T] if self.variant == "full" else self.w[:T]
        u, v = self.w_u[:T], self.w_v[:T]
        if self.variant == "full":
            return u @ v.T
        lag = torch.arange(self.window, device=u.device)
        key = (torch.arange(T, device=u.device)[:, None] - lag).clamp_min(0)  # (T, s); t - j < 0 is masked later
        return torch.einsum("tr,tjr->tj", u, v[key])

    def forward(self, x, cache=None):
        """x (B, T, C). With cache (this layer's dict, {} before the first position) AFT-simple and AFT-local
        run recurrently over the T new positions, continuing from the positions the cache has seen."""
        B, T, C = x.shape
        if cache is not None and (cache or T == 1):
            return torch.stack([self.step(x[:, i], cache) for i in range(T)], dim=1)  # (B, T, C)
        if cache is not None:  # a prompt: run it in parallel, then leave the state step() would have left
            self.prime(x, cache)
            return self.forward(x)
        q, k, v = self.qkv(x).split(C, dim=2)
        dtype = torch.promote_types(q.dtype, torch.float32)
        with torch.autocast(device_type=x.device.type, enabled=False):  # exp and sums in float32 at least
            q = q.to(dtype)
            if self.variant == "full" or not kernel_runs(k, self.backend):  # the kernels upcast k, v as they load
                k, v = k.to(dtype), v.to(dtype)
            if self.variant == "full":
                y = aft_full(q, k, v, self.position_bias(T).to(dtype))
            elif self.variant == "simple":
                y = aft_simple(q, k, v, self.backend)
            else:
                banded = aft_local if self.variant == "local" else aft_conv
                y = banded(q, k, v, self.position_bias(T).to(dtype), self.backend)
        return self.proj(y.to(x.dtype))

    def window_bias(self, t, n):
        """AFT-local: the biases w_{t,t'} of the n most recent keys t' = t-n+1 .. t, oldest first."""
        if hasattr(self, "w_u"):
            return self.w_v[t - n + 1 : t + 1] @ self.w_u[t]
        return self.w[t, :n].flip(0)

    def prime(self, x, cache):
        """Fill an empty cache from a whole prompt x (B, T, C): the keys that left the window are summed into
        num and den (scaled by their maximum m), the last `window` keys and values are kept as they are."""
        B, T, C = x.shape
        _, k, v = self.qkv(x).split(C, dim=2)
        dtype = torch.promote_types(k.dtype, torch.float32)
        k, v = k.to(dtype), v.to(dtype)
        old = max(0, T - self.window)  # positions whose keys are in the running sums
        m = torch.full_like(k[:, 0], float("-inf"))
        num, den = torch.zeros_like(m), torch.zeros_like(m)
        if old:
            m = k[:, :old].amax(dim=1)  # (B, C)
            p = torch.exp(k[:, :old] - m[:, None])
            num, den = (p * v[:, :old]).sum(dim=1), p.sum(dim=1)
        cache.update(t=T, m=m, num=num, den=den, k=k[:, old:], v=v[:, old:])

    def step(self, x, cache):
        """AFT-simple / AFT-local for the next position t = cache["t"]; x (B, C) -> (B, C)."""
        B, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=1)
        dtype = torch.promote_types(q.dtype, torch.float32)
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
        if not cache:  # m: running max of the keys in the sums; num, den: sums of exp(K - m) V, exp(K - m)
            cache.update(t=0, m=torch.full_like(k, float("-inf")), num=torch.zeros_like(k),
                         den=torch.zeros_like(k), k=k.new_zeros(B, 0, C), v=k.new_zeros(B, 0, C))
        t = cache["t"]
        cache["t"] = t + 1
        cache["k"] = torch.cat([cache["k"], k[:, None]], dim=1)  # (B, n, C) the keys inside the window
        cache["v"] = torch.cat([cache["v"], v[:, None]], dim=1)
        if cache["k"].size(1) > self.window:  # the oldest key leaves the window: into the sums with w = 0
            k0, v0 = cache["k"][:, 0], cache["v"][:, 0]
            cache["k"], cache["v"] = cache["k"][:, 1:], cache["v"][:, 1:]
            m = torch.maximum(cache["m"], k0)
            rescale, p0 = torch.exp(cache["m"] - m), torch.exp(k0 - m)
            cache.update(m=m, num=cache["num"] * rescale + p0 * v0, den=cache["den"] * rescale + p0)
        num, den = cache["num"], cache["den"]
        n = cache["k"].size(1)
        if n > 0:
            z = cache["k"] + self.window_bias(t, n).to(dtype)[None, :, None]  # (B, n, C) K_t' + w_{t,t'}
            r = torch.maximum(cache["m"], z.amax(dim=1))  # (B, C) the largest term: nothing exceeds 1
            e = torch.exp(z - r[:, None])
            rescale = torch.exp(cache["m"] - r)
            num = num * rescale + (e * cache["v"]).sum(dim=1)
            den = den * rescale + e.sum(dim=1)
        return self.proj((torch.sigmoid(q) * num / den).to(x.dtype))


class AFT(nn.Module):
    def __init__(self, config):
        super().__init__()
        if config.variant not in VARIANTS:
            raise ValueError(f"unknown AFT variant {config.variant!r}; choose one of {', '.join(VARIANTS)}")
        if config.window < 1:
            raise ValueError(f"window must be at least 1 (got {config.window}); the paper's best is 32")
        if config.w_rank < 0:
            raise ValueError(f"w_rank must be 0 (learn w itself) or a positive rank (got {config.w_rank})")
        if config.variant == "conv" and config.n_embd % config.n_head != 0:
            raise ValueError(f"AFT-conv needs n_embd ({config.n_embd}) divisible by n_head ({config.n_head})")
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList([Block(config, attn=AFTMixer(config)) for _ in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied (sparse_transformer.init_weights says why)
        init_weights(self, config.n_layer)

    def forward(self, idx, targets=None, cache=None):
        """cache: None, or (AFT-simple / AFT-local) one dict per block with the running sums so far."""
        B, T = idx.shape
        if cache is not None and self.config.variant not in ("simple", "local"):
            raise ValueError(f"AFT-{self.config.variant} has no recurrent form; call it without a cache")
        start = cache[0]["t"] if cache and cache[0] else 0
        if start + T > self.config.block_size:
            raise ValueError(f"sequence length {start + T} exceeds the model's block_size {self.config.block_size} "
                             "(w and the position embeddings are learned per position); use at most that")
        pos = torch.arange(start, start + T, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))  # (B, T, C)
        for r, block in enumerate(self.blocks):
            x = block(x) if cache is None else block(x, cache[r])
        logits = self.lm_head(self.ln_f(x))  # (B, T, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1))
        return logits, loss

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, generator=None, use_cache=True):
        """Append max_new_tokens sampled tokens to idx (B, T), feeding at most block_size tokens back in.

        With use_cache, AFT-simple and AFT-local feed only the tokens not yet in their running sums while
        the sequence fits in block_size; past that (and for full and conv always) the last block_size tokens
        are recomputed each step.
        """
        L = self.config.block_size
        use_cache = use_cache and self.config.variant in ("simple", "local")
        cache = [{} for _ in self.blocks]
        for _ in range(max_new_tokens):
            if use_cache and idx.size(1) <= L:
                done = cache[0]["t"] if cache[0] else 0
                logits, _ = self(idx[:, done:], cache=cache)
            else:
                logits, _ = self(idx[:, -L:])
            idx = torch.cat([idx, sample_next(logits[:, -1], temperature, top_k, generator)], dim=1)
        return idx
