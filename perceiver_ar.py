"""
Perceiver AR (Hawthorne et al. 2022, "General-purpose, long-context autoregressive modeling with Perceiver
AR", arXiv 2202.07765), following the official code (google-research/perceiver-ar) where the paper is silent.

M = block_size inputs are embedded; the last N = n_latents positions are the latents. With e_t the token
embedding of input t (positions enter only through rotary encodings inside every attention):

    z_k   = W_z e_{M-N+k}                                         latent query k, from its own input's embedding
    z    += CrossAttn(LN(z), LN(e))   latent k sees inputs 0 .. M-N+k (its own position included)
    z    += MLP(LN(z))
    z    += SelfAttn(LN(z)),  z += MLP(LN(z))                     L = n_layer causal blocks over the N latents
    logits_k = W_out LN(z_k)                                      predicts input M-N+k+1

MLP(h) = W_2 relu(W_1 h)^2 (squared ReLU). Rotary encodings rotate the first `rotary_frac` of each head's
query/key dims by angles proportional to the absolute position. Cost: O(M N) for the cross-attention plus
O(L N^2) for the latent stack, instead of O(L M^2) for a Transformer over all M inputs; with N = M the model is
a dense causal Transformer whose first layer takes its queries through W_z (tested against one).

forward(idx, targets) returns logits for the last N positions only, (B, N, V), and the loss compares them
with targets[:, -N:]. Training options from the official code: context dropout (a random fraction of the
M - N context inputs is removed before the cross-attention) and the z-loss 1e-4 * logsumexp(logits)^2.
"""
import dataclasses
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from kernels import attention, decoding_sdpa
from sparse_transformer import init_weights, sample_next


@dataclass
class Config:
    block_size: int = 1024  # M: inputs the cross-attention sees
    vocab_size: int = 256
    n_layer: int = 6  # L: self-attention blocks over the latents (after the one cross-attention block)
    n_head: int = 8
    n_embd: int = 512
    dropout: float = 0.0
    bias: bool = True  # biases in the linear layers and LayerNorms
    n_latents: int = 0  # N: the last N positions, the only ones that predict; 0 = min(1024, block_size // 2)
    rotary_frac: float = 0.5  # fraction of each head's dims rotated by the rotary encoding (official: 0.25-0.5)
    rotary_base: float = 10000.0  # rotary frequencies base^(-i/n), i < n pairs; 0: block_size (as the official code)
    context_dropout: float = 0.0  # training only: fraction of the M - N context inputs removed per sequence
    z_loss: float = 1e-4  # training only: weight of logsumexp(logits)^2 added to the loss (official: 1e-4)


def apply_rotary(x, pos, inv_freq):
    """Rotate the first 2 * len(inv_freq) dims of x (B, H, T, D) by angles pos * inv_freq; pos is (B or 1, T).

    Dims i and i + r/2 (r = rotated width) form a pair turned by the angle pos * inv_freq[i], so the dot
    product of a rotated query and key depends on their positions only through the difference."""
    r = 2 * inv_freq.numel()
    angles = (pos.to(inv_freq.dtype)[..., None] * inv_freq)[:, None]  # (B or 1, 1, T, r/2)
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    x1, x2, rest = x[..., : r // 2], x[..., r // 2 : r], x[..., r:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], dim=-1)


class RotaryAttention(nn.Module):
    """Causal multi-head attention from queries xq (B, T, C) to keys/values xkv (B, S, C), S >= T.

    The mask is kernels.attention's bottom-right causal mask: query i sits at the key position S - T + i. The
    callers order keys so that this is exactly the right mask (see PerceiverAR.forward). `past` holds keys and
    values of earlier positions (already rotated) that go in front of this call's; the keys and values used are
    returned so that generation can reuse them."""

    def __init__(self, config):
        super().__init__()
        self.n_head = config.n_head
        head_dim = config.n_embd // config.n_head
        n_pairs = int(head_dim * config.rotary_frac) // 2
        if not 0 < config.rotary_frac <= 1 or n_pairs == 0:
            raise ValueError(f"rotary_frac={config.rotary_frac} rotates no dims of the {head_dim}-wide heads; "
                             f"choose a value in (0, 1] with rotary_frac * head_dim >= 2")
        base = config.rotary_base or config.block_size
        if base <= 1:
            raise ValueError(f"rotary_base={config.rotary_base} turns no pair slowly; choose 0 (block_size) or > 1")
        self.register_buffer("inv_freq", base ** (-torch.arange(n_pairs) / n_pairs), persistent=False)
        self.q = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.kv = nn.Linear(config.n_embd, 2 * config.n_embd, bias=config.bias)
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)

    def forward(self, xq, q_pos, xkv, kv_pos, past=None):
        B, T, C = xq.shape
        S = xkv.size(1)
        q = self.q(xq).view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, H, T, D)
        k, v = (t.view(B, S, self.n_head, C // self.n_head).transpose(1, 2) for t in self.kv(xkv).split(C, dim=2))
        q, k = apply_rotary(q, q_pos, self.inv_freq), apply_rotary(k, kv_pos, self.inv_freq)
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        y = attention(q, k, v, causal=True)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, H, T, D) -> (B, T, C)
        return self.proj(y), (k, v)


class SquaredReLUMLP(nn.Module):
    """The official code's feed-forward: W_2 relu(W_1 h)^2, 4x wide."""

    def __init__(self, config):
        super().__init__()
        self.fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)

    def forward(self, x):
        return self.proj(F.relu(self.fc(x)).square())


