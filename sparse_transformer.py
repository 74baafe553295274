"""
Sparse Transformer (Child, Gray, Radford, Sutskever 2019, "Generating Long Sequences with Sparse
Transformers", arXiv 1904.10509): a decoder-only Transformer whose attention heads see only a sparse,
fixed subset of the past, built from two parts A1 and A2 with l ~ sqrt(n):

    strided:  A1(i) = {j : i - l < j <= i}                A2(i) = {j <= i : (i - j) mod l = 0}
    fixed:    A1(i) = {j <= i : floor(j/l) = floor(i/l)}  A2(i) = {j <= i : j mod l in [l - c, l)}

"all" is the dense baseline (`--model transformer`), "local" is A1 of strided alone. The parts combine by
interleaving (residual block r uses part r mod 2), merging (each head attends to A1 u A2) or splitting the
heads between them and concatenating their outputs. Both patterns run as block-sparse attention: every part is a
boolean tile layout (which tiles of the attention matrix are computed) plus the causal mask and, for the
local band, a sliding window; the strided part A2 becomes block-diagonal after the paper's transpose.

Residual blocks are pre-activation (section 5.2), with dropout only at the end of each residual branch:

    H_0 = embed(x) + positions;  H_k = H_{k-1} + resblock(H_{k-1});  logits = norm(H_L) W_out
    resblock(H):  a = dropout(attention(norm(H)));  b = dropout(ff(norm(H + a)));  return a + b
    ff(x) = W2 gelu(W1 x + b1) + b2

W2 and the attention output projection start scaled by 1/sqrt(2L); W_out is the token embedding, not zero as in
the official code (init_weights says why). `recompute` recomputes each block in the backward pass, as the paper
does, so stored activations never hold n x n maps.
"""
import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from kernels import attention, causal_mask, decoding_sdpa

PATTERNS = ("all", "local", "strided", "fixed")
COMBINES = ("interleaved", "merged", "multihead")
POS_EMBS = ("learned", "factorized", "image")


@dataclass
class Config:
    block_size: int = 1024  # the longest sequence the model takes
    vocab_size: int = 256  # bytes / 8-bit pixel values / 8-bit mu-law samples
    n_layer: int = 6
    n_head: int = 8
    n_embd: int = 512
    dropout: float = 0.0
    bias: bool = True  # biases in the linear layers and LayerNorms
    pattern: str = "all"  # "all" (dense), "local", "strided" or "fixed"
    stride: int = 0  # l: width of the local band, the stride, or the length of a fixed block; 0 = auto_stride
    summary: int = 32  # c: the summary positions at the end of each fixed block
    n_offsets: int = 4  # fixed: head h reads the summary sub-block h mod n_offsets from the block's end
    combine: str = "interleaved"  # how A1 and A2 combine: "interleaved", "merged" or "multihead"
    tile: int = 0  # side of the attention tiles the block-sparse kernel computes; 0 = auto_tile
    recompute: bool = False  # recompute each block in the backward pass instead of storing activations
    pos_emb: str = "learned"  # "learned" (one per position), "factorized" (row, column), "image" (row, col, channel)


def auto_tile(config):
    """The official code's 32, which keeps the patterns of short sequences fine; 64 from block_size 4096 on, where
    a GPU run is likely and an H100 needs tiles of 64 rows for its fast matrix instructions (wgmma: 32-row tiles
    compile to the older mma), whenever the pattern tiles into 64s (fixed: stride and summary multiples of 64)."""
    tiles = config.pattern != "fixed" or config.stride % 64 == 0 and config.summary % 64 == 0
    return 64 if config.block_size >= 4096 and tiles else 32


def auto_stride(config):
    """l ~ sqrt(n) as the paper suggests: for strided the largest l <= sqrt(n) with n/l a multiple of the tile
    (the transposed order tiles exactly); for local and fixed the paper's 128."""
    n, tile = config.block_size, config.tile
    if config.pattern != "strided":
        return 128
    fits = [l for l in range(1, math.isqrt(n) + 1) if n % (l * tile) == 0]
    if not fits:
        raise ValueError(f"no stride tiles block_size {n} into tiles of {tile}: choose a block_size that is a "
                         f"multiple of tile * l for some l, e.g. {tile * tile}")
    return fits[-1]


