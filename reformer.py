"""
Reformer (Kitaev, Kaiser, Levskaya 2020, "Reformer: The Efficient Transformer", arXiv 2001.04451): a
decoder-only Transformer whose memory stays small on long sequences, through four changes:

- Shared-QK attention (section 3): one projection gives the queries, and the keys are the queries scaled to
  unit length, k_j = q_j / ||q_j||. A position attends to itself only when it has no other key.
- LSH attention (section 3): angular locality-sensitive hashing, bucket(x) = argmax([xA; -xA]) with a random
  rotation A of shape [d_h, n_buckets/2] (the paper's R), in n_hashes rounds (R in the shapes below). Each
  round sorts the positions by (bucket, position), cuts them into chunks of m = `chunk`, and lets every chunk
  attend to itself and the previous chunk, causal by original position; the rounds combine by their
  log-sum-exp weights,
      out_i = sum_r exp(lse_r,i - logsumexp_r lse_r,i) o_r,i.
  With `causal_lsh` (our option, not the paper's) each query instead attends to the `chunk` most recent keys
  of its own bucket, a sliding window over the sorted order.
- Reversible residual layers (section 4, RevNet): with the activations split in two halves,
      y1 = x1 + Attention(x2),   y2 = x2 + FeedForward(y1);
  the backward pass rebuilds x2 = y2 - FeedForward(y1) and x1 = y1 - Attention(x2), so no per-layer
  activations are stored and memory does not grow with depth.
- Chunked feed-forward (section 4): the feed-forward runs on slices of the sequence, one at a time.
And, from trax's Reformer, axial position embeddings: with T = n1 * n2, e(i) = [E1[i // n2]; E2[i % n2]].

Causality: the paper's LSH attention never gives weight to a later position, but which earlier keys share a
query's chunk depends on where all positions, later ones included, fall in the sort, so a later token can change
an earlier output through the chunk boundaries (as in trax; a test asserts the leak). Its training forward is
therefore not exactly causal (`exactly_causal` is False), and sample.py --evaluate also scores it on prefixes
alone, as generation runs it (docs/design.md: what the leak is worth). With `causal_lsh` a query's window holds
only earlier keys of its own bucket, and a bucket depends on its own position only: exactly causal.
"""
import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from sparse_transformer import MLP, init_weights, sample_next
from kernels import lsh_attention


@dataclass
class Config:
    block_size: int = 4096  # the longest sequence; a multiple of chunk
    vocab_size: int = 256
    n_layer: int = 6
    n_head: int = 8
    n_embd: int = 512
    dropout: float = 0.0
    bias: bool = True  # biases in the linear layers and LayerNorms
    n_hashes: int = 4  # LSH rounds
    n_buckets: int = 0  # even; 0 = 2 * block_size / chunk (trax's 2T/chunk, fixed so prefixes hash alike)
    factorize_hash: bool = False  # trax's option: n_buckets as n1 x n2 buckets of two hashes (see hash_buckets)
    chunk: int = 64  # m: sorted positions per chunk; a chunk attends to itself and the previous chunk
    ff_chunks: int = 1  # the feed-forward runs on this many slices of the sequence, one after the other
    attn_chunks: int = 1  # the attention runs on this many groups of heads, one after the other (<= n_head)
    axial_shape: tuple = ()  # (n1, n2) with n1 * n2 = block_size; () = the most square factorisation
    reversible: bool = True  # False: the same network with ordinary autograd (stores every layer's activations)
    lsh_every: int = 1  # LSH in every lsh_every-th layer, chunked local attention in the others (trax enwik8: 4)
    same_bucket_mask: bool = False  # the paper's mask on keys of other buckets (off in trax's final code)
    dup_correction: bool = False  # the paper's -log(count) for keys seen in several rounds (off in trax)
    causal_lsh: bool = False  # exactly causal LSH: the chunk most recent keys of a query's own bucket


