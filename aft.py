"""
Attention Free Transformer (Zhai, Talbott, Srivastava, Huang, Goh, Zhang, Susskind 2021, "An Attention
Free Transformer", arXiv 2105.14103): the Transformer of sparse_transformer.py with dot-product attention
replaced by an element-wise operation. With Q = X Wq, K = X Wk, V = X Wv (all of width d) and a learned
pairwise position bias w, causal AFT-full (section 3, sums over t' <= t) is

    Y_t = sigmoid(Q_t) * sum_t' exp(K_t' + w_{t,t'}) * V_t' / sum_t' exp(K_t' + w_{t,t'})

element-wise over the d features: every feature is a "head" of its own whose weights over the past are
softmax_t'(K_t' + w_{t,t'}); no T x T x d tensor is ever needed. Config.variant picks one of:

- "full":   w is a [block_size, block_size] parameter, or the paper's factorisation w = w_u w_v^T of
            rank `w_rank` (64 on CIFAR-10, 256 on enwik8). Two T x T matrix products, O(T^2 d).
- "simple": w = 0. Running sums along time, O(T d).
- "local":  w_{t,t'} learned for t - t' < window and 0 (not -inf) beyond, so the whole past still counts
            through the w = 0 term; w stored as its band [block_size, window] or factorised as for full.
            Running sums plus a band of `window` terms, O(T s d).
- "conv":   n_head heads; per head a causal kernel of length `window` is the bias inside the window,
            w_{t,t'} = kernel_h[t - t'], and 0 beyond. The paper's numerator is
            conv(exp(K) * V, exp(w) - 1) + sum(exp(K) * V), its denominator the same with exp(K); the kernel
            is reparameterised per head as gain * (kernel - mean) / std + bias with gain = bias = 0 at
            the start, so the layer starts as AFT-simple.

Numerics: every exp is taken in float32 (also under autocast) after subtracting the per-feature maximum
of K over the sequence and, for w, the maximum bias each row can see, so no term exceeds 1; both maxima
cancel in the ratio. A row whose visible K + w all lie more than ~69 below those maxima (say keys of -80
before a key of +80 in the same feature) outputs 0 with zero gradient rather than 0/0 (see gated_ratio).
AFT-local and AFT-conv add the window terms to the running sum of the keys *beyond* the window instead
of adding exp(w) - 1 to the sum of all keys: the same value, without the cancellation that exp(w) - 1 ~ -1
would cause when w is very negative.

Generation: AFT-simple and AFT-local are recurrent (constant work per token: per feature a running
maximum of K, the sums of exp(K - max) V and exp(K - max), plus the last `window` keys and values for
local); AFT-full and AFT-conv recompute the whole context each step.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from sparse_transformer import Block, configure_optimizers, init_weights, sample_next

VARIANTS = ("full", "simple", "local", "conv")


@dataclass
class Config:
    block_size: int = 1024  # the longest sequence the model takes (w and position embeddings are learned)
    vocab_size: int = 256
    n_layer: int = 6
    n_head: int = 8  # used by AFT-conv only: one kernel per head
    n_embd: int = 512
    dropout: float = 0.0
    bias: bool = True
    variant: str = "full"  # "full", "simple", "local" or "conv"
    window: int = 32  # AFT-local / AFT-conv: biases for t - t' < window (the paper's best s = 32)
    w_rank: int = 0  # AFT-full / AFT-local: 0 learns w itself, r > 0 learns w = w_u w_v^T of rank r


def exp_keys(k):
    """exp(K - max_t K) per feature of each sequence: at most 1; the maximum cancels in the ratio."""
    return torch.exp(k - k.amax(dim=1, keepdim=True).detach())


def gated_ratio(q, num_den):
    """sigmoid(Q) * num / den from num_den (B, T, 2C).

    A denominator below 1e-30 means every visible K + w lies ~69 below the maxima subtracted: such rows
    give 0 with zero gradient, since 1 / den near float32's underflow would overflow the backward sums.
    """
    num, den = num_den.chunk(2, dim=2)
    ok = den > 1e-30
    return torch.sigmoid(q) * torch.where(ok, num, 0.0) / torch.where(ok, den, 1.0)


def aft_full(q, k, v, w):
    """Causal AFT-full. q, k, v (B, T, C) float; w (T, T) with w[t, t'] the bias of key t' for query t."""
    T = k.size(1)
    future = torch.ones(T, T, dtype=torch.bool, device=k.device).triu(1)
    w = w.masked_fill(future, float("-inf"))
    ew = torch.exp(w - w.amax(dim=1, keepdim=True).detach())  # (T, T), largest entry of each row is 1
    p = exp_keys(k)
    return gated_ratio(q, ew @ torch.cat([p * v, p], dim=2))  # (T, T) @ (B, T, 2C) -> (B, T, 2C)


def aft_simple(q, k, v):
    """Causal AFT-simple (w = 0): prefix sums of exp(K) V and exp(K)."""
    p = exp_keys(k)
    return gated_ratio(q, torch.cat([p * v, p], dim=2).cumsum(dim=1))


def sum_beyond(x, s):
    """Row t of the result is sum_{t' <= t - s} x_t': prefix sums delayed by s steps; x (B, T, ...)."""
    T = x.size(1)
    return F.pad(x.cumsum(dim=1), (0, 0, s, 0))[:, :T]


def band_sum(x, ew):
    """Row t of the result is sum_{j < s} ew[t, j] x[t - j]; x (B, T, X), ew (T, s) zero where t - j < 0.

    Time is cut into blocks of s: block i's queries see keys in blocks i - 1 and i only, so the band is
    one batched (s x 2s) @ (2s x X) product per block, O(T s X) work and O(T X) memory.
    """
    B, T, X = x.shape
    s = ew.size(1)
    n = -(-T // s)  # blocks of queries
    xb = F.pad(x, (0, 0, s, n * s - T)).view(B, n + 1, s, X)  # block 0 holds zeros before the start
    keys = torch.cat([xb[:, :-1], xb[:, 1:]], dim=2)  # (B, n, 2s, X): previous and own block
    lag = s + torch.arange(s, device=x.device)[:, None] - torch.arange(2 * s, device=x.device)  # (s, 2s)
    inside = (lag >= 0) & (lag < s)
    ewb = F.pad(ew, (0, 0, 0, n * s - T)).view(n, s, s)  # (n, s, s): [block, query in block, j]
    weights = ewb.gather(2, lag.clamp(0, s - 1).expand(n, s, 2 * s)) * inside  # (n, s, 2s)
    return (weights @ keys).view(B, n * s, X)[:, :T]  # (B, n, s, X) -> (B, T, X)


def aft_local(q, k, v, w):
    """Causal AFT-local. w (T, s): w[t, j] is the bias of key t - j for query t (j < s); 0 beyond the window."""
    T, s = w.shape
    t = torch.arange(T, device=k.device)
    exists = t[:, None] - torch.arange(s, device=k.device)[None, :] >= 0  # (T, s): key t - j is in the sequence
    w = w.masked_fill(~exists, float("-inf"))
    has_beyond = t >= s  # rows that also see keys beyond the window, with bias 0
    m = torch.where(has_beyond, w.amax(dim=1).clamp_min(0), w.amax(dim=1)).detach()  # (T,) row maxima
    ew = torch.exp(w - m[:, None])  # (T, s), 0 for keys before the sequence start
    p = exp_keys(k)
    x = torch.cat([p * v, p], dim=2)  # (B, T, 2C)
    beyond_weight = torch.where(has_beyond, torch.exp(-m), 0.0)[:, None]  # exp(0 - m), 0 where unused
    return gated_ratio(q, band_sum(x, ew) + beyond_weight * sum_beyond(x, s))


def aft_conv(q, k, v, kernel):
    """Causal AFT-conv. kernel (H, s): kernel[h, j] is the bias of key t - j for query t in head h."""
    B, T, C = k.shape
    H, s = kernel.shape
    m = kernel.amax(dim=1).clamp_min(0).detach()  # (H,) the largest bias a head uses, window or beyond
    ew = torch.exp(kernel - m[:, None]).repeat_interleave(C // H, dim=0)  # (C, s), channel c in head c // D
    p = exp_keys(k)
    x = torch.cat([p * v, p], dim=2)  # (B, T, 2C)
    # depthwise causal convolution; conv1d correlates, so tap i meets key t - (s - 1 - i): flip the kernel
    taps = torch.cat([ew, ew]).flip(1)[:, None, :]  # (2C, 1, s)
    conv = F.conv1d(F.pad(x.transpose(1, 2), (s - 1, 0)), taps, groups=2 * C).transpose(1, 2)  # (B, T, 2C)
    beyond_weight = torch.exp(-m).repeat_interleave(C // H).repeat(2)  # (2C,)
    return gated_ratio(q, conv + beyond_weight * sum_beyond(x, s))


class AFTMixer(nn.Module):
    """The token mixer of one block: (B, T, C) -> (B, T, C), in place of self-attention."""

    def __init__(self, config):
        super().__init__()
        C, L, r = config.n_embd, config.block_size, config.w_rank
        self.variant = config.variant
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
        with torch.autocast(device_type=x.device.type, enabled=False):  # exp and sums in float32 at least
            dtype = torch.promote_types(q.dtype, torch.float32)
            q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
            if self.variant == "simple":
                y = aft_simple(q, k, v)
            else:
                mixer = {"full": aft_full, "local": aft_local, "conv": aft_conv}[self.variant]
                y = mixer(q, k, v, self.position_bias(T).to(dtype))
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
        init_weights(self, config.n_layer)
        nn.init.zeros_(self.lm_head.weight)  # as the baseline: the official code starts W_out at zero

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

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        return configure_optimizers(self, weight_decay, learning_rate, betas, device_type)

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