def check_config(config):
    """Raise ValueError for settings the patterns cannot take, saying what works instead."""
    for name, value, allowed in (("pattern", config.pattern, PATTERNS), ("combine", config.combine, COMBINES),
                                 ("pos_emb", config.pos_emb, POS_EMBS)):
        if value not in allowed:
            raise ValueError(f"unknown {name} {value!r}; choose one of {', '.join(allowed)}")
    for name in ("tile", "summary", "n_offsets"):
        if getattr(config, name) < 1:
            raise ValueError(f"{name} must be at least 1, got {getattr(config, name)}")
    if config.stride < 0:
        raise ValueError(f"stride must be 0 (automatic) or a positive number of positions, got {config.stride}")
    if config.n_embd % config.n_head:
        raise ValueError(f"n_embd ({config.n_embd}) must be divisible by n_head ({config.n_head})")
    l, c, tile, n = config.stride or auto_stride(config), config.summary, config.tile, config.block_size
    if config.pattern == "strided" and n % (l * tile) != 0:
        strides = [s for s in range(1, n + 1) if n % (s * tile) == 0]
        raise ValueError(
            f"the strided pattern views the sequence as an [n/l, l] matrix and needs n/l to be a multiple of "
            f"tile, so block_size must be a multiple of stride * tile = {l * tile} "
            f"(e.g. {l * tile}, {2 * l * tile}, {4 * l * tile}); with block_size {n} and tile {tile} the "
            f"strides that work are {strides or 'none (lower tile)'}")
    if config.pattern == "fixed":
        if l % tile or c % tile or not 0 < c <= l:
            raise ValueError(
                f"the fixed pattern is exact at tile level only when stride (l={l}) and summary (c={c}) are "
                f"multiples of tile ({tile}) with 0 < c <= l; e.g. stride 128, summary 32, tile 32")
        if config.n_offsets < 1 or config.n_offsets * c > l:
            raise ValueError(f"n_offsets ({config.n_offsets}) summary sub-blocks of c={c} must fit in a block of "
                             f"l={l}: choose 1 <= n_offsets <= {l // c}")
    if config.pattern in ("strided", "fixed") and config.combine == "multihead" and config.n_head % 2:
        raise ValueError(f"combine='multihead' splits the heads evenly between A1 and A2; n_head={config.n_head} "
                         f"must be even")
    if config.pos_emb == "image" and n != 3 * round(math.sqrt(n / 3)) ** 2:
        raise ValueError(f"pos_emb='image' embeds (row, column, channel) of a square RGB image, so block_size "
                         f"must be 3 * side^2 (3072 for 32x32x3), not {n}")


# ----------------------------------------------------------------------------------------------------------------
# The patterns as sets: element masks straight from the definitions, for readers, tests and cached decoding.