class CrossAttendBlock(nn.Module):
    """Latent queries attend to all inputs; separate norms for the query and the key/value streams."""

    def __init__(self, config):
        super().__init__()
        self.ln_q = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.ln_kv = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = RotaryAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = SquaredReLUMLP(config)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, z, z_pos, x, x_pos, past=None):
        a, present = self.attn(self.ln_q(z), z_pos, self.ln_kv(x), x_pos, past)
        z = z + self.dropout(a)
        return z + self.dropout(self.mlp(self.ln_2(z))), present


class LatentBlock(nn.Module):
    """Pre-norm causal self-attention block over the latents."""

    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = RotaryAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = SquaredReLUMLP(config)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, z, z_pos, past=None):
        h = self.ln_1(z)
        a, present = self.attn(h, z_pos, h, z_pos, past)
        z = z + self.dropout(a)
        return z + self.dropout(self.mlp(self.ln_2(z))), present


class PerceiverAR(nn.Module):
    def __init__(self, config):
        super().__init__()
        if config.n_latents == 0:  # the paper's long-context runs use 1024 latents
            config = dataclasses.replace(config, n_latents=min(1024, max(1, config.block_size // 2)))
        if config.n_embd % config.n_head:
            raise ValueError(f"n_embd ({config.n_embd}) must be divisible by n_head ({config.n_head})")
        if not 1 <= config.n_latents <= config.block_size:
            raise ValueError(f"n_latents={config.n_latents} must lie in 1 .. block_size={config.block_size}")
        if not 0.0 <= config.context_dropout <= 1.0:
            raise ValueError(f"context_dropout={config.context_dropout} is a fraction; choose it in [0, 1]")
        self.config = config
        self.n_latents = config.n_latents  # evaluation may set another value (more latents: more compute)
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.z_linear = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.cross = CrossAttendBlock(config)
        self.blocks = nn.ModuleList([LatentBlock(config) for _ in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # W_out untied and N(0, 0.02), not zero as in the official code: init_weights says why
        init_weights(self, config.n_layer + 1)  # L + 1 residual stages: the cross-attend block and L blocks

    def run(self, z, z_pos, x, x_pos, past=None):
        """Latent embeddings z (B, N, C) at z_pos, inputs x (B, S, C) at x_pos -> logits (B, N, V) and, per
        layer, the (rotated) keys and values it used. x must list every input a latent may see; the latents
        themselves are its last N rows (or, with `past`, the cached keys come first)."""
        z, present = self.cross(self.z_linear(z), z_pos, x, x_pos, None if past is None else past[0])
        presents = [present]
        for i, block in enumerate(self.blocks):
            z, present = block(z, z_pos, None if past is None else past[i + 1])
            presents.append(present)
        return self.lm_head(self.ln_f(z)), presents

    def encode(self, idx, n_latents):
        """All layers over idx (B, T) with its last n_latents positions as latents; context dropout in training."""
        B, T = idx.shape
        N = n_latents
        x = self.wte(idx)  # (B, T, C)
        pos = torch.arange(T, device=idx.device)[None]  # (1, T): rotary angles use positions in this window
        ctx, ctx_pos = x[:, : T - N], pos[:, : T - N].expand(B, -1)
        n_keep = (T - N) - int(self.config.context_dropout * (T - N))
        if self.training and n_keep < T - N:
            # Drop context inputs only (never latents). Every kept context input precedes every latent, so
            # [kept context, latents] under the bottom-right causal mask gives latent k all kept context plus
            # latents 0..k: exactly the causal mask restricted to the kept inputs. Key order among the kept
            # context does not matter (all are visible to every latent), so no sort is needed.
            keep = torch.rand(B, T - N, device=idx.device).argsort(dim=1)[:, :n_keep]  # (B, n_keep)
            ctx = ctx.gather(1, keep[..., None].expand(-1, -1, x.size(2)))
            ctx_pos = keep
        kv = torch.cat([ctx, x[:, T - N :]], dim=1)  # (B, n_keep + N, C)
        kv_pos = torch.cat([ctx_pos, pos[:, T - N :].expand(B, -1)], dim=1)
        return self.run(x[:, T - N :], pos[:, T - N :], kv, kv_pos)

    def forward(self, idx, targets=None, n_latents=None):
        """Logits (B, N, V) for the last N = n_latents (default self.n_latents) positions of idx (B, T),
        N <= T <= block_size; loss = mean cross-entropy against targets[:, -N:] (+ z-loss in training)."""
        B, T = idx.shape
        N = self.n_latents if n_latents is None else n_latents
        if not 1 <= N <= T <= self.config.block_size:
            raise ValueError(f"sequence length {T} does not fit: Perceiver AR takes n_latents={N} <= length <= "
                             f"block_size={self.config.block_size}")
        logits, _ = self.encode(idx, N)
        loss = None
        if targets is not None:
            flat = logits.reshape(-1, logits.size(-1)).float()
            loss = F.cross_entropy(flat, targets[:, -N:].reshape(-1))
            if self.training and self.config.z_loss > 0:
                # Keeps log Z near 0 (stable low-precision logits); off in eval so eval loss is plain nats.
                loss = loss + self.config.z_loss * torch.logsumexp(flat, dim=-1).square().mean()
        return logits, loss

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, generator=None, use_cache=True):
        """Append max_new_tokens sampled tokens to idx (B, T). Call eval() first (dropouts would differ).

        Each token is predicted from a window idx[:, s:] (at most block_size inputs) whose positions p.. are the
        latents. Latent states depend on which latents share the stack, so they can be reused only while the
        window and the latent set grow without sliding. Hence (as in the official sampler, which resets its
        cache when the latent cache is full, but lets the input cache slide) the window and latents restart
        every so often:
          reset:  s = max(0, T - (M - g)),  p = max(s, T - (N - g)),  g = N // 2 tokens of room to grow;
          then each new token joins the window as an input and as a latent, until the window would exceed M
          or the latents would exceed N, which triggers the next reset. So a prediction sees between
          M - g and M inputs once the sequence is longer than M, and uses up to N latents.
        With use_cache, a reset runs the whole model once and keeps every layer's rotated keys/values (inputs
        for the cross-attention, latents for the self-attention blocks); each later token then costs one
        query per layer against the cache: O(M + L N) instead of O(M N + L N^2). use_cache=False calls forward
        on the same windows with the same latents, and gives the same tokens (up to rounding)."""
        if idx.size(1) == 0:
            raise ValueError("generate needs a prompt of at least one token")
        M, N = self.config.block_size, self.n_latents
        g = N // 2
        s = p = None  # window start and first latent of the current segment (indices into idx)
        with decoding_sdpa():  # every step has a new key length
            for _ in range(max_new_tokens):
                T = idx.size(1)
                reset = s is None or T - s > M or T - p > N
                if reset:
                    s = max(0, T - (M - g))
                    p = max(s, T - (N - g))
                if not use_cache:
                    logits, _ = self(idx[:, s:], n_latents=T - p)
                elif reset:
                    logits, cache = self.encode(idx[:, s:], T - p)
                else:
                    e = self.wte(idx[:, -1:])  # (B, 1, C): the newest token is a new input and a new latent
                    pos = torch.full((1, 1), T - 1 - s, device=idx.device)
                    logits, cache = self.run(e, pos, e, pos, cache)
                idx = torch.cat([idx, sample_next(logits[:, -1], temperature, top_k, generator)], dim=1)
        return idx