def bucket_factors(config):
    """The hash's factors, whose product is the number of buckets: (n_buckets,), the paper's hash, or with
    factorize_hash trax's (n1, n2), both even, n1 the largest such divisor up to sqrt(n_buckets)."""
    n = config.n_buckets or 2 * -(-config.block_size // config.chunk)  # two per chunk, rounded up
    if not config.factorize_hash:
        return (n,)
    n1 = [d for d in range(2, math.isqrt(n) + 1, 2) if n % d == 0 and n // d % 2 == 0]
    if not n1:
        raise ValueError(f"factorize_hash needs n_buckets = n1 * n2 with n1, n2 even; {n} is not (set n_buckets)")
    return n1[-1], n // n1[-1]


def hash_buckets(q, rotations, factors=None):
    """Angular LSH (section 3): q (B, H, T, D), rotations (H, R, D, sum(factors)/2) -> buckets (B, H, R, T).

    One factor (the default, n_buckets = 2 x the columns): bucket = argmax([xR; -xR]). Several, trax's
    factorised hash: factor n_i hashes x on its own n_i/2 columns, and bucket = b_1 + n_1 (b_2 + n_2 (...)).
    With the default 2T/chunk buckets one factor means T/chunk columns, O(T^2) work in all; two, O(T^1.5)."""
    B, H, T, _ = q.shape
    columns = rotations.shape[-1]  # which grows with T by default: slice T so that each
    step = max(1, 2**24 // (B * H * rotations.shape[1] * columns))  # projection holds at most 2^24 numbers
    factors = factors or (2 * columns,)
    buckets = []
    for q_slice in q.detach().to(torch.promote_types(q.dtype, torch.float32)).split(step, dim=2):  # fp32 at least
        xr = torch.einsum("bhtd,hrdk->bhrtk", q_slice, rotations.to(q_slice.dtype))  # (B, H, R, step, columns)
        bucket, scale = 0, 1
        for xr_f, n in zip(xr.split([n // 2 for n in factors], dim=-1), factors):
            # argmax over [xR; -xR] without building it: the largest of xR, or the most negative one shifted by
            # n/2; a tie goes to xR, which comes first in the concatenation
            top, low = xr_f.max(dim=-1), xr_f.min(dim=-1)
            bucket = bucket + scale * torch.where(top.values >= -low.values, top.indices, low.indices + n // 2)
            scale *= n
        buckets.append(bucket)
    return torch.cat(buckets, dim=-1)


class SharedQKAttention(nn.Module):
    """Shared-QK attention over LSH buckets, or (use_lsh=False) over fixed chunks of the sequence."""

    def __init__(self, config, layer_idx, use_lsh):
        super().__init__()
        self.config, self.layer_idx, self.use_lsh = config, layer_idx, use_lsh
        self.n_head, self.factors = config.n_head, bucket_factors(config)
        self.qk = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.v = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.record, self.replay = None, None  # see bucket_tape

    def rotations(self, device):
        """Random rotations (H, R, D, n/2 summed over the factors n): fresh in every training forward, fixed per
        layer in eval.

        The training seed is drawn from torch's CPU generator, so the reversible backward, which restores that
        generator's state, draws the same rotations again (it replays the forward's buckets, bucket_tape, but the
        draw keeps the generator where the dropout after it expects it).
        """
        cfg = self.config
        seed = int(torch.randint(2**62, (1,))) if self.training else self.layer_idx
        generator = torch.Generator(device=device).manual_seed(seed)
        shape = (self.n_head, cfg.n_hashes, cfg.n_embd // self.n_head, sum(n // 2 for n in self.factors))
        return torch.randn(shape, device=device, generator=generator)

    def forward(self, x, heads=None, rotations=None):
        """x (B, T, C) -> (B, T, C). heads=(h0, h1): only heads h0..h1-1, and their share of the output
        projection (its bias with the share of head 0), with the caller's rotations (drawn once for all heads)."""
        B, T, C = x.shape
        D = C // self.n_head
        h0, h1 = heads or (0, self.n_head)
        rows = slice(h0 * D, h1 * D)  # these heads' rows of the q/k and v projections, columns of the output's

        def project(linear):  # (B, T, C) -> (B, H', T, D), contiguous: the layout the kernels read, made once
            bias = linear.bias[rows] if linear.bias is not None else None
            return F.linear(x, linear.weight[rows], bias).view(B, T, h1 - h0, D).transpose(1, 2).contiguous()
        q, v = project(self.qk), project(self.v)
        # Keys are unit vectors and logits are q.k with no 1/sqrt(D) factor, as in trax (lucidrains' version
        # multiplies by D^-0.5 as well).
        k = F.normalize(q, dim=-1)
        if self.use_lsh:  # the rotations are drawn in a replay too: the generator then moves on as it did
            rotations = self.rotations(x.device) if rotations is None else rotations
            if self.replay is not None:
                buckets = next(self.replay)
            else:
                buckets = hash_buckets(q, rotations[h0:h1], self.factors)  # (B, H', n_hashes, T)
                if self.record is not None:
                    self.record.append(buckets)
        else:  # one bucket and one round: the sort keeps the order, so chunks are consecutive positions
            buckets = torch.zeros(B, h1 - h0, 1, T, dtype=torch.long, device=x.device)
        y = lsh_attention(q, k, v, buckets, self.config.chunk, same_bucket_mask=self.config.same_bucket_mask,
                          dup_correction=self.config.dup_correction, causal=self.config.causal_lsh)
        y = y.transpose(1, 2).reshape(B, T, (h1 - h0) * D)  # (B, H', T, D) -> (B, T, H' D)
        return F.linear(y, self.proj.weight[:, rows], self.proj.bias if h0 == 0 else None)


def rng_state(device):
    """The CPU generator's state and, on CUDA, the device generator's: what dropout and hashing draw from."""
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


@contextmanager
def bucket_tape(attn, buckets=None):
    """Inside, attn records the buckets it hashes in a list (yielded), or replays `buckets` instead of hashing:
    the reversible recompute attends exactly as its forward did, without hashing a rebuilt input again."""
    attn.record, attn.replay = ([], None) if buckets is None else (None, iter(buckets))
    try:
        yield attn.record
    finally:
        attn.record = attn.replay = None


@contextmanager
def replayed_rng(state, device):
    """Run with the generators set to `state`; the global generators are left as they were afterwards."""
    cpu, cuda = state
    with torch.random.fork_rng(devices=[device] if cuda is not None else []):
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, device)
        yield


def wide(x):
    """x in float32 at least: the dtype head groups' parts are summed in (16-bit under autocast)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


class ReversibleBlock(nn.Module):
    """y1 = x1 + f(x2), y2 = x2 + g(y1) with f = attention and g = the chunked feed-forward (section 4)."""

    def __init__(self, config, layer_idx):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = SharedQKAttention(config, layer_idx, use_lsh=(layer_idx + 1) % config.lsh_every == 0)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)
        self.dropout = nn.Dropout(config.dropout)
        self.ff_chunks, self.attn_chunks = config.ff_chunks, config.attn_chunks

    def f(self, x2):
        if self.attn_chunks == 1:
            return self.dropout(self.attn(self.ln_1(x2)))
        return sum(wide(part) for part in self.f_parts(self.ln_1(x2)))

    def f_parts(self, h):
        """f from the normalised h as attn_chunks parts that add up to it, a group of heads each (attention is
        per head, the output projection a sum over heads), so that the backward can free each group's
        activations before the next. The rotations and the dropout mask are drawn once, for all groups."""
        rotations = self.attn.rotations(h.device) if self.attn.use_lsh else None
        keep = self.dropout(torch.ones_like(h)) if self.training and self.dropout.p > 0 else 1.0  # 0 or 1/(1-p)
        for heads in torch.arange(self.attn.n_head).chunk(self.attn_chunks):
            yield self.attn(h, (int(heads[0]), int(heads[-1]) + 1), rotations) * keep

    def g_slice(self, y1):
        return self.dropout(self.mlp(self.ln_2(y1)))

    def g(self, y1):  # position-wise, so slicing the sequence gives the same result with a smaller peak
        return torch.cat([self.g_slice(s) for s in y1.chunk(self.ff_chunks, dim=1)], dim=1)

    def forward(self, x1, x2):
        y1 = x1 + self.f(x2)
        return y1, x2 + self.g(y1)

    def forward_saving(self, x1, x2):
        """forward() that also returns what the recompute replays: the generator states f and g start from
        and the buckets f hashed."""
        f_rng = rng_state(x2.device)
        with bucket_tape(self.attn) as buckets:
            y1 = x1 + self.f(x2)
        g_rng = rng_state(x2.device)
        return y1, x2 + self.g(y1), (f_rng, g_rng, buckets)

    def backward_pass(self, y1, y2, dy1, dy2, saved, reuse_y, reuse_dy):
        """Rebuild (x1, x2) from (y1, y2) and turn (dy1, dy2) into (dx1, dx2); parameter grads go to .grad.
        reuse_y, reuse_dy: whether (y1, y2), (dy1, dy2) are dead afterwards, so the results may take their memory."""
        f_rng, g_rng, buckets = saved
        y1 = y1.detach().requires_grad_()
        gy1 = []
        with torch.enable_grad(), replayed_rng(g_rng, y1.device):
            for y1_s, dy2_s in zip(y1.chunk(self.ff_chunks, dim=1), dy2.chunk(self.ff_chunks, dim=1)):
                g_s = self.g_slice(y1_s)
                torch.autograd.backward(g_s, dy2_s)  # frees this slice's activations before the next one
                gy1.append(g_s.detach())
        # In place where a tensor is dead afterwards (the fresh .grad buffers always; the inputs when reused):
        # memory that grows with the sequence is the reason for this class, and every (B, T, C) buffer not
        # allocated is a few percent of the peak.
        with torch.no_grad():
            x2 = y2.sub_(torch.cat(gy1, dim=1)) if reuse_y else y2 - torch.cat(gy1, dim=1)
            dx1 = dy1.add_(y1.grad) if reuse_dy else y1.grad.add_(dy1)
        del gy1, y2, dy1
        y1.grad = None
        x2.requires_grad_()
        with torch.enable_grad(), replayed_rng(f_rng, x2.device), bucket_tape(self.attn, buckets):
            if self.attn_chunks == 1:
                fx2 = self.f(x2)
                torch.autograd.backward(fx2, dx1)
            else:  # group by group of heads, as the feed-forward goes slice by slice; the same sum as f()
                h = self.ln_1(x2)
                h_in = h.detach().requires_grad_()
                fx2 = 0
                # A view, not h_in itself: autocast takes a float32 leaf that requires grad for a weight and
                # caches its 16-bit copy until the autocast context ends, and that copy's graph would keep every
                # layer's h_in and its grad alive through the whole backward (figures: docs/design.md)
                for part in self.f_parts(h_in.view_as(h_in)):
                    torch.autograd.backward(part, dx1)
                    fx2 = fx2 + wide(part.detach())
                torch.autograd.backward(h, h_in.grad)
        with torch.no_grad():
            x1 = y1.detach().sub_(fx2) if reuse_y else y1 - fx2
            dx2 = dy2.add_(x2.grad) if reuse_dy else x2.grad.add_(dy2)
        return x1, x2.detach(), dx1, dx2


class ReversibleSequence(torch.autograd.Function):
    """Runs the blocks without storing activations; the backward rebuilds them block by block, last first."""

    @staticmethod
    def forward(ctx, x1, x2, blocks):
        ctx.blocks, ctx.saved = blocks, []
        for block in blocks:
            x1, x2, saved = block.forward_saving(x1, x2)
            ctx.saved.append(saved)
        device = x1.device.type  # the recompute must see the same autocast setting as the forward
        ctx.autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        # The outputs as detached aliases, not saved tensors: the backward rebuilds the last layer's inputs in
        # their memory (nothing else reads them by then), one (B, T, C) pair fewer at its peak. A second backward
        # through the same graph therefore cannot work, and says so.
        ctx.outputs = (x1.detach(), x2.detach())
        return x1, x2

    @staticmethod
    def backward(ctx, dy1, dy2):
        if ctx.outputs is None:
            raise RuntimeError("the reversible backward rebuilds the layers' inputs in its outputs' memory, so it "
                               "runs once per forward: run the forward again instead of retain_graph=True")
        (y1, y2), ctx.outputs = ctx.outputs, None
        device, enabled, dtype = ctx.autocast
        with torch.autocast(device, dtype=dtype, enabled=enabled):
            for i, (block, saved) in enumerate(zip(reversed(ctx.blocks), reversed(ctx.saved))):
                # the incoming gradients are not ours to overwrite (one tensor may be both); rebuilt ones are
                y1, y2, dy1, dy2 = block.backward_pass(y1, y2, dy1, dy2, saved, reuse_y=True, reuse_dy=i > 0)
        return dy1, dy2, None


def axial_shape(config):
    """(n1, n2) with n1 * n2 = block_size: config.axial_shape, or the most square factorisation (n1 <= n2)."""
    if config.axial_shape:
        if len(config.axial_shape) != 2:
            raise ValueError(f"axial_shape {tuple(config.axial_shape)} must be two numbers (n1, n2)")
        n1, n2 = config.axial_shape
        if n1 * n2 != config.block_size:
            raise ValueError(f"axial_shape {tuple(config.axial_shape)} must multiply to block_size "
                             f"{config.block_size}; leave it empty to factorise block_size automatically")
        return n1, n2
    n1 = max(d for d in range(1, math.isqrt(config.block_size) + 1) if config.block_size % d == 0)
    return n1, config.block_size // n1


class AxialPositionEmbedding(nn.Module):
    """e(i) = [E1[i // n2]; E2[i % n2]] (widths C//2 and C - C//2): n1 + n2 vectors instead of n1 * n2."""

    def __init__(self, config):
        super().__init__()
        self.n1, self.n2 = axial_shape(config)
        self.rows = nn.Parameter(torch.empty(self.n1, config.n_embd // 2))
        self.cols = nn.Parameter(torch.empty(self.n2, config.n_embd - config.n_embd // 2))

    def forward(self, T):
        rows = self.rows[:, None].expand(self.n1, self.n2, -1)  # (n1, n2, C//2)
        cols = self.cols[None, :].expand(self.n1, self.n2, -1)  # (n1, n2, C - C//2)
        return torch.cat([rows, cols], dim=-1).reshape(self.n1 * self.n2, -1)[:T]  # (T, C)


class Reformer(nn.Module):
    def __init__(self, config):
        super().__init__()
        if config.chunk < 1:
            raise ValueError(f"chunk must be at least 1, got {config.chunk}")
        if config.n_embd % config.n_head != 0:
            raise ValueError(f"n_embd ({config.n_embd}) must be divisible by n_head ({config.n_head})")
        if not 1 <= config.attn_chunks <= config.n_head:
            raise ValueError(f"attn_chunks must be between 1 and n_head ({config.n_head}), got {config.attn_chunks}")
        for name in ("n_hashes", "ff_chunks", "lsh_every"):
            if getattr(config, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(config, name)}")
        if config.n_buckets % 2 != 0 or config.n_buckets < 0:
            raise ValueError(f"n_buckets must be even (the hash is argmax over [xR; -xR]) or 0 for automatic; "
                             f"got {config.n_buckets}")
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = AxialPositionEmbedding(config)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList([ReversibleBlock(config, i) for i in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(2 * config.n_embd, bias=config.bias)  # over the concatenated halves, as trax
        self.lm_head = nn.Linear(2 * config.n_embd, config.vocab_size, bias=False)  # untied: init_weights says why
        init_weights(self, config.n_layer)
        # Whether a later token can never change an earlier output (train.py's contract; see the top)
        self.exactly_causal = config.causal_lsh or not any(b.attn.use_lsh for b in self.blocks)

    def forward(self, idx, targets=None):
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence length {T} exceeds the model's block_size {self.config.block_size}")
        x = self.drop(self.wte(idx) + self.wpe(T))  # (B, T, C)
        if self.config.reversible and torch.is_grad_enabled():
            x1, x2 = ReversibleSequence.apply(x, x, self.blocks)
        else:
            x1, x2 = x, x
            for block in self.blocks:
                x1, x2 = block(x1, x2)
        logits = self.lm_head(self.ln_f(torch.cat([x1, x2], dim=-1)))  # (B, T, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1))
        return logits, loss

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, generator=None, use_cache=False):
        """Append max_new_tokens sampled tokens to idx (B, T), each predicted from exactly its prefix (at most
        block_size tokens, no padding). No cache (use_cache is accepted for the common interface and has no
        effect): each new token changes the sort of every hash round, so the whole prefix is recomputed."""
        for _ in range(max_new_tokens):
            logits, _ = self(idx[:, -self.config.block_size:])
            idx = torch.cat([idx, sample_next(logits[:, -1], temperature, top_k, generator)], dim=1)
        return idx
