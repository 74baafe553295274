"""
Sparse Transformer (Child, Gray, Radford, Sutskever 2019, "Generating Long Sequences with Sparse
Transformers", arXiv 1904.10509): a decoder-only Transformer whose residual blocks are pre-activation
(section 5.2):

    H_0 = embed(x);  H_k = H_{k-1} + resblock(H_{k-1});  logits = norm(H_L) W_out
    resblock(H):  a = dropout(attention(norm(H)));  b = dropout(ff(norm(H + a)));  return a + b
    ff(x) = W2 gelu(W1 x + b1) + b2

with W2 and the attention output projection initialised scaled by 1/sqrt(2L). This file holds the dense
pattern ("all", selected as `--model transformer`): every position attends to every earlier position.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from kernels import attention


@dataclass
class Config:
    block_size: int = 1024  # the longest sequence the model takes (position embeddings are learned)
    vocab_size: int = 256  # bytes / 8-bit pixel values / 8-bit mu-law samples
    n_layer: int = 6
    n_head: int = 8
    n_embd: int = 512
    dropout: float = 0.0
    bias: bool = True


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0, "n_embd must be divisible by n_head"
        self.n_head = config.n_head
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        # (B, T, C) -> (B, H, T, D)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = attention(q, k, v, causal=True)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, H, T, D) -> (B, T, C)
        return self.proj(y)


class MLP(nn.Module):
    def __init__(self, config, hidden=None):
        super().__init__()
        hidden = hidden or 4 * config.n_embd
        self.fc = nn.Linear(config.n_embd, hidden, bias=config.bias)
        self.proj = nn.Linear(hidden, config.n_embd, bias=config.bias)

    def forward(self, x):
        return self.proj(F.gelu(self.fc(x)))


class Block(nn.Module):
    """The pre-activation residual block: returns H + a + b (section 5.2)."""

    def __init__(self, config, attn=None):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = attn if attn is not None else CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        a = self.dropout(self.attn(self.ln_1(x)))
        b = self.dropout(self.mlp(self.ln_2(x + a)))
        return x + a + b


def init_weights(model, n_layer):
    """GPT-style init; output projections of each residual branch scaled by 1/sqrt(2L) (section 5.2)."""
    for name, p in model.named_parameters():
        if p.dim() >= 2:
            std = 0.02 / math.sqrt(2 * n_layer) if name.endswith("proj.weight") else 0.02
            nn.init.normal_(p, mean=0.0, std=std)
        elif name.endswith("bias"):
            nn.init.zeros_(p)


def configure_optimizers(model, weight_decay, learning_rate, betas, device_type):
    """AdamW with weight decay on matrices only (not on biases, norms or embeddings of 1-D shape)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = device_type == "cuda"
    return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=fused)


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
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        init_weights(self, config.n_layer)

    def forward(self, idx, targets=None):
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence length {T} exceeds the model's block_size {self.config.block_size}")
        pos = torch.arange(T, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))  # (B, T, C)
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))  # (B, T, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1))
        return logits, loss

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        return configure_optimizers(self, weight_decay, learning_rate, betas, device_type)

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, generator=None):
        """Append max_new_tokens sampled tokens to idx (B, T), feeding at most block_size tokens back in."""
        for _ in range(max_new_tokens):
            logits, _ = self(idx[:, -self.config.block_size:])
            idx = torch.cat([idx, sample_next(logits[:, -1], temperature, top_k, generator)], dim=1)
        return idx