def head_parts(config, layer):
    """The parts of the pattern each head of residual block `layer` attends to: a tuple of H tuples of names."""
    H = config.n_head
    if config.pattern in ("all", "local"):
        return ((config.pattern,),) * H
    A1, A2 = ("local", "strided") if config.pattern == "strided" else ("block", "summary")
    if config.combine == "interleaved":
        return (((A1, A2)[layer % 2],),) * H
    if config.combine == "merged":
        return ((A1, A2),) * H
    return ((A1,),) * (H // 2) + ((A2,),) * (H // 2)  # multihead


def part_mask(part, i, j, config, head=0):
    """Whether query position i may attend to key position j under one part of the pattern (broadcasts)."""
    l, c = config.stride, config.summary
    causal = j <= i
    if part == "all":
        return causal
    if part == "local":  # l keys (the official code's `local`); the paper's t = max(0, i - l) gives l + 1
        return causal & (j > i - l)
    if part == "strided":
        return causal & ((i - j) % l == 0)
    if part == "block":
        return causal & (j // l == i // l)
    offset = (head % config.n_offsets) * c  # "summary": head h reads its own sub-block, as the official code
    return causal & (j % l >= l - c - offset) & (j % l < l - offset)


def element_mask(config, layer, q_pos, k_pos):
    """The (H, len(q_pos), len(k_pos)) boolean mask of residual block `layer` for 1-D position tensors."""
    i, j = q_pos[:, None], k_pos[None, :]
    masks = []
    for h, parts in enumerate(head_parts(config, layer)):
        m = part_mask(parts[0], i, j, config, h)
        for part in parts[1:]:
            m = m | part_mask(part, i, j, config, h)
        masks.append(m)
    return torch.stack(masks)


# ----------------------------------------------------------------------------------------------------------------
# The patterns as tile layouts: boolean (n_tiles, n_tiles) tensors of the tiles the kernel computes. Together
# with the kernel's causal mask (and window, for "local") each reproduces its part's element mask exactly.

def causal_tiles(n_tiles):
    return torch.ones(n_tiles, n_tiles, dtype=torch.bool).tril()


def local_layout(n_tiles, tile, l):
    """Tiles that meet the band i - l < j <= i, i.e. (qt - kt) * tile < l + tile - 1; the kernel's
    window=l cuts the band inside them."""
    return causal_tiles(n_tiles).triu(-((l + tile - 2) // tile))


def strided_layout(n_tiles, tile, n, l):
    """On the transposed sequence each residue class mod l is a contiguous run of n/l positions in original
    order, so A2 is causal attention inside each run: whole tiles on the block diagonal of each run."""
    run = n // l // tile  # tiles per run
    return torch.block_diag(*[causal_tiles(run)] * (n_tiles // run))


def fixed_layout(n_tiles, tile, l):
    """A1 of fixed: the tiles of the query's own block of length l."""
    chunk = torch.arange(n_tiles) * tile // l
    return causal_tiles(n_tiles) & (chunk[:, None] == chunk[None, :])


def summary_layout(n_tiles, tile, l, c, offset):
    """A2 of fixed: the key tiles holding positions [l - c - offset, l - offset) of every block of length l."""
    start = torch.arange(n_tiles) * tile % l
    return causal_tiles(n_tiles) & ((start >= l - c - offset) & (start < l - offset))[None, :]


def layer_layout(config, layer, kind, n):
    """The tile layout (H or 1, n/tile, n/tile) of one layer for kind "local", "strided" (on the transposed
    order) or "fixed" (per head, the union of the parts the head attends to). Try print(layer_layout(...))."""
    tile, l, c, nt = config.tile, config.stride, config.summary, n // config.tile
    if kind == "local":
        return local_layout(nt, tile, l)[None]
    if kind == "strided":
        return strided_layout(nt, tile, n, l)[None]
    layouts = []
    for h, parts in enumerate(head_parts(config, layer)):
        layout = torch.zeros(nt, nt, dtype=torch.bool)
        if "block" in parts:
            layout |= fixed_layout(nt, tile, l)
        if "summary" in parts:
            layout |= summary_layout(nt, tile, l, c, (h % config.n_offsets) * c)
        layouts.append(layout)
    return torch.stack(layouts)


def strided_transpose(x, l, tile):
    """(B, H, n, D) -> (B, H, n, D) reordered by j mod l, then j: the [n/l, l] matrix read column by column."""
    B, H, n, D = x.shape
    if n % l or (n // l) % tile:
        raise ValueError(f"the strided transpose needs the length n={n} to be a multiple of stride * tile "
                         f"= {l * tile} (n/l a multiple of the tile); lengths that work: "
                         f"{l * tile}, {2 * l * tile}, {3 * l * tile}, ...")
    return x.view(B, H, n // l, l, D).transpose(2, 3).reshape(B, H, n, D)


def strided_untranspose(x, l):
    B, H, n, D = x.shape
    return x.view(B, H, l, n // l, D).transpose(2, 3).reshape(B, H, n, D)


# ----------------------------------------------------------------------------------------------------------------
# The model

class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention under the pattern of residual block `layer`."""

    def __init__(self, config, layer=0):
        super().__init__()
        self.config = config
        self.pattern = config.pattern
        self.layer = layer
        self.layouts = {}  # (kind, n) -> tile layout on the CPU: building one costs more than using it
        self.n_head = config.n_head
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)

    def forward(self, x, cache=None):
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        # (B, T, C) -> (B, H, T, D)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = self.attend(q, k, v) if cache is None else self.attend_cached(q, k, v, cache)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, H, T, D) -> (B, T, C)
        return self.proj(y)

    def attend(self, q, k, v):
        cfg = self.config
        if self.pattern == "all":
            return attention(q, k, v)
        # Pad the end to a length the layouts tile (for strided also a valid transpose). Padding only adds
        # future keys, which the causal mask hides from every real query.
        T = q.size(2)
        multiple = cfg.stride * cfg.tile if cfg.pattern == "strided" else cfg.tile
        n = -(-T // multiple) * multiple
        if n != T:
            q, k, v = (F.pad(t, (0, 0, 0, n - T)) for t in (q, k, v))
        y = self.fixed(q, k, v) if cfg.pattern == "fixed" else self.strided(q, k, v)
        return y[:, :, :T]

    def layout(self, kind, n):
        if (kind, n) not in self.layouts:
            self.layouts[kind, n] = layer_layout(self.config, self.layer, kind, n)
        return self.layouts[kind, n]

    def fixed(self, q, k, v):
        """A1 and A2 of fixed are both whole tiles: one kernel call with a per-head layout."""
        return attention(q, k, v, layout=self.layout("fixed", q.size(2)), tile=self.config.tile)

    def strided(self, q, k, v):
        """The local band (pattern "local", A1 of strided) and the transposed A2 of strided, in their orders."""
        parts = head_parts(self.config, self.layer)
        if parts[0] == ("local", "strided"):
            # merged: the union is neither whole tiles nor a band in either order, so it runs densely with
            # the element mask (memory O(n^2)); interleaved and multihead are the block-sparse choices
            pos = torch.arange(q.size(2), device=q.device)
            mask = element_mask(self.config, self.layer, pos, pos)[0]  # (n, n): every head has the same one
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        if parts[0] != parts[-1]:  # multihead: first half of the heads local, second half strided
            h = self.n_head // 2
            return torch.cat([self.local(q[:, :h], k[:, :h], v[:, :h]),
                              self.transposed(q[:, h:], k[:, h:], v[:, h:])], dim=1)
        return self.local(q, k, v) if parts[0] == ("local",) else self.transposed(q, k, v)

    def local(self, q, k, v):
        layout = self.layout("local", q.size(2))  # (1, n/tile, n/tile)
        return attention(q, k, v, layout=layout, tile=self.config.tile, window=self.config.stride)

    def transposed(self, q, k, v):
        """A2 of strided, block-sparse: in the transposed order it is causal attention within each run."""
        tile, l = self.config.tile, self.config.stride
        q, k, v = (strided_transpose(t, l, tile) for t in (q, k, v))
        layout = self.layout("strided", q.size(2))  # (1, n/tile, n/tile)
        return strided_untranspose(attention(q, k, v, layout=layout, tile=tile), l)

    def attend_cached(self, q, k, v, cache):
        """Decoding: append k, v to the cache; each new query attends to the cached keys its mask row allows."""
        if cache:
            k, v = torch.cat([cache["k"], k], dim=2), torch.cat([cache["v"], v], dim=2)  # (B, H, S, D)
        cache["k"], cache["v"] = k, v
        T, S = q.size(2), k.size(2)
        if self.pattern == "all":
            mask = causal_mask(T, S, q.device)  # (T, S)
        else:
            pos = torch.arange(S, device=q.device)
            mask = element_mask(self.config, self.layer, pos[S - T:], pos)  # (H, T, S)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class MLP(nn.Module):
    """ff(x) = W2 gelu(W1 x + b1) + b2, 4x wide."""

    def __init__(self, config):
        super().__init__()
        self.fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)

    def forward(self, x):
        return self.proj(F.gelu(self.fc(x)))


class Block(nn.Module):
    """The pre-activation residual block: returns H + a + b (section 5.2)."""

    def __init__(self, config, attn):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = attn  # the token mixer: CausalSelfAttention here, AFTMixer in aft.py
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x, cache=None):
        h = self.ln_1(x)
        a = self.dropout(self.attn(h) if cache is None else self.attn(h, cache))
        b = self.dropout(self.mlp(self.ln_2(x + a)))
        return x + a + b


class PositionEmbedding(nn.Module):
    """Learned position embeddings, summed: one per position, or one per coordinate of the position in a
    matrix of width l (text, audio) or in a 3-channel square image in raster order, as the paper does."""

    def __init__(self, config):
        super().__init__()
        self.kind, self.l = config.pos_emb, config.stride
        self.side = round(math.sqrt(config.block_size / 3))
        sizes = {"learned": [config.block_size],
                 "factorized": [-(-config.block_size // self.l), self.l],
                 "image": [self.side, self.side, 3]}[self.kind]
        self.tables = nn.ModuleList(nn.Embedding(size, config.n_embd) for size in sizes)

    def forward(self, pos):
        if self.kind == "learned":
            coords = [pos]
        elif self.kind == "factorized":
            coords = [pos // self.l, pos % self.l]
        else:  # token t is channel t % 3 of pixel (row t // (3 side), column (t // 3) % side)
            coords = [pos // (3 * self.side), (pos // 3) % self.side, pos % 3]
        return sum(table(c) for table, c in zip(self.tables, coords))  # (T, C)


def init_weights(model, n_layer):
    """The one init of every model in this repository (all four model files call it): matrices N(0, 0.02) as in
    GPT-2, the output projection of each residual branch N(0, 0.02 / sqrt(2L)) (section 5.2), biases zero.

    The output layer W_out starts N(0, 0.02) too: the token embedding (tied, as in GPT-2 and nanoGPT) in the
    Transformer, the Sparse Transformer and AFT; a matrix of its own in the Reformer (it reads both reversible
    halves, 2C wide) and in Perceiver AR (tied, it learns its copy task far slower). Not zero, as in the official
    code: AdamW's first update of a zero W_out is the sign of its gradient (softmax - onehot)^T h, nearly rank one
    as the LayerNorm outputs h of a fresh network share one direction; W_out then stays nearly rank one for
    hundreds of steps, and so does the gradient every layer below receives through it (docs/design.md: figures)."""
    for name, p in model.named_parameters():
        if p.dim() >= 2:
            std = 0.02 / math.sqrt(2 * n_layer) if name.endswith("proj.weight") else 0.02
            nn.init.normal_(p, mean=0.0, std=std)
        elif name.rsplit(".", 1)[-1].startswith("bias"):  # also nn.GRU's bias_ih_l0 and the like
            nn.init.zeros_(p)


def sample_next(logits, temperature=1.0, top_k=None, generator=None):
    """One token per row from the last-position logits (B, V) -> (B, 1)."""
    logits = logits / max(temperature, 1e-8)
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = F.softmax(logits.float(), dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)


class SparseTransformer(nn.Module):
    def __init__(self, config):
        super().__init__()
        if config.tile == 0:
            config = dataclasses.replace(config, tile=auto_tile(config))
        check_config(config)
        if config.stride == 0:
            config = dataclasses.replace(config, stride=auto_stride(config))
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = PositionEmbedding(config)
        self.blocks = nn.ModuleList([Block(config, CausalSelfAttention(config, r)) for r in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied (init_weights says why)
        init_weights(self, config.n_layer)

    def forward(self, idx, targets=None, cache=None):
        """cache: None, or one dict per block holding the keys and values of the positions decoded so far."""
        B, T = idx.shape
        start = cache[0]["k"].size(2) if cache and cache[0] else 0
        if start + T > self.config.block_size:
            raise ValueError(f"sequence length {start + T} exceeds the model's block_size {self.config.block_size}")
        x = self.wte(idx) + self.wpe(torch.arange(start, start + T, device=idx.device))  # (B, T, C)
        for r, block in enumerate(self.blocks):
            if cache is not None:
                x = block(x, cache[r])
            elif self.config.recompute and self.training:
                x = checkpoint(block, x, use_reentrant=False)  # replays the dropout RNG in the backward
            else:
                x = block(x)
        logits = self.lm_head(self.ln_f(x))  # (B, T, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1))
        return logits, loss

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, generator=None, use_cache=True):
        """Append max_new_tokens sampled tokens to idx (B, T), feeding at most block_size tokens back in.
        With use_cache each step feeds only the tokens not yet cached; once the sequence outgrows block_size
        every position of the window shifts, so from then on each step runs the whole window again."""
        cache = [{} for _ in self.blocks]
        with decoding_sdpa():
            for _ in range(max_new_tokens):
                if use_cache and idx.size(1) <= self.config.block_size:
                    done = cache[0]["k"].size(2) if cache[0] else 0
                    logits, _ = self(idx[:, done:], cache=cache)
                else:
                    logits, _ = self(idx[:, -self.config.block_size:])
                idx = torch.cat([idx, sample_next(logits[:, -1], temperature, top_k, generator)], dim=1)
        return idx
