"""
nanolong's tests: `pytest test_all.py`. CPU only; the Triton kernels run under Triton's interpreter.
`NANOLONG_SLOW=1 pytest test_all.py` also runs the long tests (CI does): the rest skip them, saying so.

Sections, in the README's order (search for the header line to jump; `pytest test_all.py -k reformer` runs one
model's tests): shared helpers (dense references, tiny inputs and models) | data: download, verify, cache |
the dense baseline and the training loop (checkpoints, resuming) | bad input gets a clear error |
sparse_transformer.py | reformer.py and the LSH kernel | aft.py and the AFT kernels | perceiver_ar.py |
causality: every model, backend and kernel | sampling modes and bench.py | kernels.py: the block-sparse kernel,
and the compile check for real GPUs | GPU tests (skipped without CUDA).
Forking one model: its section, plus its rows in the causality and bad-input tables.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first import of triton (via kernels)

import bz2
import dataclasses
import functools
import gc
import gzip
import hashlib
import importlib
import io
import itertools
import json
import math
import pickle
import re
import shutil
import signal
import struct
import subprocess
import sys
import tarfile
import tempfile
import time
import types
import wave
import weakref
import zipfile
import zlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import aft
import bench
import data
import kernels
import perceiver_ar
import reformer
import sample
import sparse_transformer as st
import train
from aft import AFT, AFTMixer, aft_full, aft_local, aft_simple
from kernels import SELF_LOGIT, attention, dense_attention, lsh_attention
from perceiver_ar import PerceiverAR
from reformer import Reformer, ReversibleBlock, axial_shape, hash_buckets
from sparse_transformer import Config, SparseTransformer, element_mask

HERE = os.path.dirname(os.path.abspath(__file__))
SLOW = os.environ.get("NANOLONG_SLOW") == "1"  # the long tests: training, compiling for GPUs, keys x100 interpreted
slow = pytest.mark.skipif(not SLOW, reason="a long test: NANOLONG_SLOW=1 pytest test_all.py runs it, as CI does")
SHARED_DATA = os.path.join(HERE, "..", "shared", "data")
TINY = ["--n_layer", "2", "--n_head", "2", "--n_embd", "32", "--block_size", "32", "--batch_size", "4",
        "--eval_iters", "2", "--warmup", "5", "--device", "cpu"]


def quicken_the_interpreter():
    """Two costs of Triton's interpreter that buy these tests nothing, a third of an interpreted kernel's time:
    it patches triton.language anew (inspect.getmembers over it) at every call of a @triton.jit helper inside a
    kernel, although the launch has patched it already and undoes only its own patch at the end; and it checks
    every int32 add and multiply for overflow, which the offsets of these tests' sizes (a few million at most)
    cannot reach. Both read Triton's private names; where they differ (other versions), nothing changes."""
    import triton.language as tl
    from triton.runtime import interpreter
    patch, scope = getattr(interpreter, "_patch_lang", None), getattr(interpreter, "_LangPatchScope", None)
    if patch is not None and scope is not None:
        def patch_unless_patched(fn):
            langs = [value for value in fn.__globals__.values() if value is tl or value is tl.core]
            if langs and not any(tl.core.is_builtin(lang.program_id) for lang in langs):  # patched: a lambda now
                return scope()  # nothing to undo
            return patch(fn)  # the launch, or a helper of a module it did not patch (triton.language's own)
        interpreter._patch_lang = patch_unless_patched
    builder = getattr(interpreter, "interpreter_builder", None)
    if dataclasses.is_dataclass(getattr(builder, "options", None)) and hasattr(builder.options, "sanitize_overflow"):
        builder.options = dataclasses.replace(builder.options, sanitize_overflow=False)


if os.environ["TRITON_INTERPRET"] == "1":
    quicken_the_interpreter()


def skip_large_keys_on_the_interpreter(backend, scale):
    """A probe's keys x100 through the Triton interpreter: the same kernels as at scale 1, a long run."""
    if backend == "triton" and scale > 1 and not SLOW:
        pytest.skip("keys x100 through the interpreter: NANOLONG_SLOW=1 pytest test_all.py runs it, as CI does")


def md5(b):
    return hashlib.md5(b).hexdigest()


@pytest.fixture
def text_file(tmp_path):
    """Real text (Python's own help topics) written to a file, as a user's --data text:PATH would be."""
    path = tmp_path / "corpus.txt"
    path.write_bytes(bytes(data.load_offline_text().splits["train"][:60_000].numpy()))
    return str(path)


# shared helpers: references and tiny models used by several sections

def write_wav(path, signal, rate, channels=1, width=2):
    pcm = (np.clip(signal, -1, 1) * (2 ** (8 * width - 1) - 1)).astype({2: np.int16, 4: np.int32}[width])
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(width)
        w.setframerate(rate)
        w.writeframes(np.repeat(pcm, channels).tobytes())


def folder(kind):
    def build(tmp_path):
        (tmp_path / "d").mkdir()
        return tmp_path / "d", lambda: data.load(f"{kind}:{tmp_path / 'd'}")
    return build


def read_png(path):
    """A minimal PNG reader: checks the signature and every chunk's CRC, returns (width, height, pixels)."""
    blob = open(path, "rb").read()
    assert blob[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, {}
    while pos < len(blob):
        (n,), kind = struct.unpack(">I", blob[pos:pos + 4]), blob[pos + 4:pos + 8]
        body, (crc,) = blob[pos + 8:pos + 8 + n], struct.unpack(">I", blob[pos + 8 + n:pos + 12 + n])
        assert zlib.crc32(kind + body) == crc, f"bad CRC in {kind}"
        chunks[kind] = chunks.get(kind, b"") + body
        pos += 12 + n
    w, h, depth, color = struct.unpack(">IIBB", chunks[b"IHDR"][:10])
    assert (depth, color) == (8, 2) and b"IEND" in chunks
    raw = np.frombuffer(zlib.decompress(chunks[b"IDAT"]), np.uint8).reshape(h, 1 + 3 * w)
    assert (raw[:, 0] == 0).all()  # filter type 0 on every row
    return w, h, raw[:, 1:].reshape(h, w, 3)


def reference(q, k, v, causal=True, layout=None, tile=16, window=None, scale=None):
    """Masked softmax attention in float64, the mask built element by element from its definition."""
    T, S, D = q.size(2), k.size(2), q.size(3)
    i = torch.arange(S - T, S)[:, None]  # absolute query positions
    j = torch.arange(S)[None, :]
    mask = torch.ones(1, T, S, dtype=torch.bool)
    if causal:
        mask = mask & (j <= i)
    if window is not None:
        mask = mask & (j > i - window)
    if layout is not None:
        mask = mask & layout[:, torch.arange(T) // tile][:, :, torch.arange(S) // tile]
    s = (q.double() @ k.double().transpose(-1, -2)) * (D ** -0.5 if scale is None else scale)
    s = s.masked_fill(~mask, float("-inf"))
    empty = ~mask.any(-1, keepdim=True)
    p = torch.softmax(s.masked_fill(empty, 0.0), -1) * ~empty  # rows with no visible key: zero
    return p @ v.double()


def random_inputs(B, H, T, S, D, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, n, D, generator=g).to(dtype).requires_grad_() for n in (T, S, S))
    return q, k, v, torch.randn(B, H, T, D, generator=g).to(dtype)


def outputs_and_grads(fn, q, k, v, dout):
    out = fn(q, k, v)
    return [out.detach(), *torch.autograd.grad(out, (q, k, v), dout)]


def assert_same_output_and_grads(got, want, inputs, tol, grad_tol=None):
    """got and want, both computed from inputs, agree within tol (a dict of assert_close's rtol and
    atol), and so do their gradients for one random output gradient, within grad_tol or tol."""
    torch.testing.assert_close(got, want, **tol)
    g = torch.randn_like(want)
    for a, b in zip(torch.autograd.grad(got, inputs, g), torch.autograd.grad(want, inputs, g)):
        torch.testing.assert_close(a, b, **(grad_tol or tol))


def training_step(model, idx, targets, seed):
    """[logits, loss, every parameter's gradient] of one forward and backward, dropout and hashes
    drawn from seed: what two ways of computing the same model must agree on."""
    model.zero_grad()
    torch.manual_seed(seed)
    logits, loss = model(idx, targets)
    loss.backward()  # a reversible backward too puts the parameters' gradients in .grad
    return [logits.detach(), loss.detach()] + [p.grad.clone() for p in model.parameters()]


# The one tiny-model factory. TINY_MODEL: the sizes every test across the models starts from (the
# README's CAUSAL_CASES line: 2 layers, width 32, 64 tokens); TINY_SECTION: the smaller ones a model
# file's own section starts from (section=True). A test names what it changes beyond them.
TINY_MODEL = dict(block_size=64, vocab_size=11, n_layer=2, n_head=2, n_embd=32)
TINY_SECTION = {
    "sparse_transformer": dict(n_head=4, n_embd=16, stride=8, summary=4, n_offsets=2, tile=4),
    "reformer": dict(block_size=32, n_embd=16, dropout=0.0, n_hashes=2, n_buckets=4, chunk=8),
    "aft": dict(block_size=12, n_embd=8, window=3),
    "perceiver_ar": dict(block_size=16, n_embd=16, n_latents=6, dropout=0.0),
}


def tiny_config(name, section=False, **overrides):
    """The Config of a tiny `name` of train.MODELS: TINY_MODEL (and with section=True the sizes of
    its file's section), the test's overrides, then the variant's own values (as build_model)."""
    module, _, variant = train.MODELS[name]
    sizes = {**TINY_MODEL, **(TINY_SECTION[module] if section else {})}
    return importlib.import_module(module).Config(**{**sizes, **overrides, **variant})


def tiny(name, section=False, **overrides):
    """A tiny model `name` of train.MODELS, its Config from tiny_config, built as train.py does."""
    module, cls, _ = train.MODELS[name]
    return getattr(importlib.import_module(module), cls)(tiny_config(name, section, **overrides))


def sparse_config(**overrides):
    """sparse_transformer.py's section: 4 heads of width 4, stride 8, tiles of 4, any pattern."""
    return tiny_config("transformer", section=True, **overrides)


def reformer_config(**overrides):
    """reformer.py's section: 32 tokens, width 16, 2 rounds of 4 buckets, chunks of 8."""
    return tiny_config("reformer", section=True, **overrides)


def qkv(B=2, T=9, C=4):
    torch.manual_seed(1)
    return [torch.randn(B, T, C, dtype=torch.float64, requires_grad=True) for _ in range(3)]


def token_embedding(model):
    """The model's token embedding: its first nn.Embedding of vocab_size rows (README, "Add a model")."""
    return next(m for m in model.modules()
                if isinstance(m, torch.nn.Embedding) and m.num_embeddings == model.config.vocab_size)


def output_layer(model):
    """The model's output layer: its last nn.Linear to vocab_size features (README, "Add a model")."""
    return [m for m in model.modules()
            if isinstance(m, torch.nn.Linear) and m.out_features == model.config.vocab_size][-1]


# A model written from the README's "Add a model" alone, as a student forking the repository would write it: names
# of its own, an untied output layer, one line in train.MODELS and one in CAUSAL_CASES. Every test that loops over
# the registered models (init rule, causality, training, generation, flags, pictures, bench) takes it too.

@dataclasses.dataclass
class ConvLMConfig:
    block_size: int = 256
    vocab_size: int = 256
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 256
    dropout: float = 0.0
    kernel_size: int = 4  # positions each layer's causal convolution reads: its own and the kernel_size - 1 before


class CausalConv(torch.nn.Module):
    """A convolution per feature over the last kernel_size positions: output t reads inputs t - kernel_size + 1..t."""

    def __init__(self, config):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.empty(config.n_embd, 1, config.kernel_size))

    def forward(self, x):  # (B, T, C)
        padded = F.pad(x.transpose(1, 2), (self.weight.size(-1) - 1, 0))  # (B, C, kernel_size - 1 + T)
        return F.conv1d(padded, self.weight, groups=x.size(-1)).transpose(1, 2)  # (B, T, C)


class ConvLayer(torch.nn.Module):
    def __init__(self, config):
        super().__init__()
        self.norm_1, self.norm_2 = torch.nn.LayerNorm(config.n_embd), torch.nn.LayerNorm(config.n_embd)
        self.conv_attn = CausalConv(config)  # the token mixer: its name ends in attn (README)
        self.expand = torch.nn.Linear(config.n_embd, 4 * config.n_embd)
        self.out_proj = torch.nn.Linear(4 * config.n_embd, config.n_embd)  # a residual branch's output projection
        self.drop = torch.nn.Dropout(config.dropout)

    def forward(self, x):
        x = x + self.drop(self.conv_attn(self.norm_1(x)))
        return x + self.drop(self.out_proj(F.gelu(self.expand(self.norm_2(x)))))


class ConvLM(torch.nn.Module):
    def __init__(self, config):
        super().__init__()
        if config.kernel_size < 1:
            raise ValueError(f"kernel_size {config.kernel_size} reads no position; use 1 or more")
        self.config = config
        self.embed = torch.nn.Embedding(config.vocab_size, config.n_embd)
        self.layers = torch.nn.ModuleList(ConvLayer(config) for _ in range(config.n_layer))
        self.norm = torch.nn.LayerNorm(config.n_embd)
        self.readout = torch.nn.Linear(config.n_embd, config.vocab_size, bias=False)  # untied
        st.init_weights(self, config.n_layer)

    def forward(self, idx, targets=None):
        if idx.size(1) > self.config.block_size:
            raise ValueError(f"sequence length {idx.size(1)} exceeds block_size {self.config.block_size}")
        x = self.embed(idx)  # (B, T, C)
        for layer in self.layers:
            x = layer(x)
        logits = self.readout(self.norm(x))  # (B, T, V)
        loss = None if targets is None else F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        return logits, loss

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, generator=None, use_cache=True):
        for _ in range(max_new_tokens):  # no cache: every token recomputes its window
            logits = self(idx[:, -self.config.block_size:])[0][:, -1]  # (B, V)
            idx = torch.cat([idx, st.sample_next(logits, temperature, top_k, generator)], dim=1)
        return idx


conv_lm = types.ModuleType("conv_lm")  # the file the student would write, as a module of its own
conv_lm.__file__, conv_lm.Config, conv_lm.ConvLM = __file__, ConvLMConfig, ConvLM
sys.modules["conv_lm"] = conv_lm
train.MODELS["conv_lm"] = ("conv_lm", "ConvLM", {})  # the line in train.py's MODELS


# ----------------------------------------------------------------------------------------------------------
# data: download, verify, cache, split, order

def test_enwik8_download_verify_keep_and_split(tmp_path):
    """A download of the wrong size or md5 is refused and not kept. A good one is kept as the zip alone (no .part
    left, nothing unpacked) and split; the next load reads the kept zip, whose member is md5-checked again."""
    payload = np.random.default_rng(0).integers(0, 256, 20_000, dtype=np.uint8).tobytes()
    zpath, root = tmp_path / "served.zip", tmp_path / "cache"
    with zipfile.ZipFile(zpath, "w") as z:  # stored: a zip of other bytes of the same length has the same size
        z.writestr("enwik8", payload)
    size = zpath.stat().st_size
    download = functools.partial(data.load_enwik8, url=zpath.as_uri(), root=str(root))
    with pytest.raises(ValueError, match="expected"):
        download(zip_size=size + 1, md5="0" * 32)
    assert not any(root.iterdir())  # no half-written or unverified file left behind
    with pytest.raises(ValueError, match="md5"):
        download(zip_size=size, md5="0" * 32)
    load = functools.partial(download, zip_size=size, md5=md5(payload))
    d = load()
    assert [len(d.splits[s]) for s in ("train", "val", "test")] == [18_000, 1_000, 1_000]
    assert bytes(torch.cat([d.splits[s] for s in ("train", "val", "test")]).numpy()) == payload
    assert sorted(p.name for p in root.iterdir()) == ["enwik8.zip"]
    zpath.unlink()  # the second load must come from the kept zip, not the network
    assert torch.equal(load().splits["val"], d.splits["val"])
    with zipfile.ZipFile(root / "enwik8.zip", "w") as z:  # passes the size check, not the md5
        z.writestr("enwik8", payload[::-1])
    with pytest.raises(ValueError, match=r"enwik8 in .*enwik8\.zip fails its md5 check.*delete"):
        load()


def make_cifar_archive(path, n_per_batch=4, seed=0):
    """A tar.gz in the real CIFAR-10 python format: pickled dicts with b'data' uint8 [n, 3072] (planar)."""
    rng = np.random.default_rng(seed)
    batches = {}
    with tarfile.open(path, "w:gz") as tar:
        for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
            batches[name] = rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8)
            blob = pickle.dumps({b"data": batches[name], b"labels": list(range(n_per_batch))})
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return batches


def assert_raster_order(planar, raster):
    """Token t is channel t % 3 of pixel (row t // 96, column (t // 3) % 32) (SPEC, pixel order)."""
    t = np.arange(3072)
    expected = planar.reshape(-1, 3, 32, 32)[:, t % 3, t // 96, (t // 3) % 32]
    np.testing.assert_array_equal(raster, expected)


def test_cifar10_download_verify_and_decode_in_raster_order_at_every_load(tmp_path):
    """A wrong md5, downloaded, of an archive put there by hand, or of the kept one damaged later, is refused
    before unpickling."""
    archive = tmp_path / "cifar.tar.gz"
    batches = make_cifar_archive(archive)
    download = functools.partial(data.load_cifar10, url=archive.as_uri(), root=str(tmp_path / "c"))
    with pytest.raises(ValueError, match="md5"):
        download(md5="0" * 32)
    (tmp_path / "c").mkdir(exist_ok=True)
    placed = tmp_path / "c" / "cifar-10-python.tar.gz"
    placed.write_bytes(archive.read_bytes()[:-10])
    load = functools.partial(download, md5=md5(archive.read_bytes()))
    with pytest.raises(ValueError, match="md5"):
        load()
    placed.unlink()
    d = load()
    assert d.splits["train"].shape == (20, 3072) and d.splits["test"].shape == (4, 3072)
    planar_train = np.concatenate([batches[f"data_batch_{i}"] for i in range(1, 6)])
    assert_raster_order(planar_train, d.splits["train"].numpy())
    assert_raster_order(batches["test_batch"], d.splits["test"].numpy())
    placed.write_bytes(flip_middle_byte(placed.read_bytes()))  # damaged after the download, same size
    with pytest.raises(ValueError, match=r"cifar-10-python\.tar\.gz .*fails its md5 check.*delete it"):
        load()


def test_wav_folder_is_mixed_resampled_mu_law_encoded_and_cut(tmp_path):
    rate, seconds = 22_050, 3.0
    t = np.arange(int(rate * seconds)) / rate
    write_wav(tmp_path / "a.wav", 0.5 * np.sin(2 * np.pi * 440 * t), rate, channels=2)
    write_wav(tmp_path / "b.wav", 0.3 * np.sin(2 * np.pi * 220 * t), rate, width=4)
    d = data.load_wav_dir(str(tmp_path), rate=8000, seq_len=1000)
    # each file 3 s at 8 kHz = 24,000 samples = 24 rows of 1000; of the 48 rows the last 5% + 5% are held out
    assert [tuple(d.splits[s].shape) for s in ("train", "val", "test")] == [(44, 1000), (2, 1000), (2, 1000)]
    decoded = data.mu_law_decode(d.splits["train"][0].numpy())
    t8 = np.arange(1000) / 8000
    assert np.abs(decoded - 0.5 * np.sin(2 * np.pi * 440 * t8)).max() < 0.02  # resampled, not just truncated


def test_mu_law_is_the_continuous_companding_formula():
    x = np.random.default_rng(1).uniform(-1, 1, 1000)
    y = np.sign(x) * np.log(1 + 255 * np.abs(x)) / np.log(256)
    np.testing.assert_array_equal(data.mu_law_encode(x), np.round((y + 1) * 127.5).astype(np.uint8))
    err = np.abs(data.mu_law_decode(data.mu_law_encode(x)) - x)
    assert (err <= 0.03 * np.abs(x) + 1e-3).all()  # relative error of 8-bit mu-law


def test_sampler_windows_are_shifted_by_one_and_rows_start_with_bos():
    rows = torch.randint(0, 256, (5, 40), dtype=torch.uint8)
    d = data.Data("rows", "image", {"train": rows, "val": rows[:0]}, vocab_size=257, bos=256)
    x, y = data.BatchSampler(d, "train", 40, 8, seed=0).next_batch()
    assert x.shape == y.shape == (8, 40) and (x[:, 0] == 256).all() and torch.equal(x[:, 1:], y[:, :-1])
    assert all(any(torch.equal(r.long(), yy) for r in rows) for yy in y)  # whole rows, first token predicted
    with pytest.raises(ValueError, match="val split of rows is empty"):
        data.BatchSampler(d, "val", 40, 8, seed=0)


def test_sampler_resumes_exactly_from_its_state():
    d = data.load_offline_text()
    a = data.BatchSampler(d, "train", 64, 4, seed=3)
    a.next_batch()
    b = data.BatchSampler(d, "train", 64, 4, seed=99)
    b.load_state_dict(a.state_dict())
    (xa, ya), (xb, yb) = a.next_batch(), b.next_batch()
    assert xa.shape == (4, 64) and torch.equal(xa, xb) and torch.equal(ya, yb)


def test_copy_task_rows_repeat_their_first_half():
    x, y = data.BatchSampler(data.load("copy"), "train", 64, 3, seed=0).next_batch()
    assert torch.equal(y[:, 32:], y[:, :32]) and (x[:, 0] == 256).all()


def py2_cifar_batch(planar):
    """A CIFAR-10 batch as the official archive stores it: Python 2's cPickle, protocol 2, numpy.core globals,
    str (not bytes) data; Python 3 cannot write this, so it is assembled opcode by opcode."""
    def s(b):
        return b"U" + bytes([len(b)]) + b  # SHORT_BINSTRING: a Python 2 str
    def i(n):
        return b"J" + struct.pack("<i", n)  # BININT
    dtype = (b"cnumpy\ndtype\n" + s(b"u1") + i(0) + i(1) + b"\x87R("  # dtype('u1', 0, 1), then its state
             + i(3) + s(b"|") + b"NNN" + i(-1) + i(-1) + i(0) + b"tb")
    raw = planar.tobytes()
    array = (b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n" + i(0) + b"\x85" + s(b"b") + b"\x87R("
             + i(1) + i(len(planar)) + i(3072) + b"\x86" + dtype + b"\x89T" + struct.pack("<I", len(raw)) + raw
             + b"tb")  # _reconstruct(ndarray, (0,), 'b'), then state (1, shape, dtype, False, raw bytes)
    return b"\x80\x02}(" + s(b"data") + array + s(b"labels") + b"](" + i(3) + b"eu."


@pytest.mark.parametrize("layout", ["npy", "npz", "python3 batch", "python2 batch"])
def test_images_take_the_official_cifar10_layouts(tmp_path, layout):
    planar = np.random.default_rng(0).integers(0, 256, (20, 3072), dtype=np.uint8)
    path = tmp_path / {"npy": "images.npy", "npz": "images.npz"}.get(layout, "data_batch_1")
    if layout == "npy":
        np.save(path, planar.reshape(20, 3, 32, 32).transpose(0, 2, 3, 1))  # [N, 32, 32, 3]
    elif layout == "npz":
        np.savez(path, data=planar, labels=np.arange(20, dtype=np.uint8))
    elif layout == "python3 batch":
        path.write_bytes(pickle.dumps({b"data": planar, b"labels": list(range(20)), b"batch_label": b"test"}))
    else:
        path.write_bytes(py2_cifar_batch(planar))
    d = data.load(f"images:{path}")
    assert [len(d.splits[s]) for s in ("train", "val", "test")] == [18, 1, 1]
    assert_raster_order(planar, torch.cat([d.splits[s] for s in ("train", "val", "test")]).numpy())


def test_images_refuse_a_pickle_that_would_run_code(tmp_path):
    class Payload:
        def __reduce__(self):
            return (open, (str(tmp_path / "ran"), "w"))
    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps({b"data": Payload()}))
    with pytest.raises(ValueError, match=r"\.open, which a CIFAR-10 batch never does"):
        data.load(f"images:{path}")
    assert not (tmp_path / "ran").exists()


@pytest.mark.skipif(not os.path.exists(os.path.join(SHARED_DATA, "cifar10_test_0_19.npz")),
                    reason="the real CIFAR-10 sample lives in ../shared/data, absent from this checkout")
def test_real_cifar10_sample_decodes_in_raster_order_and_trains_through_images():
    path = os.path.join(SHARED_DATA, "cifar10_test_0_19.npz")
    planar = np.load(path)["data"]
    assert_raster_order(planar, data.cifar_rows(planar, path))
    d = data.load(f"images:{path}")
    assert [len(d.splits[s]) for s in ("train", "val", "test")] == [18, 1, 1]
    x, y = data.BatchSampler(d, "train", 3072, 2, seed=0).next_batch()
    assert x.shape == (2, 3072) and (x[:, 0] == 256).all()


REAL_RECORDING = os.path.join(SHARED_DATA, "brahms_hungarian_dance_5.wav")  # 45.8 s, 16-bit mono, 22,050 Hz


@pytest.mark.parametrize("source", ["generated", "real"])
def test_one_recording_holds_out_its_last_rows_at_the_default_audio_length(tmp_path, source):
    """What a user with one file has: the real recording when ../shared/data is here, and always a generated one
    of the same length and format."""
    if source == "real" and not os.path.exists(REAL_RECORDING):
        pytest.skip("the real recording lives in ../shared/data, absent from this checkout")
    path = REAL_RECORDING if source == "real" else str(tmp_path / "one.wav")
    if source == "generated":
        t = np.arange(int(22_050 * 45.8)) / 22_050
        write_wav(path, 0.4 * np.sin(2 * np.pi * 440 * t) * np.sin(2 * np.pi * 0.5 * t), 22_050)
    d = data.load(f"wav:{path}")  # the default --audio_seq_len 65536
    # 45.8 s at 12 kHz = 549,600 samples = 8 rows: 6 train, then one row each of validation and test at the end
    assert [tuple(d.splits[s].shape) for s in ("train", "val", "test")] == [(6, 65536), (1, 65536), (1, 65536)]
    whole = data.to_rows(data.read_wav(path), 65536)
    assert torch.equal(torch.cat([d.splits[s] for s in ("train", "val", "test")]), whole)


def test_too_little_audio_names_an_audio_seq_len_that_works(tmp_path):
    write_wav(tmp_path / "short.wav", np.sin(np.arange(24_000) / 5), 12_000)  # 2 s
    with pytest.raises(ValueError, match=r"2\.0 s of audio.*--audio_seq_len 4096 or less"):
        data.load(f"wav:{tmp_path}")
    assert data.load(f"wav:{tmp_path}", audio_seq_len=4096).splits["test"].shape == (1, 4096)


def test_truncated_wav_keeps_its_whole_frames(tmp_path):
    write_wav(tmp_path / "a.wav", np.sin(np.arange(1000) / 7), 12_000, channels=2)
    full = data.read_wav(str(tmp_path / "a.wav"))
    (tmp_path / "a.wav").write_bytes((tmp_path / "a.wav").read_bytes()[:-3])  # a frame is 4 bytes
    np.testing.assert_array_equal(data.read_wav(str(tmp_path / "a.wav")), full[:999])


def wav_header(fmt=1, channels=1, rate=12_000, width=2, n_bytes=0):
    """The 44-byte header of a WAV file whose data chunk holds n_bytes (format 1: PCM, 3: IEEE float)."""
    return (b"RIFF" + struct.pack("<I", 36 + n_bytes) + b"WAVEfmt " + struct.pack(
        "<IHHIIHH", 16, fmt, channels, rate, rate * channels * width, channels * width, 8 * width)
        + b"data" + struct.pack("<I", n_bytes))


def bad_file(tmp_path, name, content):
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


TEXT = b"Real text for a damaged-file test, long enough to be a data set. " * 100


def enwik8_with_zip(tmp_path, zip_bytes):
    """A hand-placed enwik8.zip; the expected size is its own, so the check reaches the zip's contents."""
    path = bad_file(tmp_path, "c/enwik8.zip", zip_bytes)
    return path, lambda: data.load_enwik8(url="file:///absent", zip_size=len(zip_bytes), md5="0" * 32,
                                              root=str(tmp_path / "c"))


def zipped(name, payload, damage=lambda b: b):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr(name, payload)
    return damage(buf.getvalue())


def flip_middle_byte(b):
    return b[:len(b) // 2] + bytes([b[len(b) // 2] ^ 0xFF]) + b[len(b) // 2 + 1:]


def truncated_cifar_archive(tmp_path):
    make_cifar_archive(tmp_path / "a.tar.gz")
    good = (tmp_path / "a.tar.gz").read_bytes()
    path = bad_file(tmp_path, "c/cifar-10-python.tar.gz", good[:len(good) // 2])
    return path, lambda: data.load_cifar10(url="file:///absent", md5=md5(good), root=str(tmp_path / "c"))


def wav_folder_with_one_damaged_file(tmp_path):
    (tmp_path / "w").mkdir()
    write_wav(tmp_path / "w" / "a_good.wav", np.zeros(100), 12_000)
    path = bad_file(tmp_path, "w/b_bad.wav", wav_header(n_bytes=200)[:30])
    return path, lambda: data.load(f"wav:{tmp_path / 'w'}")


def loaded_as(spec_kind, name, content):
    def build(tmp_path):
        path = bad_file(tmp_path, name, content)
        return path, lambda: data.load(f"{spec_kind}:{path}")
    return build


def npy_bytes(array, cut=0):
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()[:len(buf.getvalue()) - cut]


def npz_bytes(**arrays):
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


# Damaged, wrong or missing files, and an unknown name: name -> (build(tmp_path) -> (path or name
# the message must name, load), exception, what the message tells the user)
DAMAGED_FILES = {
    "truncated .bz2": (loaded_as("text", "t.bz2", bz2.compress(TEXT)[:-40]), ValueError, "download it again"),
    "garbage .bz2": (loaded_as("text", "t.bz2", TEXT), ValueError, "decompress it and pass"),
    "non-gzip .gz": (loaded_as("text", "t.gz", TEXT), ValueError, "download it again"),
    "truncated .gz": (loaded_as("text", "t.gz", gzip.compress(TEXT)[:40]), ValueError, "download it again"),
    "corrupt .gz": (loaded_as("text", "t.gz", flip_middle_byte(gzip.compress(bytes(range(256)) * 50))),
                    ValueError, "download it again"),
    "empty text": (loaded_as("text", "t.txt", b""), ValueError, "give a larger file"),
    "text: a folder": (folder("text"), ValueError, "takes one file"),
    "garbage enwik8.zip": (lambda p: enwik8_with_zip(p, TEXT), ValueError, "delete it and retry"),
    "member-less enwik8.zip": (lambda p: enwik8_with_zip(p, zipped("enwik9", TEXT)), ValueError, "delete it"),
    "enwik8.zip, damaged member": (lambda p: enwik8_with_zip(p, zipped("enwik8", bytes(range(256)) * 50,
                                                                       flip_middle_byte)), ValueError, "delete it"),
    "truncated enwik8.zip": (lambda p: (bad_file(p, "c/enwik8.zip", TEXT), lambda: data.load_enwik8(
        url="file:///absent", zip_size=len(TEXT) + 1, root=str(p / "c"))), ValueError, "delete it and retry"),
    "non-WAV .wav": (loaded_as("wav", "a.wav", TEXT), ValueError, "convert it to 16-bit PCM"),
    "empty .wav": (loaded_as("wav", "a.wav", b""), ValueError, "convert it to 16-bit PCM"),
    "float .wav": (loaded_as("wav", "a.wav", wav_header(fmt=3, width=4, n_bytes=400) + bytes(400)), ValueError,
                   "convert it to 16-bit PCM"),
    "64-bit .wav": (loaded_as("wav", "a.wav", wav_header(width=8, n_bytes=800) + bytes(800)), ValueError,
                    "convert it to 16-bit PCM"),
    "header-only .wav": (loaded_as("wav", "a.wav", wav_header()), ValueError, "remove it"),
    "one damaged .wav in a folder": (wav_folder_with_one_damaged_file, ValueError, "move it out of the folder"),
    "npz without data": (loaded_as("images", "i.npz", npz_bytes(x=np.zeros((4, 3072), np.uint8))), ValueError,
                         "images:PATH takes a .npy"),
    "npz of planes": (loaded_as("images", "i.npz", npz_bytes(data=np.zeros((4, 3, 1024), np.uint8))),
                      ValueError, "expected uint8 [N >= 1, 3072]"),
    "float .npy": (loaded_as("images", "i.npy", npy_bytes(np.zeros((4, 32, 32, 3), np.float32))), ValueError,
                   "values 0..255"),
    "truncated .npy": (loaded_as("images", "i.npy", npy_bytes(np.zeros((4, 32, 32, 3), np.uint8), cut=100)),
                       ValueError, "images:PATH takes"),
    "object .npy": (loaded_as("images", "i.npy", npy_bytes(np.array([{}, 1], dtype=object))), ValueError,
                    "images:PATH takes"),
    "garbage image file": (loaded_as("images", "i.png", TEXT), ValueError, "images:PATH takes"),
    "two images": (loaded_as("images", "i.npz", npz_bytes(data=np.zeros((2, 3072), np.uint8))), ValueError,
                   "need at least one each"),
    "images: a folder": (folder("images"), ValueError, "takes one file"),
    "truncated hand-placed CIFAR-10 archive": (truncated_cifar_archive, ValueError, "delete it and retry"),
    "images of 28x28": (loaded_as("images", "i.npy", npy_bytes(np.zeros((4, 28, 28), np.uint8))),
                        ValueError, "expected uint8 [N >= 3, 32, 32, 3]"),
    "missing text file": (lambda p: (p / "no.txt", lambda: data.load(f"text:{p / 'no.txt'}")),
                          FileNotFoundError, "does not exist"),
    "wav: a folder without .wav files": (folder("wav"), FileNotFoundError, "no .wav files"),
    # offline (one code path, data.fetch): the URL that failed, and where to put the file by hand
    "offline enwik8": (lambda p: ((p / "a.zip").as_uri(), lambda: data.load_enwik8(
        url=(p / "a.zip").as_uri(), root=str(p / "c"))), FileNotFoundError, "Download it by hand"),
    "offline CIFAR-10": (lambda p: (p / "c" / "cifar-10-python.tar.gz", lambda: data.load_cifar10(
        url=(p / "a.tgz").as_uri(), root=str(p / "c"))), FileNotFoundError, "--data images:PATH"),
    "unknown --data": (lambda p: ("imagenet", lambda: data.load("imagenet")), ValueError,
                       "unknown --data"),
}


@pytest.mark.parametrize("case", DAMAGED_FILES)
def test_damaged_or_wrong_files_get_one_sentence_naming_the_file_and_the_fix(tmp_path, case):
    build, exception, fix = DAMAGED_FILES[case]
    path, load = build(tmp_path)
    with pytest.raises(Exception) as e:
        load()
    message = str(e.value)
    assert type(e.value) is exception, f"{type(e.value).__name__} leaked: {message}"  # not zlib.error, EOFError...
    assert str(path) in message and fix in message and "\n" not in message, message


# ----------------------------------------------------------------------------------------------------------
# the dense baseline and the training loop

def test_loss_falls_within_a_few_dozen_steps(text_file, tmp_path):
    hist = train.main(["--data", f"text:{text_file}", "--max_iters", "40", "--eval_interval", "40",
                       "--out_dir", str(tmp_path), "--lr", "3e-3"] + TINY)
    losses = [h["loss"] for h in hist if "loss" in h]
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 1.0  # nats: from ~5.5 (uniform) well down
    assert hist[-1]["val_loss"] < math.log(256) - 1.0


@pytest.mark.parametrize("name", list(train.MODELS))
def test_every_model_starts_its_output_layer_by_the_one_init_rule(name):
    """sparse_transformer.init_weights: the output layer starts N(0, 0.02) in every model, so a fresh model
    predicts almost uniformly; nothing starts at zero. Ours tie it to the token embedding except the Reformer and
    Perceiver AR (measured reasons in docs/design.md); a model added by the README may do either."""
    torch.manual_seed(0)
    model = tiny(name, vocab_size=256, n_embd=64)
    head = output_layer(model)
    if train.MODELS[name][0] in ("sparse_transformer", "reformer", "aft", "perceiver_ar"):
        assert (head.weight.data_ptr() == token_embedding(model).weight.data_ptr()) == (
            name not in ("reformer", "perceiver_ar"))
    assert 0.018 < head.weight.std().item() < 0.022
    x, y = torch.randint(0, 256, (2, 4, 64))
    assert abs(model(x, y)[1].item() - math.log(256)) < 0.05


@slow
def test_learning_speed_does_not_regress(text_file, tmp_path):
    """A tiny model on real text for 200 steps, validation bits averaged over three seeds. Measured on 2 cores,
    identical with 1 and 2 threads: seeds 1-5 give 3.53, 3.43, 3.46, 3.74, 3.40; with the output layer started
    at zero (the regression this guards against) 4.27, 4.18, 4.39, 4.44, 4.36. The threshold sits between,
    0.4 bits from the mean of either."""
    def bits(seed, zero_head=False):
        build = train.build_model

        def built(name, config):
            model = build(name, config)
            if zero_head:
                model.lm_head.weight = torch.nn.Parameter(torch.zeros_like(model.lm_head.weight))
            return model
        train.build_model = built
        try:
            history = train.main(["--data", f"text:{text_path}", "--n_layer", "2", "--n_head", "2", "--n_embd", "64",
                                  "--block_size", "64", "--batch_size", "8", "--max_iters", "200", "--eval_interval",
                                  "200", "--eval_iters", "10", "--warmup", "20", "--lr", "3e-3", "--seed", str(seed),
                                  "--device", "cpu", "--out_dir", str(tmp_path / f"{seed}{zero_head}")])
        finally:
            train.build_model = build
        return history[-1]["val_loss"] / math.log(2)

    text_path = tmp_path / "pydoc.txt"  # Python's own help text: on every machine
    text_path.write_bytes(bytes(data.load_offline_text().splits["train"].numpy()))
    assert np.mean([bits(seed) for seed in (1, 2, 3)]) < 3.9
    assert bits(1, zero_head=True) > 3.9  # the test bites


def test_every_run_keeps_its_evaluations_in_a_metrics_file_across_resume(text_file, tmp_path):
    base = ["--data", f"text:{text_file}", "--eval_interval", "2", "--out_dir", str(tmp_path)] + TINY
    train.main(base + ["--max_iters", "4"])
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    ckpt = tmp_path / "ckpt.pt"
    shutil.copy(ckpt, tmp_path / "at4.pt")
    train.main(base + ["--max_iters", "6", "--resume"])
    shutil.copy(tmp_path / "at4.pt", ckpt)  # as if killed after step 6 was logged but before it was saved
    train.main(base + ["--max_iters", "8", "--resume"])
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4, 6, 8] and (tmp_path / "metrics.jsonl").read_text().startswith(
        "\n".join(lines))
    assert all(set(r) == {"step", "tokens", "train_bits", "val_bits", "lr", "tokens_per_s", "time"} for r in records)
    assert records[-1]["tokens"] == 8 * 4 * 32 and all(r["tokens_per_s"] > 0 for r in records)
    train.main(base + ["--max_iters", "2"])  # a fresh run into the same folder starts the file anew
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 1


# A checkpoint is data, never code; --resume continues the run it names, on the data it was trained on

class RunsCode:
    """What a hostile checkpoint carries: an object whose unpickling runs a shell command."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_a_checkpoint_that_carries_code_is_refused_by_every_command_and_nothing_runs(text_file, tmp_path):
    out, marker = tmp_path / "run", tmp_path / "the_command_ran"
    train.main(["--data", f"text:{text_file}", "--max_iters", "1", "--eval_interval", "1", "--out_dir", str(out)]
               + TINY)
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)  # what train.py writes is tensors and plain values
    torch.save({**ckpt, "model": RunsCode(f"touch {marker}")}, out / "ckpt.pt")
    for command in (lambda: train.main(["--resume", "--max_iters", "2", "--out_dir", str(out)]),
                    lambda: sample.main(["--out_dir", str(out), "--device", "cpu"]),
                    lambda: sample.main(["--evaluate", "val", "--out_dir", str(out)])):
        with pytest.raises(ValueError, match="was refused: it holds a .*system object") as e:
            command()
        assert str(out / "ckpt.pt") in str(e.value) and "\n" not in str(e.value)
    assert not marker.exists()


def test_a_checkpoint_that_calls_the_tile_attn_block_loads_it_as_tile(tmp_path):
    """The Sparse Transformer's tile was its attn_block before 2026-12-04: such a checkpoint still loads."""
    path = str(tmp_path / "ckpt.pt")
    torch.save({**{k: {} for k in ("model", "optimizer", "step", "args", "rng", "samplers")},
                "model_config": {"pattern": "fixed", "attn_block": 8}}, path)
    assert train.load_checkpoint(path)["model_config"] == {"pattern": "fixed", "tile": 8}


def interrupt_at(monkeypatch, steps):
    """Ctrl-C, as train.main would see it, once `steps` optimizer steps are done."""
    step = train.train_step

    def interrupted(*args):
        if args[-1] == steps:  # the index of the step about to run
            raise KeyboardInterrupt
        return step(*args)
    monkeypatch.setattr(train, "train_step", interrupted)


def test_resume_alone_continues_the_run_with_every_setting_it_was_trained_with(text_file, tmp_path, monkeypatch,
                                                                              capsys):
    """Non-default training settings, Ctrl-C after step 10 (the checkpoint is at step 8), then --resume and
    --out_dir alone: the losses equal the uninterrupted run's, and the flags line shows the run's own settings."""
    settings = dict(max_iters=16, eval_interval=8, eval_iters=3, batch_size=3, grad_accum=2, lr=0.003, min_lr=0.0001,
                    warmup=4, lr_decay_iters=14, weight_decay=0.05, grad_clip=0.5, dropout=0.1, seed=7)
    run = ["--data", f"text:{text_file}", "--n_layer", "2", "--n_head", "2", "--n_embd", "32", "--block_size", "32",
           "--device", "cpu"] + [arg for k, v in settings.items() for arg in (f"--{k}", str(v))]
    whole = train.main(run + ["--out_dir", str(tmp_path / "a")])
    interrupt_at(monkeypatch, 10)
    with pytest.raises(KeyboardInterrupt, match=r"after step 10 of 16; the last checkpoint, .*, is at step 8 "):
        train.main(run + ["--out_dir", str(tmp_path / "b")])
    monkeypatch.undo()
    capsys.readouterr()
    rest = train.main(["--resume", "--out_dir", str(tmp_path / "b")])
    assert [h for h in whole if h["step"] >= 8] == rest  # bit-exact on CPU, evaluations included
    flags = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("flags: "))
    assert all(f" {k}={v} " in flags for k, v in settings.items()), flags


def test_an_extended_run_keeps_its_schedule_so_the_rate_never_rises(text_file, tmp_path, capsys):
    """--resume with a larger --max_iters continues the same run: the cosine keeps the horizon it
    was trained with and the steps past it run at min_lr (as in nanoGPT), which the output says, and
    the losses are those of one run on that schedule (dropout's too). A training flag typed when
    resuming overrides the checkpoint's, a typed --lr_decay_iters moves the horizon: the line of
    overrides and the flags line say so."""
    run = ["--data", f"text:{text_file}", "--eval_interval", "1", "--dropout", "0.1"] + TINY
    run += ["--warmup", "0"]
    whole = train.main(run + ["--max_iters", "9", "--lr_decay_iters", "6", "--out_dir",
                              str(tmp_path / "a")])
    train.main(run + ["--max_iters", "6", "--out_dir", str(tmp_path)])
    capsys.readouterr()
    resume = ["--resume", "--out_dir", str(tmp_path)]
    rest = train.main(resume + ["--max_iters", "9"])
    assert [h for h in whole if h["step"] >= 6] == rest  # bit-exact on CPU
    assert "the cosine ends at step 6 and the steps after it run at min_lr" in capsys.readouterr().out
    metrics = (tmp_path / "metrics.jsonl").read_text().splitlines()
    rates = [json.loads(line)["lr"] for line in metrics]  # the rate of each step, 0 to 8
    assert len(rates) == 9 and all(later <= earlier for earlier, later in zip(rates, rates[1:]))
    assert rates[6:] == [1e-4] * 3  # steps 6, 7, 8: min_lr, lr / 10
    args = train.parse_args(["--max_iters", "9", "--lr_decay_iters", "6", "--warmup", "0"])
    assert [train.lr_at(step, args) for step in range(9)] == rates
    history = train.main(resume + ["--max_iters", "12", "--lr_decay_iters", "12",
                                   "--eval_iters", "1"])
    printed = capsys.readouterr().out
    assert ("from the command line, overriding the checkpoint: max_iters=12 (checkpoint: 9), "
            "lr_decay_iters=12 (checkpoint: 6), eval_iters=1 (checkpoint: 2)\n") in printed
    assert all(f" {flag} " in printed for flag in ("max_iters=12", "eval_iters=1", "batch_size=4"))
    assert [h["step"] for h in history if "loss" in h] == [9, 10, 11]


def offline_enwik8():
    raise FileNotFoundError("could not download enwik8 (offline, in this test)")


def downloaded_enwik8():
    tokens = torch.from_numpy(np.random.default_rng(0).integers(0, 256, 20_000, dtype=np.uint8))
    return data.Data("enwik8", "text", data.split_stream(tokens), note="a stand-in, in this test")


def test_a_run_on_the_offline_fallback_stays_on_it_once_enwik8_can_be_had(tmp_path, monkeypatch, capsys):
    """Offline, --data enwik8 trains on pydoc_data, which the printed flags say, and the checkpoint
    records: once enwik8 is there, --resume continues on pydoc_data (the uninterrupted offline run's
    losses) and sample.py --evaluate scores pydoc_data (the same bits)."""
    monkeypatch.setattr(data, "load_enwik8", offline_enwik8)
    run = ["--data", "enwik8", "--lr_decay_iters", "4", "--eval_interval", "2"] + TINY
    whole = train.main(run + ["--max_iters", "4", "--out_dir", str(tmp_path / "a")])
    flags = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("flags: "))
    assert " data=pydoc_data (for --data enwik8) " in flags and "data=enwik8" not in flags
    train.main(run + ["--max_iters", "2", "--out_dir", str(tmp_path / "b")])
    offline_bits = sample.main(["--evaluate", "val", "--out_dir", str(tmp_path / "a")])
    monkeypatch.setattr(data, "load_enwik8", downloaded_enwik8)
    capsys.readouterr()
    rest = train.main(["--resume", "--max_iters", "4", "--out_dir", str(tmp_path / "b")])
    assert [h for h in whole if h["step"] >= 2] == rest and "data: pydoc_data" in capsys.readouterr().out
    assert sample.main(["--evaluate", "val", "--out_dir", str(tmp_path / "a")]) == offline_bits
    assert "on pydoc_data val" in capsys.readouterr().out


def test_a_run_on_enwik8_is_not_resumed_sampled_or_scored_on_the_offline_fallback(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(data, "load_enwik8", downloaded_enwik8)
    out = str(tmp_path)
    train.main(["--data", "enwik8", "--max_iters", "2", "--eval_interval", "2", "--out_dir", out] + TINY)
    monkeypatch.setattr(data, "load_enwik8", offline_enwik8)
    for command, use in ((lambda: train.main(["--resume", "--max_iters", "4", "--out_dir", out]), "resuming"),
                         (lambda: sample.main(["--out_dir", out, "--device", "cpu"]), "sampling from it"),
                         (lambda: sample.main(["--evaluate", "val", "--out_dir", out]), "scoring it")):
        with pytest.raises(ValueError, match=f"was trained on enwik8, but --data enwik8 now loads pydoc_data; "
                                             f"{use} on other data is refused") as e:
            command()
        assert out in str(e.value) and "\n" not in str(e.value)


def test_a_run_on_synthetic_audio_stays_on_it_once_wav_files_appear(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(data, "DATA_DIR", str(tmp_path / "data"))
    out = str(tmp_path / "run")
    train.main(["--data", "audio", "--audio_rate", "1000", "--audio_seq_len", "64", "--max_iters", "2",
                "--eval_interval", "2", "--out_dir", out] + TINY)
    synthetic_bits = sample.main(["--evaluate", "val", "--out_dir", out])
    (tmp_path / "data" / "audio").mkdir(parents=True)
    write_wav(tmp_path / "data" / "audio" / "clip.wav", 0.4 * np.sin(np.arange(32_000) / 3), 8000)
    capsys.readouterr()
    assert sample.main(["--evaluate", "val", "--out_dir", out]) == synthetic_bits
    assert "on audio (synthetic) val" in capsys.readouterr().out
    train.main(["--resume", "--max_iters", "3", "--out_dir", out])
    assert "data: audio (synthetic)" in capsys.readouterr().out


def test_changed_data_is_refused_and_a_checkpoint_from_before_data_records_gets_a_note(text_file, tmp_path,
                                                                                       capsys):
    out = str(tmp_path / "run")
    train.main(["--data", f"text:{text_file}", "--max_iters", "2", "--eval_interval", "2", "--out_dir", out] + TINY)
    ckpt = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    assert ckpt["data"] == data.load(f"text:{text_file}").record  # its name and the md5 of its splits
    original = open(text_file, "rb").read()
    with open(text_file, "wb") as f:
        f.write(original.replace(b"e", b"E"))
    with pytest.raises(ValueError, match=r"with other contents \(md5 \w+, recorded \w+\); resuming on other data is "
                                         r"refused: restore the data it was trained on"):
        train.main(["--resume", "--max_iters", "4", "--out_dir", out])
    with open(text_file, "wb") as f:
        f.write(original)
    del ckpt["data"]  # as train.py wrote checkpoints before they recorded their data
    torch.save(ckpt, os.path.join(out, "ckpt.pt"))
    capsys.readouterr()
    train.main(["--resume", "--max_iters", "4", "--out_dir", out])
    assert "predates data records, so its data cannot be checked" in capsys.readouterr().out
    assert torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["data"] == data.load(
        f"text:{text_file}").record  # recorded from then on


@dataclasses.dataclass
class GRUConfig:
    vocab_size: int = 256
    n_embd: int = 32


class CausalGRU(torch.nn.Module):
    """A causal GRU language model, as README's "Add a model" builds one, whose logits also move by 1e-7 per row of
    the batch: a kernel chosen by the batch's shape can do that (nn.GRU on our CPU: 9e-8 between 1 and 64 rows)."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.wte = torch.nn.Embedding(config.vocab_size, config.n_embd)
        self.rnn = torch.nn.GRU(config.n_embd, config.n_embd, batch_first=True)
        self.lm_head = torch.nn.Linear(config.n_embd, config.vocab_size)

    def forward(self, idx, targets=None):
        return self.lm_head(self.rnn(self.wte(idx))[0]) + 1e-7 * idx.size(0), None


def test_a_causal_model_whose_rounding_depends_on_the_batch_size_is_not_drawn_as_leaking():
    """In float64 (as the pictures are drawn): the GRU's dependence on the first of 48 tokens is ~1e-10, which
    float32 keeps only as a last-bit change."""
    torch.manual_seed(0)
    model = CausalGRU(GRUConfig()).double().eval()
    (moved,) = bench.dependence_maps(model, torch.randint(256, (1, 48)))  # (T_out, T_in)
    assert (moved.triu(1) == 0).all()  # a later token moves no earlier logit
    assert (moved[torch.ones(48, 48, dtype=torch.bool).tril()] > 0).all()  # and every earlier one moves it


def pixel_kinds(p):
    """A dependence picture's pixels (H, W, 3) -> 0 white, 1 gray (a dependence), 2 pale red (the future, empty),
    3 deep red (a dependence on the future)."""
    gray = (p[..., 0] == p[..., 1]) & (p[..., 1] == p[..., 2]) & (p[..., 0] < 255)
    return np.select([gray, (p == [255, 225, 225]).all(-1), (p == [200, 0, 0]).all(-1)], [1, 2, 3], 0)


def assert_same_picture(drawn, shipped, name):
    """Every pixel of the same kind, gray levels within 2."""
    assert drawn.shape == shipped.shape, name
    differ = np.argwhere(pixel_kinds(drawn) != pixel_kinds(shipped))
    assert len(differ) == 0, f"{name}: {len(differ)} pixels of another kind, the first at (row, column) {differ[0]}"
    assert np.abs(drawn.astype(int) - shipped.astype(int)).max() <= 2, name


def assert_shipped_pictures(out_dir):
    """docs/attention holds the pictures of bench.PICTURES and the record of the run that drew them; the ones in
    out_dir are the same, pixel for pixel (assert_same_picture)."""
    shipped = os.path.join(HERE, "docs", "attention")
    pictures = [f"attention_{name}.png" for name in bench.PICTURES]
    assert sorted(os.listdir(shipped)) == sorted(pictures + ["bench.json", "bench.md"])
    for name in pictures:
        assert_same_picture(read_png(os.path.join(out_dir, name))[2], read_png(os.path.join(shipped, name))[2], name)


def test_the_shipped_dependence_pictures_are_what_the_code_draws(tmp_path):
    """docs/attention/, drawn again by the README's command. The pictures are drawn in float64 and a change within
    the logits' rounding counts as none, so no cell rests on float32 rounding (the paper LSH's leaks are bucket
    decisions): every CPU draws the same cells. Every pixel keeps its kind; a gray level may move by one or two,
    should another libm round a shade's last bit otherwise. The stage's table counts the cells in the future."""
    rows = bench.main(["--stages", "attention", "--out_dir", str(tmp_path), "--device", "cpu"])["attention"]
    assert_shipped_pictures(tmp_path)
    leaking = {r["picture"] for r in rows if r["future_cells"] > 0}
    assert [r["picture"] for r in rows] == list(bench.pictures()) and leaking == {"reformer"}  # the paper LSH
    assert json.loads((tmp_path / "bench.json").read_text())["results"]["attention"] == rows


def test_pictures_are_drawn_alike_by_another_cpus_vector_kernels(tmp_path):
    """ATEN_CPU_CAPABILITY=default runs torch's plain C++ kernels instead of the AVX2/AVX-512 ones this CPU would
    take, which round otherwise, as another CPU would. Drawn the old way (float32, every nonzero change drawn),
    the paper LSH's picture flipped 8 cells between the two on an AVX-512 CPU; as bench.py draws them, nothing but
    a gray level may move."""
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default", "OMP_NUM_THREADS": "1"}
    plain = subprocess.run([sys.executable, "bench.py", "--stages", "attention", "--out_dir", str(tmp_path),
                            "--device", "cpu"], env=env, cwd=HERE, capture_output=True, text=True, timeout=300)
    assert plain.returncode == 0, plain.stderr[-2000:]
    assert_shipped_pictures(tmp_path)


def test_default_prompt_is_short_so_that_generation_runs_on_the_cache(text_file, tmp_path, monkeypatch):
    out = str(tmp_path)
    train.main(["--data", f"text:{text_file}", "--max_iters", "1", "--eval_interval", "1", "--out_dir", out] + TINY
               + ["--block_size", "512"])
    prompts, generate = [], sample.generate

    def kept(model, idx, *rest):
        prompts.append(idx)
        return generate(model, idx, *rest)
    monkeypatch.setattr(sample, "generate", kept)
    sample.main(["--out_dir", out, "--num_samples", "1", "--max_new_tokens", "2", "--device", "cpu"])
    prompt = bytes(prompts[0][0].tolist())
    assert len(prompt) == 64 and prompt in bytes(data.load(f"text:{text_file}").splits["val"].numpy())


def test_ctrl_c_stops_training_with_one_line_saying_where_and_status_130(text_file, tmp_path):
    out = tmp_path / "run"
    run = subprocess.Popen([sys.executable, "train.py", "--data", f"text:{text_file}", "--max_iters", "100000",
                            "--eval_interval", "2", "--out_dir", str(out)] + TINY, cwd=HERE, text=True,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    while not (out / "ckpt.pt").exists() and run.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    run.send_signal(signal.SIGINT)
    _, err = run.communicate(timeout=120)
    last = err.strip().splitlines()[-1]
    where = re.fullmatch(r"stopped by Ctrl-C after step (\d+) of 100000; the last checkpoint, .*ckpt.pt, is at step "
                         r"(\d+) \(--resume continues from there\)", last)
    assert run.returncode == 130 and "Traceback" not in err and where, err[-3000:]
    reached, saved = int(where[1]), int(where[2])
    assert reached >= saved >= 2 and torch.load(out / "ckpt.pt", weights_only=True)["step"] == saved


@pytest.mark.parametrize("name", ["transformer", "perceiver_ar"])
def test_whole_split_evaluation_scores_every_token_once(name):
    """Consecutive windows: the transformer scores all 32 positions of each window, Perceiver AR its 8 latents,
    so windows advance by 32 or 8 and the bits equal a direct loop over the same predictions."""
    torch.manual_seed(0)
    extra = {"n_latents": 8} if name == "perceiver_ar" else {}
    model = tiny(name, block_size=32, vocab_size=256, n_layer=1, n_embd=16, **extra)
    stream = torch.randint(0, 256, (32 * 4 + 6,), dtype=torch.uint8)
    d = data.Data("s", "text", {"test": stream})
    bits, count, total, by_position = sample.evaluate_split(model, d, "test", 32, 3, "cpu", train.nullcontext())
    k = 32 if name == "transformer" else 8
    nats, n, per_position = 0.0, 0, []
    for s in range(0, len(stream) - 32, k):
        if s + 33 <= len(stream):
            seq = stream[s:s + 33].long()[None]
            logits = model(seq[:, :-1])[0][0]  # (k, V)
            per_position.append(F.cross_entropy(logits, seq[0, -k:], reduction="none"))  # (k,)
            nats += per_position[-1].sum().item()
            n += k
    assert (count, total) == (n, len(stream) - 1) and bits == pytest.approx(nats / n / math.log(2), rel=1e-5)
    # 133 targets: 4 windows x 32 (a 5-token tail is left), or 13 windows x 8 (the first 24 are context only)
    assert count == {"transformer": 4 * 32, "perceiver_ar": 13 * 8}[name]
    # by position: position p is the p-th target of a window; buckets 1-16 and 17-32 (Perceiver AR: 25-32 only)
    mean_bits = torch.stack(per_position).mean(0) / math.log(2)  # (k,) positions 33 - k .. 32
    expected = [(1, 16, mean_bits[:16].mean().item()), (17, 32, mean_bits[16:].mean().item())] if k == 32 else \
        [(25, 32, mean_bits.mean().item())]
    assert [(a, b) for a, b, _ in by_position] == [(a, b) for a, b, _ in expected]
    assert [x for _, _, x in by_position] == pytest.approx([x for _, _, x in expected], rel=1e-5)


def test_position_buckets_grow_fourfold_and_cover_only_the_scored_positions():
    bits = torch.arange(1, 2049, dtype=torch.float64)  # position p costs p bits: each bucket's mean is its middle
    assert sample.position_buckets(bits, 2048) == [(1, 16, 8.5), (17, 64, 40.5), (65, 256, 160.5),
                                                   (257, 1024, 640.5), (1025, 2048, 1536.5)]
    assert sample.position_buckets(bits[-1000:], 2048) == [(1049, 2048, 1548.5)]  # latents: the last 1000 only
    assert sample.position_buckets(bits[:40], 40) == [(1, 16, 8.5), (17, 40, 28.5)]


def test_a_short_run_ends_with_the_checkpoint_whose_bits_by_position_evaluation_prints_and_saves(
        text_file, tmp_path, capsys):
    """The quickstart's 200 steps under the default eval_interval of 250: the run evaluates and
    writes its checkpoint at its last step, so sample.py has something to read when it ends.
    --evaluate prints bits by position and saves them in its record beside the checkpoint."""
    train.main(["--data", f"text:{text_file}", "--max_iters", "3", "--out_dir", str(tmp_path)] + TINY)
    assert train.parse_args([]).eval_interval > 3
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["step"] == 3
    assert [json.loads(line)["step"] for line in open(tmp_path / "metrics.jsonl")] == [3]
    bits = sample.main(["--evaluate", "val", "--out_dir", str(tmp_path), "--device", "cpu"])
    assert "by position in the window (bits/byte): 1-16 " in capsys.readouterr().out
    record = json.loads((tmp_path / "evaluate_val.json").read_text())  # the figures with code, machine, command
    assert record["results"]["bits"] == bits and record["seeds"] == [1337] and record["args"]["evaluate"] == "val"
    assert {"commit", "dirty", "date", "cpu", "threads", "python", "torch", "triton", "command"} <= set(record)
    buckets = record["results"]["by_position"]
    assert [(first, last) for first, last, _ in buckets] == [(1, 16), (17, 32)]
    per_bucket = [b for _, _, b in buckets]  # equal buckets of 16: their mean is the overall bits
    assert sum(per_bucket) / 2 == pytest.approx(bits, abs=1e-5) and all(3 < b < 9 for b in per_bucket)


@pytest.mark.parametrize("name,settings,agree", [
    ("transformer", {}, True),
    ("reformer", dict(chunk=8, causal_lsh=True), True),
    ("reformer", dict(chunk=8), False),
], ids=["transformer", "causal_lsh", "lsh"])
def test_prefix_evaluation_agrees_with_the_window_exactly_when_the_forward_is_causal(name, settings, agree):
    """evaluate_prefixes feeds each scored position its prefix alone: for an exactly causal forward that is the
    same prediction as inside the whole window; for the paper's LSH (chunk boundaries move with later tokens)
    it is not, and the prefix figure is the honest one."""
    torch.manual_seed(0)
    model = tiny(name, vocab_size=256, **settings)
    d = data.Data("s", "text", {"val": torch.randint(0, 256, (2000,), dtype=torch.uint8)})
    prefix, window, n = sample.evaluate_prefixes(model, d, "val", 64, "cpu", train.nullcontext())
    assert n == 8 * 16
    assert (abs(prefix - window) < 1e-5) == agree, (prefix, window)


def test_ddp_trains_with_two_cpu_processes(text_file, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(HERE, "train.py"), "--data", f"text:{text_file}", "--max_iters", "3",
           "--eval_interval", "3", "--out_dir", str(tmp_path)] + TINY
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, cwd=HERE)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 process(es)" in r.stdout
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    assert ckpt["step"] == 3 and len(ckpt["samplers"]) == 2


# ----------------------------------------------------------------------------------------------------------
# bad input gets a clear error

# Each case: flags, and a fragment the one-line error must contain. Every one must end in argparse's exit 2 with
# that line, never a traceback from deep code.
BAD_FLAGS = [
    (["--model", "gpt5"], "choose one of: transformer, sparse_strided"),
    (["--bogus", "1"], "unrecognized arguments: --bogus"),
    (["--model", "transformer", "--n_hashes", "4"], "unrecognized arguments: --n_hashes"),
    (["--resume", "--n_hashes", "4"], "add the checkpoint's --model NAME"),
    (["--block_size", "0"], "--block_size 0: must be at least 1"), (["--batch_size", "-1"], "--batch_size -1"),
    (["--grad_accum", "0"], "--grad_accum 0"), (["--n_head", "0"], "--n_head 0"), (["--n_embd", "0"], "--n_embd 0"),
    (["--n_layer", "0"], "--n_layer 0"), (["--eval_interval", "0"], "--eval_interval 0"),
    (["--eval_iters", "0"], "--eval_iters 0"), (["--audio_seq_len", "0"], "--audio_seq_len 0"),
    (["--max_iters", "0"], "--max_iters 0"), (["--warmup", "-1"], "--warmup -1"), (["--lr", "0"], "--lr 0"),
    (["--lr", "nan"], "--lr nan"), (["--grad_clip", "-1"], "--grad_clip -1"), (["--dropout", "1"], "--dropout 1"),
    (["--batch_size", "two"], "--batch_size: invalid int value: 'two'"),
    (["--n_embd", "30", "--n_head", "4"], "divisible"),
    (["--model", "reformer", "--n_hashes", "two"], "--n_hashes: invalid int value: 'two'"),
    (["--model", "reformer", "--n_hashes", "0"], "n_hashes"), (["--model", "reformer", "--chunk", "0"], "chunk"),
    (["--model", "reformer", "--ff_chunks", "0"], "ff_chunks"), (["--model", "reformer", "--lsh_every", "0"], "lsh_every"),
    (["--model", "reformer", "--attn_chunks", "9"], "attn_chunks"),
    (["--model", "reformer", "--n_buckets", "6", "--factorize_hash", "True"], "factorize_hash"),
    (["--model", "reformer", "--axial_shape", "(3,)"], "axial_shape"),
    (["--model", "reformer", "--axial_shape", "(3,"], "--axial_shape: invalid tuple of ints"),
    (["--model", "reformer", "--reversible", "maybe"], "--reversible: invalid true/false value"),
    (["--model", "sparse_fixed", "--tile", "-1"], "tile"),
    (["--model", "sparse_strided", "--stride", "7"], "stride"), (["--model", "aft_local", "--window", "0"], "window"),
    (["--model", "aft_full", "--w_rank", "-2"], "--w_rank -2"), (["--model", "perceiver_ar", "--n_latents", "-1"],
                                                                  "--n_latents -1"),
    (["--model", "perceiver_ar", "--n_latents", "999"], "n_latents"),
    (["--model", "perceiver_ar", "--context_dropout", "2"], "context_dropout"),
    (["--device", "tpu"], "--device tpu"), (["--device", "cuda:7"], "--device cuda:7"),
]
if not torch.cuda.is_available():  # the sentence given where no GPU is visible
    BAD_FLAGS.append((["--device", "cuda"], "--device cuda: torch sees no CUDA GPU here"))


@pytest.mark.parametrize("argv,fragment", BAD_FLAGS, ids=[" ".join(a) for a, _ in BAD_FLAGS])
def test_bad_flags_stop_at_parse_time_with_one_sentence(argv, fragment, capsys):
    with pytest.raises(SystemExit) as e:
        train.parse_args(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and fragment in err[-1], err


def tokens(n):
    return torch.randint(0, 11, (1, n))


def attend(T=64, S=64, tile=16, **options):
    """kernels.attention over 3 heads of width 16, T queries and S keys, in tiles of `tile`."""
    q, k, v, _ = random_inputs(1, 3, T, S, 16)
    return attention(q, k, v, tile=tile, **options)


# A setting a model's Config cannot take, or an input its forward (or the attention kernels' public
# function) cannot: (what raises ValueError, a fragment of the one sentence it raises). A model's
# rows start with its name (pytest -k reformer).
BAD_INPUT = {
    "transformer: 65 tokens, block_size 64": (
        lambda: tiny("transformer", True)(tokens(65)), "exceeds the model's block_size 64"),
    "transformer: image positions in 64 tokens": (
        lambda: tiny("transformer", True, pos_emb="image"), "3072 for 32x32x3"),
    "transformer: pattern dilated": (
        lambda: tiny("transformer", True, pattern="dilated"), "choose one of"),
    "sparse_strided: block_size 48": (
        lambda: tiny("sparse_strided", True, block_size=48), r"of stride \* tile = 32"),
    "sparse_strided: a transpose of 40": (
        lambda: st.strided_transpose(torch.randn(1, 1, 40, 2), 8, 4), r"stride \* tile = 32"),
    "sparse_fixed: summary 6": (
        lambda: tiny("sparse_fixed", True, summary=6), "multiples of tile"),
    "sparse_fixed: n_offsets 3": (lambda: tiny("sparse_fixed", True, n_offsets=3), "n_offsets"),
    "sparse_fixed: multihead, 3 heads": (
        lambda: tiny("sparse_fixed", True, combine="multihead", n_head=3, n_embd=12),
        "n_head=3 must be even"),
    "reformer: 40 tokens, block_size 32": (lambda: tiny("reformer", True)(tokens(40)), "exceeds"),
    "reformer: axial_shape (3, 8)": (
        lambda: tiny("reformer", True, axial_shape=(3, 8)), "axial_shape"),
    "reformer: 6 buckets factorised": (
        lambda: tiny("reformer", True, n_buckets=6, factorize_hash=True), "factorize_hash"),
    "reformer: 4 heads in 5 groups": (
        lambda: tiny("reformer", True, n_head=4, attn_chunks=5), "attn_chunks"),
    "aft_simple: 9 tokens, block_size 8": (
        lambda: tiny_model("simple", block_size=8)(tokens(9)), "exceeds the model's block_size 8"),
    "aft: variant fft": (lambda: AFT(aft.Config(variant="fft")), "unknown AFT variant 'fft'"),
    "aft_local: window 0": (lambda: tiny("aft_local", window=0), "window must be at least 1"),
    "aft_full: w_rank -1": (lambda: tiny("aft_full", w_rank=-1), "w_rank must be 0"),
    "aft_conv: width 9 over 2 heads": (lambda: tiny("aft_conv", n_embd=9), "divisible by n_head"),
    **{f"aft_{v}: a cache": (lambda v=v: tiny_model(v)(tokens(3), cache=[{}, {}]), "recurrent")
       for v in ("full", "conv")},  # they generate by recomputing: CACHED_GENERATION
    "perceiver_ar: 17 tokens, block_size 16": (lambda: make_model()(tokens(17)), "does not fit"),
    "perceiver_ar: 5 tokens, 6 latents": (lambda: make_model()(tokens(5)), "does not fit"),
    "perceiver_ar: rotary_base 1": (lambda: tiny("perceiver_ar", rotary_base=1), "rotary_base=1"),
    "perceiver_ar: 9 latents, block_size 8": (
        lambda: tiny("perceiver_ar", block_size=8, n_latents=9),
        "n_latents=9 must lie in 1 .. block_size=8"),
    "kernels: a layout of 3 query tiles for 4": (
        lambda: attend(layout=torch.ones(1, 3, 4).bool()), r"must have shape \(1 or H=3, 4, 4\)"),
    "kernels: 2 layout heads for 3": (
        lambda: attend(layout=torch.ones(2, 4, 4).bool()), r"\(1 or H=3, 4, 4\).* got \(2, 4, 4\)"),
    "kernels: 40 queries in tiles of 16": (
        lambda: attend(T=40, backend="triton"), "T and S to be multiples of tile=16"),
    "kernels: a layout, S - T = 8 in tiles of 16": (
        lambda: attend(T=56, layout=torch.ones(1, 4, 4).bool()), "S - T must be a multiple"),
    "kernels: tiles of 24": (
        lambda: attend(72, 72, tile=24, backend="triton"), r"take tiles \(16, 32"),
    "kernels: window 0": (lambda: attend(window=0), "window must be a positive number"),
    "kernels: backend cuda": (lambda: attend(backend="cuda"), "unknown attention backend 'cuda'"),
}


@pytest.mark.parametrize("case", BAD_INPUT)
def test_models_and_kernels_refuse_what_they_cannot_take_with_value_error_and_a_sentence(case):
    build_or_run, fragment = BAD_INPUT[case]
    with pytest.raises(ValueError, match=fragment):
        build_or_run()


@pytest.mark.parametrize("name", list(train.MODELS))
def test_every_model_trains_and_every_integer_setting_is_refused_at_parse_time_or_works(
        name, text_file, tmp_path):
    """Every registered model trains two steps through train.py and writes its checkpoint. The
    class, not the examples: 0 and -1 for every integer field of every model's Config either stop at
    parse time with a sentence naming the flag, or are taken (0 = automatic) and the model trains a
    step."""
    module, _, variant = train.MODELS[name]
    fields = [f.name for f in dataclasses.fields(importlib.import_module(module).Config)
              if f.type is int and f.name not in train.SHARED_FIELDS and f.name not in variant]
    base = ["--model", name, "--data", f"text:{text_file}"] + TINY + ["--block_size", "64"]
    hist = train.main(base + ["--max_iters", "2", "--eval_interval", "2", "--out_dir",
                              str(tmp_path / "all")])
    assert math.isfinite(hist[-1]["val_loss"]) and (tmp_path / "all" / "ckpt.pt").exists()
    for field, value in itertools.product(fields, ("0", "-1")):
        argv = base + ["--max_iters", "1", "--eval_interval", "1", f"--{field}", value, "--out_dir",
                       str(tmp_path / f"{field}{value}")]
        try:
            train.parse_args(argv)
        except SystemExit as e:
            assert e.code == 2, (field, value)
            continue
        assert value == "0", f"--{field} -1 was accepted"
        assert math.isfinite(train.main(argv)[-1]["val_loss"]), field


BAD_SAMPLE_AND_BENCH_FLAGS = [
    ("sample", ["--top_k", "0"]), ("sample", ["--max_new_tokens", "-1"]),
    ("sample", ["--num_samples", "0"]), ("sample", ["--temperature", "0"]),
    ("sample", ["--seconds", "nan"]), ("sample", ["--prompt", ""]),
    ("bench", ["--stages", "kernels,warp"]), ("bench", ["--models", "gpt"]),
    ("bench", ["--lengths", "64,x"]), ("bench", ["--budget", "0"]), ("bench", ["--seeds", "-1"]),
]


@pytest.mark.parametrize("script,argv", BAD_SAMPLE_AND_BENCH_FLAGS,
                         ids=[f"{s} {' '.join(a)}" for s, a in BAD_SAMPLE_AND_BENCH_FLAGS])
def test_bad_sampling_and_bench_flags_stop_at_parse_time_naming_the_flag(script, argv, capsys):
    with pytest.raises(SystemExit) as e:
        dict(sample=sample.parse_args, bench=bench.parse_args)[script](argv)
    assert e.value.code == 2 and argv[0] in capsys.readouterr().err


def documented_commands():
    """Every `python train.py|sample.py|bench.py ...` command in README.md, docs/*.md and docs/*.sh (lines continued
    with a backslash joined), as (file, argv list after the script's name)."""
    found = []
    for path in [os.path.join(HERE, "README.md")] + sorted(os.path.join(HERE, "docs", f)
                                                           for f in os.listdir(os.path.join(HERE, "docs"))
                                                           if f.endswith((".md", ".sh"))):
        text = re.sub(r"\\\n\s*", " ", open(path).read())
        for match in re.finditer(r"python (train|sample|bench)\.py([^`\n#|]*)", text):
            found.append((os.path.basename(path), match.group(1), match.group(2).split()))
    return found


def test_every_flag_of_every_documented_command_exists(capsys):
    """The README and docs/ commands use only flags their script has (train.py: with the model the command
    names), so a reader who copies one never meets 'unrecognized arguments'."""
    commands = documented_commands()
    assert len(commands) >= 20 and {script for _, script, _ in commands} == {"train", "sample", "bench"}
    helps = {}
    for where, script, argv in commands:
        model = argv[argv.index("--model") + 1] if "--model" in argv else None
        key = (script, model)
        if key not in helps:
            with pytest.raises(SystemExit):
                if script == "train":
                    train.parse_args(["--model", model or "transformer", "--help"])
                elif script == "sample":
                    sample.parse_args(["--help"])
                else:
                    bench.parse_args(["--help"])
            helps[key] = set(re.findall(r"--\w+", capsys.readouterr().out))
        unknown = [a for a in argv if a.startswith("--") and a.split("=")[0] not in helps[key]]
        assert not unknown, f"{where}: python {script}.py {' '.join(argv)} uses {unknown}"


def test_every_published_figure_links_a_record_that_holds_its_code_machine_and_command():
    """Every row of the README's "Results at a glance" and every table of docs/*.md with a measured figure (a
    decimal number) links its record under docs/bench/ (in the table, or in the text between it and the heading
    or table before it), names the test that holds it, or says "unrecorded". Every linked record exists and holds
    bench.device_record's fields (on a GPU also driver and CUDA; each timed cell its repeats), and a link to one
    from a dirty tree says "dirty"; a record without a commit must be one docs/bench/README.md lists, holding at
    least its date, python version, and command or a note of what ran."""
    about = open(os.path.join(HERE, "docs", "bench", "README.md")).read()
    legacy = set(re.findall(r"`([\w.-]+\.json)`", about[about.index("## Records without a commit"):]))
    link = r"\[([^\]]*)\]\((?:docs/)?bench/([\w.-]+\.json)\)"
    held = lambda text: re.search(link, text) or "unrecorded" in text.lower() or re.search(r"`test(_\w+){3,}`", text)
    readme = open(os.path.join(HERE, "README.md")).read()
    glance = readme[readme.index("## Results at a glance"):].split("\n#", 1)[0]
    rows = [line for line in glance.splitlines() if line.startswith("| ") and not line.startswith("| claim")]
    assert rows and all(held(r) for r in rows), "a row of the README's Results at a glance without its record"
    texts = {"README.md": glance}
    for name in sorted(f for f in os.listdir(os.path.join(HERE, "docs")) if f.endswith(".md")):
        texts[name] = text = open(os.path.join(HERE, "docs", name)).read()
        for table in re.finditer(r"(?:^\|.*\n)+", text, re.M):
            before = text[:table.start()]
            after = max([m.end() for m in re.finditer(r"^##+ .*\n|^\|.*\n(?!\|)", before, re.M)], default=0)
            if re.search(r"\d\.\d", table.group()):
                assert held(before[after:] + table.group()), f"{name}: a table without its record: {table.group()[:80]}"
    links = [(where, *m) for where, text in texts.items() for m in re.findall(link, text)]
    assert len(links) >= 20
    for where, text, name in links:
        path = os.path.join(HERE, "docs", "bench", name)
        assert os.path.isfile(path), f"{where} links {name}, which docs/bench/ does not hold"
        record = json.load(open(path))
        if "commit" not in record:
            assert name in legacy, f"{where} links {name}: no commit, and not among docs/bench/README.md's legacy"
            assert {"date", "python"} <= set(record) and ("command" in record or "note" in record), name
            continue
        fields = {"commit", "dirty", "date", "device", "cpu", "threads", "gpu", "python", "torch", "triton",
                  "command", "args", "seeds", "results"} | ({"driver", "cuda"} if record["gpu"] else set())
        assert fields <= set(record) and record["commit"], (where, name, fields - set(record))
        assert "dirty" in text or not record["dirty"], f"{where}: [{text}] links a record from a dirty tree"
        cells = [r for rows in record["results"].values() if isinstance(rows, list) for r in rows]
        assert all("timings" in r for r in cells if any(k.endswith("_ms") for k in r)), (where, name)


def test_resume_refuses_what_contradicts_the_checkpoint_or_a_damaged_one_and_keeps_the_rest(
        text_file, tmp_path):
    base = ["--out_dir", str(tmp_path)] + TINY
    with pytest.raises(FileNotFoundError, match="does not exist"):
        train.main(base + ["--resume"])
    train.main(base + ["--data", f"text:{text_file}", "--max_iters", "2", "--eval_interval", "2"])
    for flags, fragment in ((["--data", "copy"], f"--data copy differs from the checkpoint's text:{text_file}"),
                            (["--n_embd", "64"], "--n_embd 64 differs from the checkpoint's 32"),
                            (["--block_size", "64"],
                             "--block_size 64 differs from the checkpoint's 32"),
                            (["--model", "aft_local"], "--model aft_local differs from the checkpoint's transformer"),
                            (["--max_iters", "2"], "already at step 2, so --max_iters 2 leaves nothing to do")):
        with pytest.raises(ValueError, match=re.escape(fragment)):
            train.main(base + ["--resume", "--max_iters", "4"] + flags)
    history = train.main(base + ["--resume", "--max_iters", "3", "--eval_interval", "3"])  # model, data: the checkpoint's
    assert history[0]["step"] == 2 and torch.load(tmp_path / "ckpt.pt", weights_only=False)["step"] == 3
    ckpt = tmp_path / "ckpt.pt"
    ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])  # a torn write from another tool
    with pytest.raises(ValueError, match="damaged"):
        train.main(base + ["--resume", "--max_iters", "4"])


def test_a_diverging_run_stops_and_never_overwrites_the_good_checkpoint(text_file, tmp_path):
    base = ["--data", f"text:{text_file}", "--out_dir", str(tmp_path), "--eval_interval", "4"] + TINY
    train.main(base + ["--max_iters", "4"])
    good = (tmp_path / "ckpt.pt").read_bytes()
    with pytest.raises(train.Diverged, match="was not overwritten|left as it was"):
        train.main(base + ["--resume", "--max_iters", "40", "--lr", "1e9", "--warmup", "0"])
    assert (tmp_path / "ckpt.pt").read_bytes() == good
    r = subprocess.run([sys.executable, "train.py", "--resume", "--max_iters", "40", "--lr", "1e9", "--warmup", "0"]
                       + base, capture_output=True, text=True, cwd=HERE, timeout=120)
    last = r.stderr.strip().splitlines()[-1]  # tqdm's bar shares stderr
    assert r.returncode == 1 and last.startswith("error: training diverged") and "Traceback" not in r.stderr


def test_unusable_out_dir_and_missing_checkpoint_are_one_sentence(text_file, tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        train.main(["--data", f"text:{text_file}", "--out_dir", str(afile)] + TINY)
    with pytest.raises(SystemExit) as e:
        bench.parse_args(["--out_dir", str(afile)])
    assert e.value.code == 2 and capsys.readouterr().err.strip().splitlines()[-1].endswith(
        f"--out_dir {afile} is a file, not a folder; choose another --out_dir")
    with pytest.raises(ValueError, match="cannot be written"):
        train.main(["--data", f"text:{text_file}", "--out_dir", str(afile / "run")] + TINY)
    for call in (lambda: sample.main(["--evaluate", "test", "--out_dir", str(tmp_path)]),
                 lambda: sample.main(["--out_dir", str(tmp_path), "--device", "cpu"])):
        with pytest.raises(FileNotFoundError, match="train one first") as e:
            call()
        assert "--resume" not in str(e.value)


def test_text_sampling_continues_the_prompt_and_ends_without_progress_bars(text_file, tmp_path):
    """Progress bars only display: with TQDM_DISABLE=1 generation still counts its tokens and ends."""
    train.main(["--data", f"text:{text_file}", "--max_iters", "1", "--eval_interval", "1",
                "--out_dir", str(tmp_path)] + TINY)
    r = subprocess.run([sys.executable, "sample.py", "--out_dir", str(tmp_path), "--max_new_tokens", "25",
                        "--num_samples", "2", "--prompt", "Hello, long context", "--device", "cpu"],
                       capture_output=True, text=True, cwd=HERE, timeout=120,
                       env={**os.environ, "TQDM_DISABLE": "1"})
    assert r.returncode == 0 and r.stdout.count("Hello, long context") == 2, r.stderr
    first, _ = r.stdout.split("--- sample 1 ---\n")[1].split("--- sample 2 ---")
    assert len(first.encode()) >= len("Hello, long context") + 25 - 25 // 4


# ----------------------------------------------------------------------------------------------------------
# sparse_transformer.py: patterns, transpose, recompute, position embeddings, cached generation

# (pattern, combine, backend): every pattern on the dense path; on the Triton kernel, the ones that
# make every call the kernel gets
SPARSE = [("local", "interleaved", "dense")] + [
    (p, c, "dense") for p in ("strided", "fixed") for c in st.COMBINES] + [
    (p, c, "triton") for p, c in (("strided", "interleaved"), ("strided", "multihead"),
                                  ("fixed", "merged"), ("fixed", "multihead"))]


def as_sets(mask):
    return [{j for j in range(mask.size(1)) if mask[i, j]} for i in range(mask.size(0))]


def test_strided_mask_matches_paper_definition():
    T, l = 23, 5
    A1 = [{j for j in range(i + 1) if i - l < j} for i in range(T)]
    A2 = [{j for j in range(i + 1) if (i - j) % l == 0} for i in range(T)]
    pos = torch.arange(T)
    for combine in st.COMBINES:
        cfg = sparse_config(pattern="strided", stride=l, combine=combine, block_size=80)
        m0, m1 = element_mask(cfg, 0, pos, pos), element_mask(cfg, 1, pos, pos)
        if combine == "interleaved":
            expected = [[A1] * 4, [A2] * 4]
        elif combine == "merged":
            expected = [[[a | b for a, b in zip(A1, A2)]] * 4] * 2
        else:
            expected = [[A1, A1, A2, A2]] * 2
        assert [[as_sets(m[h]) for h in range(4)] for m in (m0, m1)] == expected


def test_fixed_mask_matches_paper_definition_with_per_head_summary_offsets():
    T, l, c = 30, 8, 2
    A1 = [{j for j in range(i + 1) if j // l == i // l} for i in range(T)]
    pos = torch.arange(T)
    cfg = sparse_config(pattern="fixed", stride=l, summary=c, n_offsets=1, tile=2,
                        combine="interleaved")
    A2 = [{j for j in range(i + 1) if l - c <= j % l < l} for i in range(T)]  # the paper's set, every head
    assert all(as_sets(element_mask(cfg, 0, pos, pos)[h]) == A1 for h in range(4))
    assert all(as_sets(element_mask(cfg, 1, pos, pos)[h]) == A2 for h in range(4))
    cfg = sparse_config(pattern="fixed", stride=l, summary=c, n_offsets=3, tile=2, combine="merged")
    for h in range(4):
        o = (h % 3) * c  # head h reads positions [l - c - o, l - o) of each block
        A2h = [{j for j in range(i + 1) if l - c - o <= j % l < l - o} for i in range(T)]
        assert as_sets(element_mask(cfg, 0, pos, pos)[h]) == [a | b for a, b in zip(A1, A2h)]


def test_block_layouts_with_element_parts_reproduce_element_masks_and_are_sparse():
    n, blk, l, c = 64, 4, 8, 4
    nb = n // blk
    cfg = sparse_config(stride=l, summary=c, n_offsets=2, pattern="fixed")
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    perm = st.strided_transpose(torch.arange(n).view(1, 1, n, 1), l, blk).view(n)
    cases = [  # (layout, window, element mask of the part in the order the kernel sees)
        (st.local_layout(nb, blk, l), l, st.part_mask("local", i, j, cfg)),
        (st.strided_layout(nb, blk, n, l), None, st.part_mask("strided", perm[:, None], perm[None, :], cfg)),
        (st.fixed_layout(nb, blk, l), None, st.part_mask("block", i, j, cfg)),
        (st.summary_layout(nb, blk, l, c, 0), None, st.part_mask("summary", i, j, cfg, head=0)),
        (st.summary_layout(nb, blk, l, c, c), None, st.part_mask("summary", i, j, cfg, head=1)),
    ]
    causal_tiles = nb * (nb + 1) // 2
    for layout, window, mask in cases:
        assert torch.equal(kernels.attention_mask(n, n, layout=layout[None], tile=blk, window=window)[0], mask)
        assert layout.sum() < causal_tiles  # tiles are skipped ...
        tile_has_entry = mask.view(nb, blk, nb, blk).any(dim=(1, 3))
        assert torch.equal(layout, tile_has_entry)  # ... and every computed tile holds an allowed entry


@pytest.mark.parametrize("pattern,combine,backend", SPARSE)
def test_every_layer_equals_attention_under_its_element_mask(pattern, combine, backend,
                                                             monkeypatch):
    """Output and gradients. Dense: float64, at 64 positions and 37 (padded up to a tileable,
    transposable length). Triton: float32, in the kernel's smallest tiles, 16 (the fixed pattern's
    stride 32). The strided pattern's second part (A2, every layer 1 of interleaved) runs as causal
    attention in the transposed order."""
    torch.manual_seed(1)
    if backend == "triton":
        monkeypatch.setattr(st, "attention", functools.partial(kernels.attention, backend="triton"))
        stride = 32 if pattern == "fixed" else 4
        cfg = sparse_config(pattern=pattern, combine=combine, stride=stride, summary=16,
                            tile=16, n_head=2, n_embd=32)
        dtype, lengths = torch.float32, (64,)
        tol, grad_tol = dict(rtol=1e-4, atol=1e-5), dict(rtol=1e-4, atol=1e-4)
    else:
        cfg = sparse_config(pattern=pattern, combine=combine)
        dtype, lengths = torch.float64, (64, 37)
        tol = grad_tol = dict(rtol=1e-10, atol=1e-10)
    for layer, T in itertools.product((0, 1), lengths):
        q, k, v = (torch.randn(2, cfg.n_head, T, 16, dtype=dtype, requires_grad=True)
                   for _ in range(3))
        pos = torch.arange(T)
        ref = F.scaled_dot_product_attention(q, k, v, attn_mask=element_mask(cfg, layer, pos, pos))
        out = st.CausalSelfAttention(cfg, layer).to(dtype).attend(q, k, v)
        assert_same_output_and_grads(out, ref, (q, k, v), tol, grad_tol)


def randomized(model):
    torch.nn.init.normal_(model.lm_head.weight, std=0.5)  # it starts at zero, which would hide every change
    return model


@pytest.mark.parametrize("pattern", ["all", "strided", "fixed"])
def test_recompute_gives_the_same_loss_and_gradients_with_dropout(pattern):
    steps = []
    for recompute in (False, True):
        torch.manual_seed(3)
        model = tiny("transformer", True, pattern=pattern, dropout=0.2, recompute=recompute)
        model = randomized(model).double()
        idx = torch.randint(0, 11, (2, 64))
        steps.append(training_step(model, idx[:, :-1], idx[:, 1:], seed=4))  # the same dropout
    torch.testing.assert_close(steps[1][1], steps[0][1], rtol=1e-12, atol=1e-12)  # the loss
    for a, b in zip(*steps):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)


def saved_bytes(model, idx):
    """Bytes of the storages a training forward on idx keeps for the backward (parameters not)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def keep(t):
        if t.untyped_storage().data_ptr() not in params:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        model(idx[:, :-1], idx[:, 1:])
    return sum(storages.values())


def test_recompute_keeps_no_attention_maps_for_the_backward():
    torch.manual_seed(5)
    saved = {}
    for recompute, T in itertools.product((False, True), (64, 256)):
        model = SparseTransformer(sparse_config(block_size=256, n_layer=4, recompute=recompute))
        saved[recompute, T] = saved_bytes(model, torch.randint(0, 11, (1, T + 1)))
    assert saved[False, 256] > 5 * saved[False, 64]  # n x n tensors are kept without recompute (4x n: > 4x)
    assert saved[True, 256] <= 4 * saved[True, 64] + 1  # linear in n with it
    assert saved[True, 256] < saved[False, 256] / 10


def test_automatic_tile_is_64_where_long_sequences_tile_into_it_and_32_elsewhere():
    auto = lambda **kw: st.auto_tile(Config(**kw))
    assert auto(block_size=4096, pattern="strided") == 64 and auto(block_size=1024, pattern="strided") == 32
    assert auto(block_size=4096, pattern="fixed") == 32  # the default summary of 32 is no multiple of 64
    assert auto(block_size=4096, pattern="fixed", summary=64) == 64
    model = SparseTransformer(Config(block_size=4096, n_layer=1, n_head=2, n_embd=16, pattern="strided"))
    assert (model.config.tile, model.config.stride) == (64, 64)  # l = sqrt(n) still tiles


def test_factorized_and_image_position_embeddings_sum_their_coordinates():
    emb = st.PositionEmbedding(sparse_config(block_size=3072, stride=96, pos_emb="image"))
    t = torch.tensor([0, 1, 5, 95, 96, 100, 3071])
    row, col, ch = [e.weight for e in emb.tables]
    expected = torch.stack([row[p // 96] + col[(p // 3) % 32] + ch[p % 3] for p in t.tolist()])
    torch.testing.assert_close(emb(t), expected, rtol=0, atol=0)
    emb = st.PositionEmbedding(sparse_config(block_size=60, stride=8, pos_emb="factorized"))
    row, col = [e.weight for e in emb.tables]
    assert row.size(0) == 8 and col.size(0) == 8
    t = torch.arange(60)
    torch.testing.assert_close(emb(t), torch.stack([row[p // 8] + col[p % 8] for p in range(60)]), rtol=0, atol=0)


def test_branch_outputs_are_scaled_by_depth():
    model = SparseTransformer(sparse_config(n_layer=8, n_embd=64))
    std = model.blocks[0].attn.proj.weight.std().item()
    assert 0.5 * 0.02 / 4 < std < 1.5 * 0.02 / 4  # 0.02 / sqrt(2 * 8)


# ----------------------------------------------------------------------------------------------------------
# reformer.py and the LSH kernel: hashing, rounds, reversibility, chunking

def random_lsh_inputs(B=1, H=2, T=32, D=16, R=2, n_buckets=4, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, T, D, generator=g, dtype=dtype, requires_grad=True)
    v = torch.randn(B, H, T, D, generator=g, dtype=dtype, requires_grad=True)
    buckets = torch.randint(n_buckets, (B, H, R, T), generator=g)
    return q, v, buckets


LSH_MODES = {"paper": dict(), "same-bucket-dup-correction": dict(same_bucket_mask=True, dup_correction=True),
             "causal": dict(causal=True), "causal-dup-correction": dict(causal=True, dup_correction=True)}


# case: (B, H, T, rounds, chunk, mode (lsh_attention's options), dtype, seed, path): the kernel
# (path triton, interpreted) or cpu_lsh_attention (path cpu: what a CPU tensor gets) against the
# dense twin. 16-bit inputs are held to the twin in float64; float64 inputs within 1e-12, float32
# within 2e-5.
LSH_KERNEL_CASES = {
    # R = 1 writes the output in one launch; R > 1 merges rounds in the kernel and sums their gradients;
    # T = 36 pads the sequence to a multiple of chunk inside
    **{f"{mode}-chunk{chunk}-R{R}-T{T}": (1, 2, T, R, chunk, LSH_MODES[mode], torch.float32, 0,
                                           "triton")
       for chunk, R, T in ((8, 1, 32), (8, 3, 36), (16, 2, 32)) for mode in LSH_MODES},
    # Outside sm_90 the kernels walk a chunk pair in key tiles narrower than the chunk (TILE_N 16);
    # with chunk 24 the tiles straddle chunk boundaries. Dedup and rounds included.
    "key-tiles-of-16-in-chunks-of-32": (1, 2, 101, 2, 32, dict(dup_correction=True), torch.float32,
                                        32, "triton"),
    "key-tiles-of-16-in-chunks-of-24": (1, 2, 77, 2, 24, dict(dup_correction=True), torch.float32,
                                        24, "triton"),
    # fp16 inputs: logits and the merged output in fp32, the output stored in fp16, gradients summed in fp32
    # for a quarter of the B*H = 6 heads at a time (groups of 2, across the batch boundary)
    "fp16": (2, 3, 32, 3, 8, {}, torch.float16, 4, "triton"),
    # cpu_lsh_attention: PyTorch's fused CPU attention per chunk, in groups of 7 chunks (which
    # straddle rounds and heads); every mode, through the padding of a length chunk does not divide
    # (T = 37) and the causal layout's empty slots
    **{f"{mode}-cpu": (2, 2, 37, 3, 8, dict(scale=0.7, **LSH_MODES[mode]), torch.float64, 0, "cpu")
       for mode in LSH_MODES},
}


@pytest.mark.parametrize("case", LSH_KERNEL_CASES)
def test_lsh_kernel_and_cpu_path_give_the_twins_output_and_gradients(case, monkeypatch):
    B, H, T, R, chunk, mode, dtype, seed, path = LSH_KERNEL_CASES[case]
    monkeypatch.setattr(kernels, "CPU_GROUP", 7)
    q, v, buckets = random_lsh_inputs(B=B, H=H, T=T, R=R, dtype=dtype, seed=seed)
    g = torch.Generator().manual_seed(seed)
    grad_out = torch.randn(B, H, T, 16, generator=g, dtype=torch.float64)
    results = {}
    for backend in ("dense", path):
        x, y = (q, v) if backend == path or dtype != torch.float16 else (
            t.detach().double().requires_grad_() for t in (q, v))  # the twin, fp16 inputs: float64
        k = F.normalize(x.float() if x.dtype == torch.float16 else x, dim=-1).to(x.dtype)
        with bench.launch_overrides(lsh=dict(TILE_N=16) if "key-tiles" in case else {}):
            out = lsh_attention(x, k, y, buckets, chunk, **mode,
                                backend=None if backend == "cpu" else backend)
        assert kernels.last_lsh_backend == backend and out.dtype == x.dtype
        results[backend] = (out, *torch.autograd.grad((out.double() * grad_out).sum(), (x, y)))
    tol = {torch.float64: 1e-12, torch.float32: 2e-5, torch.float16: 2e-2}[dtype]
    for want, got in zip(results["dense"], results[path]):
        torch.testing.assert_close(got.double(), want.double(), atol=tol, rtol=tol)


def test_reformer_with_the_lsh_kernel_trains_like_the_dense_twin(monkeypatch):
    # The whole model, reversible recompute included, with the Triton kernel (interpreter) in every layer.
    steps = []
    for backend in ("dense", "triton"):
        monkeypatch.setattr(reformer, "lsh_attention", functools.partial(kernels.lsh_attention, backend=backend))
        torch.manual_seed(0)
        model = Reformer(reformer_config(n_hashes=3, ff_chunks=2)).train()
        idx = torch.randint(11, (2, 32))
        steps.append(training_step(model, idx, idx, seed=1))
        assert kernels.last_lsh_backend == backend
    for want, got in zip(*steps):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def windows_from_definition(buckets, chunk, same_bucket_mask=False, causal=False):
    """Boolean (R, T, T): key j is in query i's window in round r. Paper: j <= i in the own or previous chunk of
    the sorted order (and bucket with same_bucket_mask). Causal: j <= i in the same bucket, fewer than chunk sorted
    places back. Any T: the last chunk may be short."""
    R, T = buckets.shape
    win = torch.zeros(R, T, T, dtype=torch.bool)
    for r in range(R):
        order = sorted(range(T), key=lambda t: (int(buckets[r, t]), t))
        rank = {t: s for s, t in enumerate(order)}
        for i in range(T):
            for j in range(i + 1):
                same = bool(buckets[r, i] == buckets[r, j])
                if causal:
                    win[r, i, j] = same and rank[i] - rank[j] < chunk
                else:
                    near = rank[j] // chunk in (rank[i] // chunk, rank[i] // chunk - 1)
                    win[r, i, j] = near and (same or not same_bucket_mask)
    return win


def lsh_reference(q, k, v, buckets, chunk, same_bucket_mask=False, dup_correction=False, causal=False):
    """LSH attention in float64 from the windows' definition: one softmax over all rounds' windows, a key
    weighted by the number of rounds whose window holds it (by 1 with dup_correction). (B, H, T, D)."""
    B, H, T, _ = q.shape
    out = torch.zeros(q.shape, dtype=torch.float64)
    for b, h in itertools.product(range(B), range(H)):
        win = windows_from_definition(buckets[b, h], chunk, same_bucket_mask, causal)
        weight = win.any(0).double() if dup_correction else win.sum(0).double()  # (T, T)
        s = q[b, h].double() @ k[b, h].double().T
        s = s.masked_fill(torch.eye(T, dtype=torch.bool), SELF_LOGIT).masked_fill(weight == 0, float("-inf"))
        e = weight * torch.exp(s - s.max(-1, keepdim=True).values)
        out[b, h] = (e @ v[b, h].double()) / e.sum(-1, keepdim=True)
    return out


# case: (backend, T, chunk, lsh_attention's options), 3 rounds of 4 buckets: chunks of 4 in 32
# positions, and of 8 in 37 = 4 * 8 + 5, where the last chunk holds 5 positions and the padding
# inside must not show in the output; one chunk of 16 covering the sequence, where every key
# before a query is in its window whatever the buckets: every round is dense causal attention
LSH_REFERENCE_CASES = {
    **{f"one-chunk-covering-the-sequence-{backend}": (backend, 16, 16, {})
       for backend in ("dense", "triton")},
    **{f"rounds-{name}": ("dense", 32, 4, options) for name, options in (
        ("paper", {}), ("same-bucket", dict(same_bucket_mask=True)),
        ("same-bucket-dup-correction", dict(same_bucket_mask=True, dup_correction=True)))},
    **{f"short-last-chunk-{mode}-{backend}": (backend, 37, 8, LSH_MODES[mode])
       for backend in ("dense", "triton") for mode in LSH_MODES},
}


@pytest.mark.parametrize("case", LSH_REFERENCE_CASES)
def test_lsh_rounds_combine_by_logsumexp(case):
    """Rounds weighted by exp(lse_r - logsumexp lse) make one softmax over all rounds' windows, a
    key counted once per round that sees it; with the duplicate correction, once in all (the union
    of the windows): lsh_reference, output and the gradients of q (k = q / |q| included) and v, in
    float64 on the twin, float32 on the kernel."""
    backend, T, chunk, options = LSH_REFERENCE_CASES[case]
    dtype, tol = (torch.float64, 1e-10) if backend == "dense" else (torch.float32, 2e-5)
    q, v, buckets = random_lsh_inputs(B=1, H=2, T=T, R=3, n_buckets=4, dtype=dtype, seed=6)
    out = lsh_attention(q, F.normalize(q, dim=-1), v, buckets, chunk, backend=backend, **options)
    expected = lsh_reference(q, F.normalize(q, dim=-1), v, buckets, chunk, **options)
    assert_same_output_and_grads(out.double(), expected, (q, v), dict(atol=tol, rtol=tol))


def later_inputs_effect(backend, R, scale, causal, dup_correction=False, T=44, t=21, chunk=8):
    """How much the LSH output before position t moves when q, k, v and the buckets at positions >= t change,
    and the largest gradient of the output at t with respect to q, k, v at positions after t."""
    g = torch.Generator().manual_seed(R)
    q, k, v = (scale * torch.randn(1, 1, T, 16, generator=g, dtype=torch.float64) for _ in range(3))
    buckets = torch.randint(4, (1, 1, R, T), generator=g)
    changed = [x.clone() for x in (q, k, v, buckets)]
    for x, new in zip(changed, (q, k, v, torch.randint(4, (1, 1, R, T), generator=g))):
        x[..., t:] = new[..., t:].flip(-1) if x.is_floating_point() else new[..., t:]  # other values after t
    if backend == "triton":
        q, k, v, changed[0], changed[1], changed[2] = (x.float() for x in (q, k, v, *changed[:3]))
    mode = dict(chunk=chunk, causal=causal, dup_correction=dup_correction, backend=backend)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    out = lsh_attention(q, k, v, buckets, **mode)
    moved = (lsh_attention(*changed, **mode) - out)[:, :, :t].abs().max().item()
    grads = torch.autograd.grad(out[:, :, t].sum(), (q, k, v))
    assert max(gr[:, :, :t + 1].abs().max() for gr in grads) > 0  # the probe reaches the past
    return moved, max(gr[:, :, t + 1:].abs().max().item() for gr in grads)


@pytest.mark.parametrize("backend", ["dense", "triton"])
@pytest.mark.parametrize("R,dup_correction", [(1, False), (2, True), (3, False), (4, True)])
@pytest.mark.parametrize("scale", [1.0, 100.0])
def test_causal_lsh_future_inputs_do_not_change_past_outputs(backend, R, dup_correction, scale):
    skip_large_keys_on_the_interpreter(backend, scale)
    moved, grad_from_future = later_inputs_effect(backend, R, scale, causal=True, dup_correction=dup_correction)
    assert grad_from_future == 0
    assert moved == 0  # not even rounding: every bucket starts a chunk, so sums run in one order


@pytest.mark.parametrize("backend", ["dense", "triton"])
def test_paper_lsh_lets_later_inputs_move_earlier_outputs(backend):
    # The default is the paper's algorithm: later positions shift the chunk boundaries of earlier ones, which
    # the causal test above must not see, so this shows that test can fail. The leak goes through the sort,
    # which has no gradient: a gradient probe alone cannot find it.
    moved, grad_from_future = later_inputs_effect(backend, R=2, scale=1.0, causal=False)
    assert moved > 0.1 and grad_from_future == 0


def test_bucket_is_argmax_over_rotations_and_their_negation():
    # With R = I the angular hash picks the coordinate of largest magnitude, shifted by n_buckets/2 if negative.
    # float64: the reference multiplies by another path than hash_buckets' einsum, and no argmax may rest on a
    # float32 near-tie (2^20 columns below).
    x = torch.randn(1, 1, 50, 4, dtype=torch.float64)
    buckets = hash_buckets(x, torch.eye(4, dtype=torch.float64)[None, None])  # (1, 1, 1, 50)
    i = x.abs().argmax(-1)
    expected = i + 4 * (x.gather(-1, i[..., None])[..., 0] < 0).long()
    assert torch.equal(buckets[:, :, 0], expected)
    rot = torch.randn(1, 3, 4, 5, dtype=torch.float64)  # three rounds of a 10-bucket hash: each its own rotation
    buckets = hash_buckets(x, rot)
    for r in range(3):
        xr = x[0, 0] @ rot[0, r]
        assert torch.equal(buckets[0, 0, r], torch.cat([xr, -xr], -1).argmax(-1))
    rot = torch.randn(1, 1, 4, 2**19, dtype=torch.float64)  # 2^20 buckets: in slices of 32 positions, 2 for 50
    xr = x[0, 0] @ rot[0, 0]
    assert torch.equal(hash_buckets(x, rot)[0, 0, 0], torch.cat([xr, -xr], -1).argmax(-1))


def test_factorised_hash_combines_one_angular_hash_per_factor():
    # trax's factorised hash: n1 = 4 and n2 = 6 buckets from 2 + 3 columns, bucket = b1 + 4 * b2 (float64: the
    # factors are hashed by einsums of other shapes, and no argmax may rest on a float32 near-tie)
    x, rot = torch.randn(2, 3, 40, 8, dtype=torch.float64), torch.randn(3, 2, 8, 5, dtype=torch.float64)
    buckets = hash_buckets(x, rot, (4, 6))
    first, second = hash_buckets(x, rot[..., :2]), hash_buckets(x, rot[..., 2:])
    assert torch.equal(buckets, first + 4 * second) and 0 <= buckets.min() and buckets.max() < 24
    million = reformer_config(block_size=2**20, chunk=64, n_buckets=0, factorize_hash=True)  # 2^15 buckets
    assert reformer.bucket_factors(million) == (128, 256)
    assert reformer.bucket_factors(reformer_config(n_buckets=12, factorize_hash=True)) == (2, 6)
    model = Reformer(reformer_config(n_buckets=16, factorize_hash=True)).train()  # 4 x 4 buckets
    assert model.blocks[0].attn.rotations(torch.device("cpu")).shape == (2, 2, 8, 4)
    model(torch.randint(11, (2, 32)), torch.randint(11, (2, 32)))[1].backward()


def test_hash_rotations_are_fresh_in_training_and_fixed_in_eval():
    attn = Reformer(reformer_config()).blocks[1].attn
    attn.train()
    assert not torch.equal(attn.rotations(torch.device("cpu")), attn.rotations(torch.device("cpu")))
    attn.eval()
    r1 = attn.rotations(torch.device("cpu"))
    assert r1.shape == (2, 2, 8, 2)  # (H, n_hashes, D, n_buckets / 2)
    assert torch.equal(r1, attn.rotations(torch.device("cpu")))


@pytest.mark.parametrize("n_head,attn_chunks", [(2, 1), (4, 2), (4, 4)])
def test_reversible_gradients_match_ordinary_backprop(n_head, attn_chunks, monkeypatch):
    # Training mode with dropout and fresh hashes: the reversible recompute must replay both exactly, also
    # when the attention goes group by group of heads; it replays the buckets its forward hashed (one hash per
    # LSH layer and group of heads, none again: a hash of the rebuilt input could move a near tie).
    calls, hash_buckets = [], reformer.hash_buckets
    monkeypatch.setattr(reformer, "hash_buckets", lambda *a: calls.append(1) or hash_buckets(*a))
    torch.manual_seed(0)
    cfg = reformer_config(dropout=0.1, ff_chunks=2, lsh_every=2, n_head=n_head,
                          attn_chunks=attn_chunks)
    model = Reformer(cfg).double().train()
    idx = torch.randint(11, (2, 32))
    steps = []
    for reversible in (True, False):
        model.config.reversible = reversible
        steps.append(training_step(model, idx, idx, seed=1))
        assert len(calls) == attn_chunks  # lsh_every=2: one LSH layer of the two
        calls.clear()
    torch.testing.assert_close(steps[0][1], steps[1][1], atol=1e-12, rtol=1e-12)  # the loss
    names = ["logits", "loss"] + [name for name, _ in model.named_parameters()]
    for name, a, b in zip(names, *steps, strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8, msg=name)


@pytest.mark.parametrize("attn_chunks", [1, 2])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-13)])
def test_reversible_block_rebuilds_its_inputs(dtype, tol, attn_chunks):
    torch.manual_seed(0)
    cfg = reformer_config(dropout=0.1, ff_chunks=3, attn_chunks=attn_chunks)
    block = ReversibleBlock(cfg, layer_idx=0)
    block = block.to(dtype).train()
    x1, x2 = torch.randn(2, 2, 32, 16, dtype=dtype)
    with torch.no_grad():
        y1, y2, saved = block.forward_saving(x1, x2)
    dy1, dy2 = torch.randn(2, *y1.shape, dtype=dtype)
    kept = [t.clone() for t in (y1, y2, dy1, dy2)]
    r1, r2, dx1, dx2 = block.backward_pass(y1, y2, dy1, dy2, saved, reuse_y=False, reuse_dy=False)
    assert (r1 - x1).abs().max() < tol and (r2 - x2).abs().max() < tol
    assert all(torch.equal(a, b) for a, b in zip(kept, (y1, y2, dy1, dy2)))  # the inputs are left as they were
    again = block.backward_pass(*kept, saved, reuse_y=True, reuse_dy=True)  # in the inputs' memory: the same
    assert all(torch.equal(a, b) for a, b in zip(again, (r1, r2, dx1, dx2), strict=True))


def test_a_second_backward_through_the_reversible_layers_says_why_it_cannot_run():
    model = Reformer(reformer_config())
    loss = model(torch.randint(11, (2, 32)), torch.randint(11, (2, 32)))[1]
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="runs once per forward"):
        loss.backward()


def test_grouped_attention_backward_under_autocast_frees_each_layers_activations():
    # Autocast keeps its 16-bit copy of a float32 leaf that requires grad (it takes it for a weight) until the
    # context ends, and the copy's graph keeps the leaf alive: the normalised input the head groups share must
    # not reach the projections as such a leaf, or every layer's would live through the whole backward.
    cfg = reformer_config(n_head=4, attn_chunks=2, ff_chunks=2)
    block = ReversibleBlock(cfg, layer_idx=0).train()
    x1, x2 = torch.randn(2, 2, 32, 16)
    with torch.no_grad():
        y1, y2, saved = block.forward_saving(x1, x2)
    inputs, f_parts = [], block.f_parts
    block.f_parts = lambda h: inputs.append(weakref.ref(h)) or f_parts(h)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        block.backward_pass(y1, y2, *torch.randn(2, 2, 32, 16), saved, reuse_y=False, reuse_dy=False)
        gc.collect()
        assert len(inputs) == 1 and inputs[0]() is None  # freed while the context is still open


def test_attention_by_groups_of_heads_and_feed_forward_by_chunks_match_all_at_once():
    block = ReversibleBlock(reformer_config(), layer_idx=0).eval()
    x = torch.randn(2, 32, 16)
    whole = block.g(x)
    block.ff_chunks = 3  # uneven slices: 11, 11, 10
    torch.testing.assert_close(block.g(x), whole, atol=1e-6, rtol=1e-6)
    torch.manual_seed(0)
    whole = Reformer(reformer_config(n_head=4)).double().eval()
    grouped = Reformer(reformer_config(n_head=4, attn_chunks=3)).double().eval()  # 2 groups of 2
    grouped.load_state_dict(whole.state_dict())
    idx = torch.randint(11, (2, 32))
    steps = [training_step(model, idx, idx, seed=0) for model in (whole, grouped)]
    for a, b in zip(*steps, strict=True):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)


def test_axial_position_embedding_concatenates_row_and_column_vectors():
    assert axial_shape(reformer_config(block_size=48)) == (6, 8)
    assert axial_shape(reformer_config(block_size=32, axial_shape=(2, 16))) == (2, 16)
    pos = Reformer(reformer_config(block_size=48)).wpe
    e = pos(40)
    assert e.shape == (40, 16)
    for i in (0, 7, 8, 39):
        torch.testing.assert_close(e[i], torch.cat([pos.rows[i // 8], pos.cols[i % 8]]))


def test_generate_predicts_each_token_from_exactly_its_prefix(monkeypatch):
    """No padding in the forward: every step runs the model on the prefix as it stands (lengths 5 to
    8, of chunks of 8), so generation computes what the prefix-only evaluation scores. (The lengths
    it refuses: BAD_INPUT.)"""
    torch.manual_seed(0)
    model = Reformer(reformer_config()).eval()
    assert model(torch.zeros(1, 12, dtype=torch.long))[0].shape == (1, 12, 11)  # no padded position
    lengths = []
    forward = model.forward
    monkeypatch.setattr(model, "forward", lambda idx, targets=None: lengths.append(idx.size(1)) or forward(idx))
    prefix = torch.randint(11, (2, 5))
    out = model.generate(prefix, 4, top_k=5)
    assert out.shape == (2, 9) and torch.equal(out[:, :5], prefix) and out.max() < 11
    assert lengths == [5, 6, 7, 8]


def test_reversible_layers_keep_activation_memory_constant_in_depth():
    """Bytes autograd saves for the backward (parameters excluded): the same for 1 to 8 reversible layers,
    growing linearly with depth for the same network run with ordinary autograd."""
    def saved(n_layer, reversible):
        torch.manual_seed(0)
        model = Reformer(reformer.Config(block_size=128, n_layer=n_layer, n_head=2, n_embd=16, chunk=16,
                                         reversible=reversible))
        return saved_bytes(model, torch.randint(0, 256, (2, 129)))

    reversible = [saved(L, True) for L in (1, 2, 8)]
    plain = [saved(L, False) for L in (1, 2, 8)]
    assert reversible[0] == reversible[1] == reversible[2]
    assert plain[2] - plain[1] == pytest.approx(6 * (plain[1] - plain[0]), rel=0.01) and plain[1] > reversible[1]


# ----------------------------------------------------------------------------------------------------------
# aft.py: AFT-full, -simple, -local and -conv against the paper's formula

def naive_aft(q, k, v, w):
    """The paper's causal formula with an explicit (B, T, T, C) tensor: w (T, T) or per feature (T, T, C).
    Each row subtracts its own largest visible K_t' + w_{t,t'} before the exp, so it holds at any scale."""
    T = k.size(1)
    if w.dim() == 2:
        w = w[:, :, None]
    logits = k[:, None, :, :] + w[None]  # (B, T, T', C): K_t' + w_{t,t'}
    causal = torch.ones(T, T, dtype=torch.bool).tril()[None, :, :, None]
    logits = logits.masked_fill(~causal, float("-inf"))
    weights = torch.exp(logits - logits.amax(dim=2, keepdim=True))
    num = (weights * v[:, None]).sum(dim=2)
    return torch.sigmoid(q) * num / weights.sum(dim=2)


def paper_bias(mixer, T):
    """w_{t,t'} for every pair, written from the paper's definitions, per feature (T, T, C)."""
    C = mixer.proj.in_features
    t, tp = torch.meshgrid(torch.arange(T), torch.arange(T), indexing="ij")
    lag = (t - tp).clamp_min(0)
    if mixer.variant == "simple":
        return torch.zeros(T, T, C, dtype=torch.float64)
    if mixer.variant == "conv":  # w^h = gain_h (w^h - mean) / std + bias_h, inside the window only
        kern = mixer.kernel
        kern = (kern - kern.mean(1, keepdim=True)) / (kern.std(1, keepdim=True, correction=0) + 1e-5)
        kern = mixer.kernel_gain[:, None] * kern + mixer.kernel_bias[:, None]  # (H, s)
        s = kern.size(1)
        inside = (lag < s)[:, :, None]
        per_head = torch.where(inside, kern[:, lag.clamp_max(s - 1)].permute(1, 2, 0), 0.0)  # (T, T, H)
        return per_head.repeat_interleave(C // kern.size(0), dim=2)
    if hasattr(mixer, "w_u"):
        w = mixer.w_u[:T] @ mixer.w_v[:T].T
    elif mixer.variant == "full":
        w = mixer.w[:T, :T]
    else:
        s = mixer.window
        w = mixer.w[t, lag.clamp_max(s - 1)]
    if mixer.variant == "local":
        w = torch.where(lag < mixer.window, w, 0.0)  # zero, not -inf, beyond the window
    return w[:, :, None].expand(T, T, C)


def random_mixer(variant, w_rank=0, block_size=8, n_embd=6, n_head=2, window=3):
    torch.manual_seed(0)
    mixer = AFTMixer(tiny_config(f"aft_{variant}", n_layer=1, block_size=block_size, n_head=n_head,
                                 n_embd=n_embd, window=window, w_rank=w_rank)).double()
    with torch.no_grad():
        for p in mixer.parameters():  # order-one values everywhere, gain and bias of the conv kernel too
            p.normal_(0.0, 0.7)
    return mixer


AFT_MIXERS = [("full", 0), ("full", 3), ("simple", 0), ("local", 0), ("local", 3), ("conv", 0)]


@pytest.mark.parametrize("variant,w_rank,key_scale,T,backend", [
    (variant, w_rank, key_scale, T, "dense") for variant, w_rank in AFT_MIXERS
    for key_scale, T in ((1, 7), (1, 12), (10, 12), (50, 12), (100, 12))] + [
    (variant, w_rank, 1, 12, "triton") for variant, w_rank in AFT_MIXERS if variant != "full"])
def test_mixer_matches_paper_formula_forward_and_gradients(variant, w_rank, key_scale, T, backend):
    """Forward and every gradient, to float64 rounding, on PyTorch ops and on the kernels; T = 7 <
    block_size slices w. Keys x100 spread over ~1000 within a sequence, beyond even float64's exp:
    rows stabilised, the formula."""
    mixer = random_mixer(variant, w_rank, block_size=12, n_embd=8, n_head=2)
    if backend == "triton":
        mixer.backend = "triton"
    with torch.no_grad():
        mixer.qkv.weight[8:16] *= key_scale
    x = torch.randn(2, T, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    x.requires_grad_()
    y = mixer(x)
    q, k, v = mixer.qkv(x).split(8, dim=2)
    assert key_scale < 100 or (k.amax(dim=1) - k.amin(dim=1)).max() > 710  # exp(710) overflows float64
    y_ref = mixer.proj(naive_aft(q, k, v, paper_bias(mixer, T)))
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-12)
    g = torch.randn_like(y)
    inputs = [x] + list(mixer.parameters())
    grads = torch.autograd.grad(y, inputs, g)
    grads_ref = torch.autograd.grad(y_ref, inputs, g)
    for name, a, b in zip(["x"] + [n for n, _ in mixer.named_parameters()], grads, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11, msg=f"gradient of {name}")
        if key_scale == 1 and name.startswith(("w", "kernel")):  # the position bias takes part
            assert a.abs().sum() > 0, name


@pytest.mark.parametrize("variant", ["full", "local", "conv"])
def test_float32_matches_float64_with_biases_spread_over_20(variant):
    """The documented range: position biases spread by up to ~27 (here 0 .. 20, keys x10) lose nothing in float32."""
    mixer = random_mixer(variant, block_size=64, n_embd=8, n_head=2, window=8)
    with torch.no_grad():
        mixer.qkv.weight[8:16] *= 10
        biases = mixer.kernel if variant == "conv" else mixer.w
        biases.uniform_(0.0, 20.0, generator=torch.Generator().manual_seed(7))
        if variant == "conv":  # the kernel is normalised per head: its gain sets the spread
            mixer.kernel_gain.fill_(8.0)
    bias = mixer.position_bias(64)
    assert 15 < bias.max() - bias.min() < 21
    x = torch.randn(2, 64, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    q, k, v = mixer.qkv(x).split(8, dim=2)
    expected = naive_aft(q, k, v, paper_bias(mixer, 64))
    mixing = {"full": aft_full, "local": aft_local, "conv": aft.aft_conv}[variant]
    got = mixing(q.float(), k.float(), v.float(), bias.float())
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("variant,w_rank", [("simple", 0)] + [("local", r) for r in (0, 2, 3)])
@pytest.mark.parametrize("key_scale", [1, 10, 50, 100])
def test_recurrent_form_equals_parallel_forward_at_large_keys(variant, w_rank, key_scale):
    """The parallel path and the recurrent form that generation uses agree to float64 rounding: a
    mixer's step() token by token, and the whole model fed 5 tokens, then one a call, through its
    cache."""
    mixer = random_mixer(variant, w_rank, block_size=16, n_embd=8, n_head=2, window=3)
    with torch.no_grad():
        mixer.qkv.weight[8:16] *= key_scale
    x = torch.randn(2, 16, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    cache = {}
    stepped = torch.stack([mixer.step(x[:, t], cache) for t in range(16)], dim=1)
    torch.testing.assert_close(mixer(x), stepped, rtol=1e-12, atol=1e-12)
    model = tiny_model(variant, w_rank)
    idx = torch.randint(0, 11, (2, 12))
    cache = [{} for _ in model.blocks]
    chunks = [model(idx[:, :5], cache=cache)[0]]
    chunks += [model(idx[:, t : t + 1], cache=cache)[0] for t in range(5, 12)]
    torch.testing.assert_close(torch.cat(chunks, dim=1), model(idx)[0], rtol=1e-10, atol=1e-12)


def test_local_equals_full_with_a_window_covering_the_sequence_and_simple_with_zero_bias():
    q, k, v = qkv()
    T, s = 9, 11
    w = torch.randn(T, T, dtype=torch.float64, requires_grad=True)
    band = torch.stack([w[t, (t - torch.arange(s)).clamp_min(0)] for t in range(T)])  # (T, s) [t, j] = w[t, t-j]
    assert_same_output_and_grads(aft_local(q, k, v, band), aft_full(q, k, v, w), [q, k, v, w],
                                 dict(rtol=1e-10, atol=1e-12))
    y_local = aft_local(q, k, v, torch.zeros(9, 3, dtype=torch.float64))
    torch.testing.assert_close(y_local, aft_simple(q, k, v), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(y_local, naive_aft(q, k, v, torch.zeros(9, 9, dtype=torch.float64)))


def tiny_model(variant, w_rank=0, block_size=12):
    torch.manual_seed(0)
    model = tiny(f"aft_{variant}", True, block_size=block_size, w_rank=w_rank).double().eval()
    with torch.no_grad():  # large weights and position biases so that every term moves the logits
        for name, p in model.named_parameters():
            if p.dim() >= 2 or name.split(".")[-1] in ("kernel_gain", "kernel_bias"):
                p.normal_(0.0, 0.7)
    return model


def bias_param(mixer):
    return mixer.kernel_bias if mixer.variant == "conv" else mixer.w


@pytest.mark.parametrize("variant,backend", [("full", "dense"), ("simple", "dense"), ("local", "dense"),
                                             ("conv", "dense"), ("simple", "triton"), ("local", "triton"),
                                             ("conv", "triton")])
@pytest.mark.parametrize("keys", ["+80", "-80", "spread"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_large_keys_and_biases_stay_finite_and_match_float64(variant, backend, keys, dtype):
    """Under autocast, keys and position biases that overflow exp(K + w) even in float32 without the
    maxima: |K| ~ 80 and |w| ~ 60, where the mixing (in float32) also holds to the float64 formula on
    the same 16-bit q, k, v; or keys spread over 160+ in one sequence and biases x60. The Triton
    kernels read the 16-bit k and v themselves, the PyTorch path their float32 copies."""
    mixer = random_mixer(variant, n_embd=8, n_head=2, window=3).float()
    mixer.backend = backend if variant != "full" else None
    with torch.no_grad():
        if keys == "spread":
            mixer.qkv.weight[8:16] *= 400.0  # keys far apart along time, x of order one
        else:
            mixer.qkv.bias[8:16] = float(keys)
        if variant != "simple":
            bias = bias_param(mixer)
            bias.copy_(60.0 * bias if keys == "spread" else bias + 0.75 * float(keys))
    mixed = []
    mixer.proj.register_forward_pre_hook(lambda module, args: mixed.append(args[0]))
    x = torch.randn(2, 8, 8).requires_grad_()
    with torch.autocast("cpu", dtype=dtype):
        y = mixer(x)
        q, k, v = mixer.qkv(x).split(8, dim=2)
    assert q.dtype == dtype and (k.max() - k.min() > 160 if keys == "spread" else k.abs().min() > 70)
    y.float().square().sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in mixer.parameters())
    if keys != "spread":  # the float32 mixing, held to the float64 formula on the same q, k, v
        expected = naive_aft(q.double(), k.double(), v.double(), paper_bias(mixer.double(), 8))
        torch.testing.assert_close(mixed[0].double(), expected, rtol=1e-4, atol=1e-5)


# The Triton kernels of AFT-simple, -local and -conv (kernels.aft_sums), run by Triton's interpreter here

AFT_KERNEL_CASES = {"simple": (1, 0), "local": (1, 5), "local-window-past-a-chunk": (1, 70), "conv-2-groups": (2, 5)}


def aft_kernel_inputs(case, T, C=8, key_scale=1.0, dtype=torch.float64, seed=0):
    """q, k, v (2, T, C) and the band (G, T, s) of a case, or None for AFT-simple; keys times key_scale."""
    G, s = AFT_KERNEL_CASES[case]
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, T, C, generator=g, dtype=dtype) for _ in range(3))
    band = 3 * torch.randn(G, T, s, generator=g, dtype=dtype) if s else None
    return q, k * key_scale, v, band


def band_pairs(band, T, C):
    """w_{t,t'} per feature (T, T, C) of a band (G, T, s): band[g, t, t - t'] for 0 <= t - t' < s, else 0."""
    if band is None:
        return torch.zeros(T, T, C, dtype=torch.float64)
    G, _, s = band.shape
    lag = torch.arange(T)[:, None] - torch.arange(T)[None, :]
    inside = ((lag >= 0) & (lag < s))[None]
    pairs = torch.where(inside, band[:, torch.arange(T)[:, None], lag.clamp(0, s - 1)], 0.0)  # (G, T, T)
    return pairs.movedim(0, -1).repeat_interleave(C // G, dim=-1)


def aft_mixing(q, k, v, band, backend):
    return aft.aft_simple(q, k, v, backend) if band is None else aft.aft_banded(q, k, v, band, backend)


@pytest.mark.parametrize("case,key_scale", [(case, 1) for case in AFT_KERNEL_CASES] +
                         [pytest.param("local-window-past-a-chunk", 100, marks=slow)])  # the hardest case
def test_aft_kernel_matches_paper_formula_forward_and_gradients(case, key_scale):
    # T = 150: chunks of 64, the last one cut; a window of 70 reaches across a whole chunk. Keys x100 spread
    # beyond float64's exp: the running maxima must carry across chunks and windows.
    q, k, v, band = aft_kernel_inputs(case, 150, key_scale=key_scale)
    inputs = [x.requires_grad_() for x in (q, k, v, band) if x is not None]
    expected = naive_aft(q, k, v, band_pairs(band, 150, 8))
    assert_same_output_and_grads(aft_mixing(q, k, v, band, "triton"), expected, inputs,
                                 dict(rtol=1e-10, atol=1e-12), dict(rtol=1e-9, atol=1e-11))


@pytest.mark.parametrize("case", ["simple", "local", "conv-2-groups"])
def test_aft_kernel_is_exactly_causal_across_chunks(case):
    """float32, keys x30, one sequence of three chunks of 64 (the last cut): a change at j moves no output before
    j by a bit, inside the first chunk and on both sides of each chunk boundary."""
    q, k, v, band = (x if x is None else x.float() for x in aft_kernel_inputs(case, 130, key_scale=30.0))
    k, v = k[:1], v[:1]  # (1, T, C): the batch adds programs, not paths
    out = kernels.aft_sums(k, v, band)
    for j in (1, 63, 64, 65, 127, 128):
        k2, v2 = k.clone(), v.clone()
        k2[:, j] += 50.0  # the new key dominates every later sum
        v2[:, j] -= 3.0
        moved = kernels.aft_sums(k2, v2, band)
        assert torch.equal(moved[:, :j], out[:, :j]), f"position {j} moved earlier outputs"
        assert not torch.equal(moved[:, j], out[:, j])


# ----------------------------------------------------------------------------------------------------------
# perceiver_ar.py: cross-attention, context dropout, latents, cached generation

def make_model(dtype=torch.float64, seed=0, **overrides):
    """A tiny model with a random (not zero) output layer, so that every logit depends on the inputs."""
    torch.manual_seed(seed)
    model = tiny("perceiver_ar", section=True, **overrides).to(dtype)
    torch.nn.init.normal_(model.lm_head.weight, std=0.5)
    return model.eval()


def reference_logits(model, idx, N, keep=None):
    """Perceiver AR written out densely from the model's weights: explicit position masks, rotary as complex
    multiplication. With N = T every position is a latent and this is a plain dense causal Transformer.
    keep (B, T) bool, optional: inputs the cross-attention may use (context dropout)."""
    B, T = idx.shape
    C, H = model.config.n_embd, model.config.n_head
    D = C // H
    n_pairs = int(D * model.config.rotary_frac) // 2
    freqs = 10000.0 ** (-torch.arange(n_pairs, dtype=torch.float64) / n_pairs)

    def rotate(x, pos):  # x (B, H, S, D); pairs (i, i + n_pairs) are complex numbers turned by pos * freqs
        c = torch.complex(x[..., :n_pairs], x[..., n_pairs : 2 * n_pairs])
        c = c * torch.polar(torch.ones(len(pos), n_pairs, dtype=torch.float64), pos[:, None].double() * freqs)
        return torch.cat([c.real, c.imag, x[..., 2 * n_pairs :]], dim=-1).to(x.dtype)

    def attend(attn, xq, q_pos, xkv, kv_pos, allowed):
        q = F.linear(xq, attn.q.weight, attn.q.bias).view(B, -1, H, D).transpose(1, 2)
        k, v = F.linear(xkv, attn.kv.weight, attn.kv.bias).split(C, dim=2)
        k, v = (t.view(B, -1, H, D).transpose(1, 2) for t in (k, v))
        scores = rotate(q, q_pos) @ rotate(k, kv_pos).transpose(-1, -2) / math.sqrt(D)
        scores = scores.masked_fill(~allowed[:, None], float("-inf"))
        y = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, -1, C)
        return F.linear(y, attn.proj.weight, attn.proj.bias)

    def ln(mod, x):
        return F.layer_norm(x, (C,), mod.weight, mod.bias)

    def mlp(mod, x):
        return F.linear(F.relu(F.linear(x, mod.fc.weight, mod.fc.bias)) ** 2, mod.proj.weight, mod.proj.bias)

    pos = torch.arange(T)
    lat = pos[T - N :]
    x = model.wte.weight[idx]
    keep = torch.ones(B, T, dtype=torch.bool) if keep is None else keep
    allowed = (pos[None, :] <= lat[:, None])[None] & keep[:, None, :]  # (B, N, T): own position included
    z = F.linear(x[:, T - N :], model.z_linear.weight, model.z_linear.bias)
    z = z + attend(model.cross.attn, ln(model.cross.ln_q, z), lat, ln(model.cross.ln_kv, x), pos, allowed)
    z = z + mlp(model.cross.mlp, ln(model.cross.ln_2, z))
    causal = (lat[None, :] <= lat[:, None])[None].expand(B, -1, -1)
    for block in model.blocks:
        h = ln(block.ln_1, z)
        z = z + attend(block.attn, h, lat, h, lat, causal)
        z = z + mlp(block.mlp, ln(block.ln_2, z))
    return F.linear(ln(model.ln_f, z), model.lm_head.weight)


def assert_grads_match(model, out, ref):
    w = torch.randn_like(out)
    grads = torch.autograd.grad((out * w).sum(), list(model.parameters()), allow_unused=True)
    ref_grads = torch.autograd.grad((ref * w).sum(), list(model.parameters()), allow_unused=True)
    for (name, _), g, r in zip(model.named_parameters(), grads, ref_grads):
        assert (g is None) == (r is None), name
        if g is not None:
            torch.testing.assert_close(g, r, rtol=1e-8, atol=1e-9 * (1 + r.abs().max().item()), msg=name)


@pytest.mark.parametrize("T,N", [(16, 6), (11, 6), (16, 1), (9, 9), (16, 16)])
def test_cross_attention_matches_bottom_right_causal_reference(T, N):
    """Latent k (position T-N+k) sees inputs 0..T-N+k, for short inputs and any n_latents set at
    eval. With every position a latent (N = T = block_size), the model is a plain dense causal
    Transformer."""
    model = make_model()
    model.n_latents = N
    idx = torch.randint(0, 11, (2, T))
    logits, _ = model(idx)
    ref = reference_logits(model, idx, N)
    assert logits.shape == (2, N, 11)
    torch.testing.assert_close(logits, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(model(idx, n_latents=N)[0], logits, rtol=0, atol=0)
    assert_grads_match(model, logits, ref)


def test_loss_is_cross_entropy_on_latent_positions_plus_training_z_loss():
    model = make_model(z_loss=1e-2)
    idx, targets = torch.randint(0, 11, (2, 16)), torch.randint(0, 11, (2, 16))
    logits, loss = model(idx, targets)
    expected = F.cross_entropy(logits.reshape(-1, 11), targets[:, -6:].reshape(-1))
    torch.testing.assert_close(loss, expected.float())
    model.train()
    _, train_loss = model(idx, targets)
    z = torch.logsumexp(logits.reshape(-1, 11), dim=-1).square().mean()
    torch.testing.assert_close(train_loss, (expected + 1e-2 * z).float())


def test_context_dropout_is_off_in_eval_hides_all_context_at_1_and_a_fraction_causally_below():
    model, plain = make_model(context_dropout=1.0), make_model(context_dropout=0.0)
    idx = torch.randint(0, 11, (2, 16))
    changed = idx.clone()
    changed[:, :10] = torch.randint(0, 11, (2, 10))
    out = model(idx)[0]
    torch.testing.assert_close(model(idx)[0], out, rtol=0, atol=0)
    torch.testing.assert_close(plain(idx)[0], out, rtol=0, atol=0)
    assert (model(changed)[0] - out).abs().amax() > 1e-6
    model.train()
    torch.testing.assert_close(model(changed)[0], model(idx)[0], rtol=0, atol=0)
    model = make_model(context_dropout=0.5).train()  # half the context removed, causally
    T, N = 16, 6
    idx = torch.randint(0, 11, (3, T))
    seen = {}
    model.cross.attn.register_forward_hook(lambda mod, args, out: seen.update(kv_pos=args[3]))
    torch.manual_seed(1)
    logits, _ = model(idx)
    kv_pos = seen["kv_pos"]
    assert kv_pos.shape == (3, (T - N) - 5 + N)  # 5 of the 10 context inputs removed, latents all kept
    assert (kv_pos[:, -N:] == torch.arange(T - N, T)).all()
    keep = torch.zeros(3, T, dtype=torch.bool).scatter_(1, kv_pos, True)
    assert not (keep[0] == keep[1]).all() or not (keep[1] == keep[2]).all()  # drawn per sequence
    torch.testing.assert_close(logits, reference_logits(model, idx, N, keep), rtol=1e-10, atol=1e-12)
    changed = idx.clone()
    changed[:, 12] = (changed[:, 12] + 1) % 11
    torch.manual_seed(1)
    torch.testing.assert_close(model(changed)[0][:, :2], logits[:, :2], rtol=0, atol=0)


@pytest.mark.parametrize("prompt_len", [3, 20])
def test_generation_reads_at_most_block_size_inputs_and_the_cache_encodes_only_at_resets(
        prompt_len, monkeypatch):
    """(CACHED_GENERATION holds the cached tokens and logits to the uncached ones.)"""
    model = make_model()
    prompt = torch.randint(0, 11, (2, prompt_len))
    widths, encodes, encode = [], [], model.encode
    model.register_forward_pre_hook(lambda mod, args: widths.append(args[0].size(1)))
    out = model.generate(prompt, 30, use_cache=False)
    monkeypatch.setattr(model, "encode", lambda *a: encodes.append(1) or encode(*a))
    model.generate(prompt, 30, use_cache=True)
    assert out.shape == (2, prompt_len + 30) and torch.equal(out[:, :prompt_len], prompt)
    assert max(widths) <= 16  # never more than block_size inputs
    assert len(encodes) <= 10  # the full model ran only at resets (every N/2 = 3 tokens or so), not 30 times


@slow
def test_copy_task_is_learned_across_512_tokens():
    """Second half of each sequence repeats the first; the latents cover the second half, so every
    prediction is a copy from M/2 + 1 = 513 positions back. Threshold 0.1 * ln(V): a model that copies only a
    fraction f of positions and guesses the rest scores at least (1 - f) ln V, so this needs f > 0.9.
    Training stops once a held-out batch is below half the threshold; a third, fresh batch is then judged.
    Measured, seeds 0-2 x 1 and 2 threads: stops at step 70 for every seed and thread count, fresh loss
    0.019 / 0.046 / 0.087 against the threshold 0.277."""
    torch.manual_seed(0)
    M, V, B = 1024, 16, 8

    def copy_batch(generator=None):
        half = torch.randint(0, V, (B, M // 2 + 1), generator=generator)
        return torch.cat([half, half[:, :-1]], dim=1)  # (B, M + 1): token t + M/2 + 1 copies token t

    def loss_on(seq):
        model.eval()
        with torch.no_grad():
            loss = model(seq[:, :-1], seq[:, 1:])[1].item()
        model.train()
        return loss

    model = PerceiverAR(perceiver_ar.Config(block_size=M, vocab_size=V, n_layer=1, n_head=4, n_embd=128,
                                            n_latents=M // 2))
    opt = train.configure_optimizers(model, 0.0, 2e-3, (0.9, 0.99), "cpu")
    held_out = copy_batch(torch.Generator().manual_seed(1000))
    for step in range(300):
        seq = copy_batch()
        _, loss = model(seq[:, :-1], seq[:, 1:])
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 10 == 9 and loss_on(held_out) < 0.05 * math.log(V):
            break
    fresh = loss_on(copy_batch(torch.Generator().manual_seed(2000)))
    print(f"copy task: fresh loss {fresh:.3f} nats after {step + 1} steps")
    assert fresh < 0.1 * math.log(V)


# ----------------------------------------------------------------------------------------------------------
# causality: every model, every attention mode and kernel, both backends, at normal scale and with extreme keys

@pytest.mark.parametrize("name", list(bench.pictures()))
def test_pictures_show_nothing_in_the_future_except_for_the_paper_lsh(name):
    """The README's pictures are the causality probe seen as an image: no panel of a causal model has anything
    above its diagonal; the whole-network panel of the paper's LSH has (its sort moves with later tokens)."""
    maps = bench.dependence_maps(bench.picture_model(name).eval(), torch.randint(256, (1, 64)))
    assert len(maps) >= 3  # a panel per layer (Perceiver AR: and its cross-attention), then the whole network
    for m in maps:
        T_out, T_in = m.shape
        future = torch.arange(T_in)[None, :] > T_in - T_out + torch.arange(T_out)[:, None]
        assert (m[future] == 0).all() or (name == "reformer" and m is maps[-1]), name
        assert (m[~future] > 0).any()
    if name == "reformer":
        assert (maps[-1].triu(1) > 0).any()


@pytest.mark.parametrize("name", ["sparse_strided", "sparse_fixed"])
def test_strided_and_fixed_pictures_are_their_pattern_definitions(name):
    model = bench.picture_model(name).eval()
    maps = bench.dependence_maps(model, torch.randint(256, (1, 64)))
    pos = torch.arange(64)
    for layer in (0, 1):  # interleaved: the two parts of the pattern, one per layer
        keys = element_mask(model.config, layer, pos, pos).any(0)  # (T, T) over the heads
        own_query = torch.eye(64, dtype=torch.bool) & keys.any(1, keepdim=True)  # through q_t, if t sees a key
        assert torch.equal(maps[layer] > 0, keys | own_query), layer


def test_a_picture_draws_each_cell_of_each_panel_where_its_map_has_it(tmp_path):
    """bench.draw_attention of the strided pattern at stride 4 writes one png: layer 1's panel, a 4x4 pixel
    block a cell, is the strided pattern's first part at l = 4, and the future is pale red."""
    model = bench.picture_model("sparse_strided", stride=4).eval()
    bench.draw_attention(model, 64, str(tmp_path / "strided.png"), seed=0)
    w, h, pixels = read_png(tmp_path / "strided.png")
    assert (w, h) == (3 * 64 * 4 + 2 * 8, 64 * 4)  # two layers and the whole network, 4x, 8-pixel gaps
    assert (pixels[0, -1] == [255, 225, 225]).all()  # top right of the last panel: the future, empty
    layer_1 = pixel_kinds(pixels[::4, :64 * 4:4])  # a pixel a cell
    pos = torch.arange(64)
    keys = element_mask(model.config, 0, pos, pos).any(0)  # (T, T) over the heads
    assert model.config.stride == 4
    assert np.array_equal(layer_1 == 1, (keys | torch.eye(64, dtype=torch.bool)).numpy())


def test_a_model_written_from_the_readme_trains_samples_scores_and_is_drawn(text_file, tmp_path, capsys):
    """conv_lm, registered as the README says: train.py trains it with a flag of its own, sample.py continues a
    prompt, scores the split and draws the checkpoint, and bench.py's pictures draw it fresh (at kernel_size 2,
    two layers reach exactly the positions t-2..t)."""
    out = str(tmp_path / "run")
    train.main(["--model", "conv_lm", "--kernel_size", "2", "--data", f"text:{text_file}", "--max_iters", "2",
                "--out_dir", out] + TINY)
    sample.main(["--out_dir", out, "--prompt", "Hello", "--num_samples", "2", "--max_new_tokens", "5",
                 "--device", "cpu"])
    assert capsys.readouterr().out.count("\nHello") == 2
    assert 3 < sample.main(["--evaluate", "val", "--out_dir", out, "--device", "cpu"]) < 9
    sample.main(["--show_attention", "--out_dir", out, "--device", "cpu"])  # the checkpoint, over its 32 tokens
    assert read_png(os.path.join(out, "attention.png"))[:2] == (3 * 32 * 4 + 2 * 8, 32 * 4)
    assert "conv_lm" in bench.pictures()
    bench.draw_attention(bench.picture_model("conv_lm", kernel_size=2).eval(), 64, str(tmp_path / "conv.png"), 0)
    whole = pixel_kinds(read_png(tmp_path / "conv.png")[2][::4, -64 * 4::4])  # a pixel a cell
    t, j = np.indices((64, 64))
    assert np.array_equal(whole == 1, (0 <= t - j) & (t - j <= 2))


CAUSAL_CASES = {  # name: (model, Config settings beyond the shared tiny ones, exactly causal?)
    "transformer": ("transformer", {}, True),
    "sparse_local": ("transformer", dict(pattern="local", stride=8, tile=16), True),
    **{f"sparse_strided_{c}": ("sparse_strided", dict(stride=4, tile=16, combine=c), True)
       for c in st.COMBINES},
    **{f"sparse_fixed_{c}": ("sparse_fixed", dict(stride=32, summary=16, n_offsets=2, tile=16, combine=c),
                             True) for c in st.COMBINES},
    # causal LSH in 4 buckets of about 16 positions: a query's window of chunk = 8 keys ends inside its bucket
    "reformer_causal_lsh": ("reformer", dict(chunk=8, n_hashes=2, n_buckets=4, causal_lsh=True), True),
    "reformer_causal_lsh_dup_correction": ("reformer", dict(chunk=8, n_hashes=2, n_buckets=4, causal_lsh=True,
                                                   dup_correction=True), True),
    "reformer_local_chunks": ("reformer", dict(chunk=8, lsh_every=3), True),
    "reformer_paper_lsh": ("reformer", dict(chunk=8, n_hashes=2), False),
    "aft_full": ("aft_full", {}, True), "aft_full_factorised": ("aft_full", dict(w_rank=4), True),
    "aft_simple": ("aft_simple", {}, True), "aft_local": ("aft_local", dict(window=8), True),
    "aft_local_factorised": ("aft_local", dict(window=8, w_rank=4), True),
    "aft_conv": ("aft_conv", dict(window=8), True),
    "perceiver_ar": ("perceiver_ar", dict(n_latents=64), True),
    "conv_lm": ("conv_lm", dict(kernel_size=3), True),  # the model added by the README
}
KEY_WEIGHTS = ("qkv.weight", "qk.weight", ".q.weight", ".kv.weight")  # query/key projections of every model
POSITION_BIASES = (".w", ".w_u", ".w_v", ".kernel", ".kernel_gain", ".kernel_bias")  # AFT's: 0 or 0.02 at the start


@pytest.mark.parametrize("scale", [1.0, 100.0], ids=["normal", "keys_x100"])
@pytest.mark.parametrize("backend", ["dense", "triton"])
@pytest.mark.parametrize("case", CAUSAL_CASES)
def test_later_positions_never_reach_earlier_outputs(case, backend, scale, monkeypatch):
    """Two probes through the real model, sequence b cut after position t_b: d logits_t / d embedding_j is
    exactly 0 for every j > t, and not for all j <= t (the continuous paths), and new tokens at positions > t
    leave logits_0..t exactly as they were and move later ones (the discrete paths, such as where positions
    sort). The Reformer's paper LSH is the one exception and must leak, through its sort (the gradient cannot
    see that), so the probe bites. Backend triton: every model's attention or AFT kernel, in the interpreter."""
    name, settings, exactly_causal = CAUSAL_CASES[case]
    if backend == "triton":
        if name == "aft_full":
            pytest.skip("AFT-full runs no kernel: kernels.aft_sums computes AFT-simple, -local and -conv")
        skip_large_keys_on_the_interpreter(backend, scale)
        if scale > 1 and name in ("reformer", "aft_simple", "aft_local", "aft_conv"):
            pytest.skip("the LSH and AFT kernels are probed with large keys on their own (a minute and a half less): "
                        "test_causal_lsh_future_inputs_do_not_change_past_outputs, "
                        "test_aft_kernel_is_exactly_causal_across_chunks")
        for module, fn in ((st, "attention"), (perceiver_ar, "attention"), (reformer, "lsh_attention")):
            monkeypatch.setattr(module, fn, functools.partial(getattr(kernels, fn), backend="triton"))
    torch.manual_seed(0)
    n_layer = 1 if backend == "triton" else 2  # the interpreter is slow; two layers run on the dense path
    block_size = 128 if name == "perceiver_ar" else 64
    model = tiny(name, block_size=block_size, n_layer=n_layer, **settings).eval()
    assert getattr(model, "exactly_causal", True) == exactly_causal
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(KEY_WEIGHTS):
                p.mul_(scale)
            if n.endswith(POSITION_BIASES):  # of order one, so that they move every logit
                p.normal_(0.0, 0.7)
    for mixer in [m for m in model.modules() if isinstance(m, AFTMixer)]:
        mixer.backend = backend
    embedded = []  # the token embeddings of each forward; the first one's gradient is read

    def keep(module, inputs, out):
        if out.requires_grad:
            out.retain_grad()
        embedded.append(out)
    token_embedding(model).register_forward_hook(keep)
    T = model.config.block_size
    idx = torch.randint(11, (2, T))
    logits = model(idx)[0]  # (2, k, V): the last k positions
    first = T - logits.size(1)
    cuts = (first + 5, T - 20)  # sequence b is cut after position cuts[b] (sequences never mix)
    torch.stack([logits[b, t - first] for b, t in enumerate(cuts)]).sum().backward()
    changed = idx.clone()
    for b, t in enumerate(cuts):
        changed[b, t + 1:] = (idx[b, t + 1:] + torch.randint(1, 11, (T - t - 1,))) % 11
    with torch.no_grad():
        moved = (model(changed)[0] - logits).abs()  # (2, k, V)
    grad = embedded[0].grad  # (2, T, C)
    assert torch.isfinite(grad).all()
    past = []
    for b, t in enumerate(cuts):
        assert grad[b, t + 1:].abs().max() == 0 and grad[b, :t + 1].abs().max() > 0, t
        assert moved[b, t + 1 - first:].max() > 0, t  # the new tokens are seen
        past.append(moved[b, :t + 1 - first].max().item())
    if exactly_causal:
        assert max(past) == 0, past
    else:
        assert max(past) > 1e-3, past


# ----------------------------------------------------------------------------------------------------------
# sampling modes (sample.py), and bench.py


def test_png_writer_output_parses_back_and_wav_writer_output_opens_with_the_wave_module(tmp_path):
    img = np.random.default_rng(0).integers(0, 256, (7, 5, 3), dtype=np.uint8)
    sample.write_png(str(tmp_path / "x.png"), img)
    w, h, pixels = read_png(tmp_path / "x.png")
    assert (w, h) == (5, 7) and np.array_equal(pixels, img)
    tokens = np.random.default_rng(0).integers(0, 256, 1234).astype(np.uint8)
    sample.write_wav(str(tmp_path / "x.wav"), tokens, 12_000)
    with wave.open(str(tmp_path / "x.wav")) as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate(), w.getnframes()) == (1, 2, 12_000, 1234)
        pcm = np.frombuffer(w.readframes(1234), "<i2") / 32767
    np.testing.assert_allclose(pcm, data.mu_law_decode(tokens), atol=1e-4)


def test_image_sampling_writes_a_grid_of_prompt_completions_and_truth(tmp_path):
    imgs = np.random.default_rng(0).integers(0, 256, (40, 32, 32, 3), dtype=np.uint8)
    np.save(tmp_path / "imgs.npy", imgs)
    out = str(tmp_path / "run")
    train.main(["--data", f"images:{tmp_path / 'imgs.npy'}", "--max_iters", "1", "--eval_interval", "1",
                "--out_dir", out] + TINY)
    sample.main(["--out_dir", out, "--num_samples", "2", "--completions", "2", "--device", "cpu"])
    w, h, pixels = read_png(os.path.join(out, "samples.png"))
    tile = 32 * 4 + 2  # 4x upscaled tiles with 2-pixel gaps
    assert (w, h) == (2 + 4 * tile, 2 + 3 * tile)  # 2 image rows + 1 unconditional row; 1 + 2 + 1 columns
    test = imgs[-2:]  # images:PATH holds out the last 5% as test: 2 of 40
    truth_tile = pixels[2:2 + 128:4, 2 + 3 * tile:2 + 3 * tile + 128:4]
    assert np.array_equal(truth_tile, test[0])  # the ground-truth column shows the real image
    prompt_tile = pixels[2:2 + 128:4, 2:2 + 128:4]
    assert np.array_equal(prompt_tile[:16], test[0][:16]) and (prompt_tile[16:] == 128).all()


def sampling_sparse(pattern, combine):
    """A Sparse Transformer of 32 tokens whose output layer is randomized (it starts at zero)."""
    return randomized(tiny("transformer", True, pattern=pattern, combine=combine, block_size=32))


# case: (the model, prompt (rows, length), tokens generated, top_k): greedy for every registered
# model (32 tokens); sampled from the top 8 for each Sparse Transformer pattern's cache, from the
# top 6 for AFT's recurrent variants (weights of order one, 24 tokens), from the top 7 for Perceiver
# AR's (16 tokens, 6 latents) after a short prompt and one longer than block_size. Each goes past
# block_size.
CACHED_GENERATION = {
    **{name: (functools.partial(tiny, name, block_size=32), (2, 5), 40, 1)
       for name in train.MODELS},
    **{f"sparse_{p}_{c}_top8": (functools.partial(sampling_sparse, p, c), (2, 5), 40, 8)
       for p, c in (("all", "interleaved"), ("local", "interleaved"), ("strided", "multihead"),
                    ("strided", "merged"), ("fixed", "merged"))},
    **{f"aft_{v}_rank{r}_top6": (functools.partial(tiny_model, v, r, block_size=24), (4, 3), 30, 6)
       for v, r in (("simple", 0), ("local", 0), ("local", 2))},
    **{f"perceiver_ar_prompt{n}_top7": (make_model, (2, n), 30, 7) for n in (3, 20)},
}


@pytest.mark.parametrize("case", CACHED_GENERATION)
def test_generation_gives_the_same_tokens_with_and_without_the_cache(case, monkeypatch):
    """Decoding past block_size (where caches restart or slide) must not depend on use_cache: the
    same tokens, drawn from the same logits. In float64: the two paths round differently, and no
    sampled token may rest on a float32 tie."""
    build, (rows, length), new_tokens, top_k = CACHED_GENERATION[case]
    torch.manual_seed(0)
    model = build().double().eval()
    prompt = torch.randint(11, (rows, length))
    drawn_from, sample_next = [], st.sample_next

    def recording(logits, *args):
        drawn_from.append(logits.clone())
        return sample_next(logits, *args)
    for module in (st, reformer, aft, perceiver_ar):  # each model's generate calls its module's
        monkeypatch.setattr(module, "sample_next", recording)
    cached, uncached = (model.generate(prompt, new_tokens, top_k=top_k, use_cache=use_cache,
                                       generator=torch.Generator().manual_seed(7))
                        for use_cache in (True, False))
    assert cached.shape == (rows, length + new_tokens) and torch.equal(cached, uncached)
    assert len(drawn_from) == 2 * new_tokens  # every sampled token's logits, cached then uncached
    for a, b in zip(drawn_from[:new_tokens], drawn_from[new_tokens:]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_model_settings_become_flags_and_reach_the_model():
    # (a setting of another model is refused: BAD_FLAGS)
    args = train.parse_args(["--model", "aft_local", "--window", "8", "--w_rank", "4"])
    assert args.model_overrides == {"window": 8, "w_rank": 4}


@pytest.mark.parametrize("name", list(train.MODELS))
def test_every_flag_is_explained_and_a_models_own_by_its_config_fields_comment(name, capsys,
                                                                               monkeypatch):
    """`--model NAME --help` gives every flag a line of its own (n_layer, lr, seed ... too, not only
    the model's), says how a model flag's value is written (True/False, a tuple as in Python), and
    gives each of the model's own flags the comment written beside its Config field (read here
    straight from the file) and its default, not a generic "setting"."""
    module, _, variant = train.MODELS[name]
    mod = importlib.import_module(module)
    own = [f for f in dataclasses.fields(mod.Config) if f.name not in train.SHARED_FIELDS and f.name not in variant]
    with open(mod.__file__) as file:
        source = file.read()
    monkeypatch.setenv("COLUMNS", "1000")  # argparse wraps help to the terminal's width
    with pytest.raises(SystemExit):
        train.parse_args(["--model", name, "--help"])
    shown = capsys.readouterr().out
    entries = re.findall(r"^  (-.*(?:\n {6,}.*)*)", shown, re.M)  # a flag, its metavar, its help on 1+ lines
    unexplained = [e for e in entries if not re.sub(r"^(-h, --help|--\w+)( [A-Z_]+| \{[^}]*\})?", "", e).strip()]
    assert len(entries) > 25 + len(own) and not unexplained, unexplained  # shared ones, the model's
    assert "True or False" in shown and '--axial_shape "(64, 64)"' in shown
    shown = " ".join(shown.split())
    assert own and "setting (default" not in shown
    for f in own:
        comment = re.search(rf"^    {f.name}: \w+ = .*?  # (.+)$", source, re.M)
        assert comment, f"{module}.Config.{f.name} needs a comment saying what it does: its flag's help"
        assert f"--{f.name} {f.name.upper()} {comment[1]} (default {f.default!r})" in shown, f.name


def test_audio_sampling_writes_wav_files_of_the_requested_length_and_one_per_prompt_at_most(tmp_path):
    """Audio continues validation clips by --seconds: asked for more samples than the split holds,
    sample.py continues each clip once. Unconditional samples need no prompt: all are drawn."""
    write_wav(tmp_path / "clip.wav", np.random.default_rng(0).uniform(-0.5, 0.5, 8000 * 4), 8000)  # 4 s of noise
    out = tmp_path / "run"
    train.main(["--data", f"wav:{tmp_path}", "--max_iters", "1", "--out_dir", str(out),
                "--audio_rate", "1000", "--audio_seq_len", "64"] + TINY)
    sample.main(["--out_dir", str(out), "--seconds", "0.1", "--num_samples", "1",
                 "--device", "cpu"])
    with wave.open(str(out / "sample_1.wav")) as w:  # prompt: a 64-sample validation row (< 1 s)
        assert (w.getframerate(), w.getnchannels(), w.getnframes()) == (1000, 1, 64 + 100)
    clips = len(data.load(f"wav:{tmp_path}", 1000, 64).splits["val"])
    for extra, written in (([], clips), (["--unconditional"], clips + 2)):
        for old in out.glob("sample_*.wav"):
            old.unlink()
        sample.main(["--out_dir", str(out), "--seconds", "0.02", "--num_samples", str(clips + 2), "--device", "cpu"]
                    + extra)
        assert len(list(out.glob("sample_*.wav"))) == written


@pytest.fixture
def bench_run(tmp_path, monkeypatch):
    """run(stages, *flags, out_dir=tmp_path) -> {stage: rows}: bench.py on the CPU (stages None: its
    default ones, as the GPU call runs them); the kernels stage on one head in tiles of 32 (128
    positions, the fewest FlexAttention's blocks take), the LSH stage on one head of 64 positions, the
    training stages at tiny sizes (2 heads, width 32, one warmup step, one evaluation batch)."""
    monkeypatch.setitem(bench.SIZES["cpu"], "attn", dict(B=1, H=1, D=16, tile=32, lengths=(128,), band=32))
    monkeypatch.setitem(bench.SIZES["cpu"], "lsh", dict(B=1, H=1, D=16, T=64, n_hashes=2, chunk=16))
    training = ["--n_head", "2", "--n_embd", "32", "--warmup", "1", "--eval_iters", "1"]
    monkeypatch.setattr(bench, "LONG", training + ["--n_layer", "1", "--batch_size", "2"])
    monkeypatch.setattr(bench, "SAME_BUDGET", bench.LONG + ["--block_size", "64"])
    monkeypatch.setattr(bench, "RECALL", training + ["--data", "copy", "--batch_size", "2"])
    monkeypatch.setattr(bench, "LADDER", training + ["--data", "copy"])
    monkeypatch.setattr(bench, "LADDER_RUNS", {"perceiver_ar": ["--n_latents", "8", "--n_layer", "1"]})
    return lambda stages, *flags, out_dir=tmp_path: bench.main(
        ["--out_dir", str(out_dir), "--device", "cpu", *flags] + (["--stages", stages] if stages else []))


def test_bench_runs_every_default_stage_at_tiny_sizes_and_records_every_figure(bench_run, tmp_path):
    """What the GPU call runs, at CPU sizes: every stage must run, so the GPU call cannot break unseen."""
    results = bench_run(None)
    assert list(results) == list(bench.DEFAULT_STAGES)
    for stage, rows in results.items():
        assert rows and all(r["status"] == "ok" for r in rows), (stage, rows)
    for r in results["kernels"] + [bench.find(results["lsh"], backend="triton")]:  # = Flex, the twin
        assert r["max_diff"] < 1e-5, r
    assert {r["model"] for r in results["generate"]} == set(train.MODELS)
    record = json.loads((tmp_path / "bench.json").read_text())
    assert {"commit", "dirty", "device", "cpu", "threads", "torch", "triton", "command", "args", "seeds"} \
        <= set(record)
    # one timed figure, its repeats beside it: 3, or one call of a quarter second or more (a busy machine)
    (timing,) = record["results"]["aft"][0]["timings"]
    assert len(timing["repeats"]) == 3 or timing["repeats"] == [timing["ms"]] and timing["ms"] >= 250
    assert timing["ms"] == record["results"]["aft"][0]["step_ms"]
    assert (tmp_path / "bench.md").read_text().count("|---") >= len(bench.DEFAULT_STAGES)
    memory = results["memory"]  # the Sparse Transformer post's table, its first row measured too
    for row in memory:
        for ours, post in (("stored", "post_stored"), ("recomputed", "post_recomputed")):
            assert abs(row[ours] / row[post] - 1) < 0.08, row  # the post rounds, partly in GiB
    assert len(memory) == 4 and memory[0]["measured_recomputed"] == 0  # recompute keeps no n x n
    assert memory[0]["measured_stored"] == pytest.approx(memory[0]["stored"], rel=0.01)


# bench's training stages: (flags, the file a finished row keeps): every row trains, only the
# leaky LSH (reformer) is scored on prefixes too, and a finished row is reused as it is
BENCH_TRAINING_STAGES = {
    "same_budget": (["--models", "transformer,reformer"], "transformer_1/metrics.jsonl"),
    "long_context": (["--models", "transformer,reformer,perceiver_ar", "--context", "64"],
                     "transformer_1/long_context.json"),
}


@pytest.mark.parametrize("stage", BENCH_TRAINING_STAGES)
def test_bench_training_stages_train_every_row_score_the_leaky_one_on_prefixes_and_reuse_finished_rows(
        stage, bench_run, text_file, tmp_path):
    flags, kept = BENCH_TRAINING_STAGES[stage]
    kept = tmp_path / stage / kept

    def run(*more):  # the stage's rows by model
        rows = bench_run(stage, "--seeds", "1", "--data", f"text:{text_file}", "--steps", "2", *flags, *more)
        return {r["model"]: r for r in rows[stage]}
    rows = run()
    models = flags[1].split(",")
    models.insert(2, "reformer, causal_lsh")  # its row follows the Reformer's
    assert list(rows) == models and all(3 < r["bits"] < 9 and r["params_m"] > 0 for r in rows.values())
    assert [r["prefix_bits"] is not None for r in rows.values()] == [m == "reformer" for m in models]
    before = kept.read_text()
    with pytest.MonkeyPatch.context() as mp:  # a finished row is read back, not trained or scored

        def again(*args, **kwargs):
            pytest.fail("a finished row was trained or scored again")
        mp.setattr(train, "main", again)
        mp.setattr(sample, "evaluate_split", again)
        assert run()["transformer"]["bits"] == rows["transformer"]["bits"] and kept.read_text() == before
    if stage == "long_context":
        assert [(a, b) for a, b, _ in rows["transformer"]["by_position"]] == [(1, 16), (17, 64)]
        assert [(a, b) for a, b, _ in rows["perceiver_ar"]["by_position"]] == [(33, 64)]  # its 32 latents
        assert all(r["tokens_per_s"] > 0 for r in rows.values())
    else:  # a longer budget continues the run from its checkpoint
        longer = run("--steps", "4")["transformer"]
        assert [step for step, _ in longer["curve"]] == [1, 2, 3, 4] and kept.read_text().startswith(before)


def test_bench_recall_stage_trains_every_model_at_every_distance_in_rounds_and_resumes(bench_run, tmp_path):
    recall = lambda models, distances, *flags: bench_run(
        "recall", "--models", models, "--distances", distances, "--recall_check", "1", "--seeds", "1",
        *flags)["recall"]
    rows = recall("reformer,perceiver_ar", "8,16", "--recall_cap", "2")
    assert [r["model"] for r in rows] == ["reformer", "reformer, causal_lsh", "perceiver_ar"]
    assert all(0 <= r[f"d{d}"] <= 1 and r[f"d{d}_steps"] == 2 for r in rows for d in (8, 16))
    assert [step for step, _, _ in rows[0]["d8_curves"][0]] == [1, 2]  # the curve: one point per round
    curve = tmp_path / "recall" / "perceiver_ar_16_1" / "recall_curve.json"
    before = json.loads(curve.read_text())
    longer = recall("perceiver_ar", "16", "--recall_cap", "3")[0]
    assert longer["d16_curves"][0][:2] == before and longer["d16_steps"] == 3  # kept rounds, one more trained
    recall("perceiver_ar", "8", "--recall_cap", "1", "--recall_layers", "3")
    deeper = torch.load(tmp_path / "recall" / "perceiver_ar_8_1_3layers" / "ckpt.pt", weights_only=True)
    assert deeper["model_config"]["n_layer"] == 2  # a run of its own, the cross-attention block the third layer


@pytest.mark.parametrize("curve,done", [
    ([], False),
    ([(100, 0.5, 5.0), (200, 0.995, 4.0)], True),  # recalled
    ([(100, 0.004, 8.0), (200, 0.004, 8.0), (300, 0.004, 8.0), (400, 0.004, 8.0)], True),  # flat: stopped learning
    ([(100, 0.004, 8.0), (200, 0.004, 7.9), (300, 0.004, 7.8), (400, 0.004, 7.7)], False),  # loss still falls
    ([(100, 0.1, 7.0), (200, 0.1, 7.0), (300, 0.1, 7.0), (400, 0.2, 7.0)], False),  # accuracy still rises
    ([(100, 0.004, 8.0), (200, 0.004, 7.0), (2000, 0.004, 6.0)], True),  # the cap
], ids=["empty", "recalled", "flat", "loss-falls", "accuracy-rises", "cap"])
def test_recall_training_stops_when_neither_accuracy_nor_loss_improves(curve, done):
    assert bench.recall_finished(curve, cap=2000, patience=3) == done


def hand_built_copier(pattern, d=128, sharp=600.0, gain=50.0):
    """A Sparse Transformer at the recall stage's settings (2 layers, width 64, 2 heads, tiles of 8; strided
    l = 16; fixed l = 16, c = 8, 2 offsets) whose weights are set by hand to copy across d positions: the output
    at p repeats the token at p + 1 - d. Every vector the residual stream holds sums to 0, so each LayerNorm only
    rescales, and the position features are 10x the tokens', so that rescaling hardly varies. Positions carry
    the angles of their residue p mod l and block p // l as (cos, sin) pairs; a query turned by an angle scores
    highest on the key that angle away, and `sharp` makes the softmax pick it alone.
    - strided, two hops: layer 0 (the band of l) fetches the token 15 back into a second token subspace; layer 1
      (every l-th key) reads that subspace 7 blocks back: 15 + 7 * 16 = 127 = d - 1.
    - fixed, one hop: layer 1's two summary heads together see every earlier position (head 0 the residues 8-15
      of each block, head 1 the residues 0-7); the head that holds the source gets its residue and block as its
      query (from the position table), the other a zero query, so it averages, a small noise that `gain` dwarfs.
    Layer 0 of fixed and both MLPs output 0."""
    name = f"sparse_{pattern}"
    args = train.parse_args(["--model", name, "--block_size", str(2 * d), "--n_layer", "2"]
                            + bench.RECALL + bench.RECALL_SETTINGS[name])
    model = train.build_model(name, train.model_config(name, args, 257, **args.model_overrides))
    l, C, D = model.config.stride, model.config.n_embd, model.config.n_embd // model.config.n_head
    assert (l, C, D, model.config.n_head) == (16, 64, 32, 2) and model.config.combine == "interleaved"
    own, fetched = slice(0, 20), slice(20, 40)  # token subspaces: the input token; the token layer 0 fetched
    pos = torch.arange(2 * d)
    source = pos + 1 - d
    angle = lambda k: 2 * math.pi * (k % l) / l
    features = {"res": (angle(pos), 1.0), "blk": (angle(pos // l), 1.0)}  # name: (angle, amplitude)
    if pattern == "fixed":
        for h, sees in enumerate((source % l >= l // 2, source % l < l // 2)):
            features[f"res{h}"] = (angle(source), sees.float())
            features[f"blk{h}"] = (angle(source.div(l, rounding_mode="floor")), sees.float())
    at = {name: 40 + 4 * i for i, name in enumerate(features)}  # dims of (cos, -cos, sin, -sin)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        for norm in (m for m in model.modules() if isinstance(m, torch.nn.LayerNorm)):
            norm.weight.fill_(1.0)
        e = torch.randn(257, own.stop - own.start, generator=torch.Generator().manual_seed(0))
        e -= e.mean(1, keepdim=True)
        model.wte.weight[:, own] = e / e.norm(dim=1, keepdim=True)  # tied: the output layer decodes them
        table = model.wpe.tables[0].weight
        for name, (a, amplitude) in features.items():
            for i, f in enumerate((a.cos() * amplitude, a.sin() * amplitude)):
                table[:, at[name] + 2 * i], table[:, at[name] + 2 * i + 1] = 10 * f, -10 * f

        def read(W, row, name, turn, weight):  # rows row, row + 1 of W: the feature's (cos, sin) turned by turn
            c, s = math.cos(turn), math.sin(turn)
            for r, (wc, ws) in enumerate(((c, -s), (s, c))):
                W[row + r, at[name]:at[name] + 4] = weight * torch.tensor([wc, -wc, ws, -ws])

        def head(layer, h, queries, keys, source_dims, out_dims, out_gain):
            W, proj = model.blocks[layer].attn.qkv.weight, model.blocks[layer].attn.proj.weight  # W: q, k, v rows
            for i, (name, turn) in enumerate(queries):
                read(W, D * h + 2 * i, name, turn, sharp)
            for i, name in enumerate(keys):
                read(W, C + D * h + 2 * i, name, 0.0, 1.0)
            n = torch.arange(source_dims.stop - source_dims.start)
            W[2 * C + D * h + n, source_dims.start + n] = 1.0  # the value: the token subspace, copied
            proj[out_dims.start + n, D * h + n] = out_gain

        if pattern == "strided":
            head(0, 0, [("res", angle(1))], ["res"], own, fetched, 1.0)  # the residue of p + 1: 15 back
            head(1, 0, [("blk", -angle(7))], ["blk"], fetched, own, gain)  # 7 blocks back
        else:
            for h in (0, 1):
                head(1, h, [(f"res{h}", 0.0), (f"blk{h}", 0.0)], ["res", "blk"], own, own, gain)
    return model.eval()


@pytest.mark.parametrize("pattern", ["strided", "fixed"])
def test_sparse_patterns_can_express_the_copy_across_128_positions_in_two_layers(pattern):
    # The recall table's "not yet" for the sparse patterns at d = 128 rests on this: trained, both sat at chance
    # for 2,000-6,000 steps (strided 20,000), yet two layers of their patterns copy every byte with hand-set weights.
    model = hand_built_copier(pattern)
    assert bench.copy_accuracy(model, 128, torch.device("cpu")) == 1.0
    rows = torch.randint(0, 256, (8, 128), generator=torch.Generator().manual_seed(1))
    seq = torch.cat([torch.full((8, 1), 256), rows, rows], dim=1)  # (8, 257): start, x, x
    assert torch.equal(model(seq[:, :-1])[0][:, 128:].argmax(-1), seq[:, 129:])  # every copied byte
    broken = hand_built_copier(pattern, sharp=0.0)  # the same circuit with queries that select nothing
    assert bench.copy_accuracy(broken, 128, torch.device("cpu")) < 0.1


def test_copy_accuracy_counts_exact_copies_from_the_prefix_alone_when_the_forward_leaks():
    """An oracle that copies the token d back scores 1; one that would need a later token scores
    chance. Perceiver AR predicts only its latents (the last k positions): an oracle that copies
    there scores 1, and rows taken in several calls score as in one."""
    class Oracle(torch.nn.Module):
        exactly_causal = False

        def __init__(self, shift):
            super().__init__()
            self.shift, self.calls = shift, []

        def forward(self, idx):
            self.calls.append(idx.size(1))
            source = torch.roll(idx, self.shift - 1, dims=1)  # position t sees token t + 1 - shift
            return F.one_hot(source, 257).float(), None
    good, cheat = Oracle(16), Oracle(0)  # shift 0 reads token t + 1: the answer itself, possible only by leaking
    assert bench.copy_accuracy(good, 16, "cpu") == 1.0
    assert bench.copy_accuracy(cheat, 16, "cpu") < 0.1 and len(cheat.calls) == 32  # one prefix per position

    class LastK(torch.nn.Module):
        def forward(self, idx):  # the token d = 16 back, for the last 8 positions only
            return F.one_hot(idx[:, -8 - 15 : -15], 257).float(), None
    assert bench.copy_accuracy(LastK(), 16, "cpu") == 1.0
    assert bench.copy_accuracy(LastK(), 16, "cpu", n_rows=5, rows_per_call=2) == 1.0


def test_rotary_margin_is_what_perceiver_ar_rotary_scores_and_base_0_spans_the_context():
    """rotary_margin's scores are those of perceiver_ar's rotary: a query and keys of ones in every
    rotated pair, turned by apply_rotary with the model's frequencies, score sum_i cos(delta f_i) at
    offset delta. rotary_base = 0 (as the official code: wavelengths up to the context length) turns
    pair i by block_size^(-i/n) per position; the default keeps base 10,000, so checkpoints trained
    before the option mean what they meant."""
    make = lambda **kw: perceiver_ar.RotaryAttention(perceiver_ar.Config(n_embd=32, n_head=2, block_size=4096, **kw))
    n = make().inv_freq.numel()
    assert torch.equal(make(rotary_base=0).inv_freq, 4096.0 ** (-torch.arange(n) / n))
    assert torch.equal(make().inv_freq, 10000.0 ** (-torch.arange(n) / n))
    n_pairs, span = 4, 512
    attn = perceiver_ar.RotaryAttention(perceiver_ar.Config(n_embd=2 * n_pairs, n_head=1, rotary_frac=1.0))
    x = torch.cat([torch.ones(n_pairs), torch.zeros(n_pairs)]).double().expand(1, 1, span, -1)  # (1, 1, S, D)
    pos = torch.arange(span)[None]
    rotated = perceiver_ar.apply_rotary(x, pos, attn.inv_freq.double())
    scores = (rotated[0, 0, -1] @ rotated[0, 0].T).flip(0)  # score at offsets 0 .. span - 1 from the last position
    margin, at = bench.rotary_margin(attn.inv_freq, span)
    assert scores[0].item() == pytest.approx(n_pairs)
    assert margin == pytest.approx(n_pairs - scores[1:].max().item()) and at == 1 + scores[1:].argmax().item()
    freqs = lambda n_pairs: 10000.0 ** (-torch.arange(n_pairs) / n_pairs)  # base 10,000: the default
    assert bench.rotary_margin(freqs(4), 131072)[0] < 0.001 < 0.5 < bench.rotary_margin(freqs(8), 131072)[0]


def test_bench_reformer_cpu_stage_times_both_attention_paths_beside_perceiver_ar(bench_run):
    """Every (attention path, hash) row of the Reformer ran on its path (the twin really is swapped in and out)
    and is given as a multiple of Perceiver AR's step at its length."""
    calls = []
    real = kernels.lsh_attention
    spy = lambda *a, **kw: (calls.append(kw.get("backend")), real(*a, **kw))[1]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(bench.reformer, "lsh_attention", spy)
        rows = bench_run("reformer_cpu", "--lengths", "512", "--budget", "120")["reformer_cpu"]
        assert bench.reformer.lsh_attention is spy  # put back after every cell
    assert [(r["model"], r.get("lsh"), r.get("factorize_hash")) for r in rows] == [("perceiver_ar", None, None)] + [
        ("reformer", lsh, f) for lsh, f in (("cpu", True), ("cpu", False), ("dense", True), ("dense", False))]
    assert all(r["status"] == "ok" and r["vs_perceiver"] == r["step_ms"] / rows[0]["step_ms"] for r in rows)
    assert set(calls) == {None, "dense"}


def test_bench_ladder_stage_climbs_while_learned_stops_at_the_first_miss_and_resumes(bench_run, tmp_path):
    ladder = lambda distances, cap, out_dir=tmp_path: bench_run(
        "ladder", "--models", "perceiver_ar", "--distances", distances, "--ladder_check", "1",
        "--ladder_cap", cap, out_dir=out_dir)["ladder"][0]
    row = ladder("8,16", "2")
    assert "d16" not in row  # d = 8 not learned in 2 steps: the ladder stops there
    assert [r["step"] for r in row["d8_curve"]] == [1, 2] and row["d8_curve"][0]["batch"] == 8
    assert all(r["s_per_step"] > 0 and r["maxrss_gb"] > 0 and 0 <= r["accuracy"] <= 1 for r in row["d8_curve"])
    longer = ladder("8,16", "3")
    kept = [(r["step"], r["accuracy"], r["seconds"]) for r in longer["d8_curve"]]
    assert kept[:2] == [(r["step"], r["accuracy"], r["seconds"]) for r in row["d8_curve"]] and kept[-1][0] == 3
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(bench, "copy_accuracy", lambda *a, **k: 1.0)
        climbed = ladder("8,16,32", "5", tmp_path / "b")
    assert [len(climbed[f"d{d}_curve"]) for d in (8, 16, 32)] == [1, 1, 1]  # learned: next rung
    freqs = 10000.0 ** (-torch.arange(4) / 4)
    assert climbed["d32_curve"][0]["rotary_margin"] == list(bench.rotary_margin(freqs, 64))
    shown = ladder("8,16,32", "3")
    assert "d16" not in shown  # not trained past a miss (d = 8 here)
    shutil.copytree(tmp_path / "b" / "ladder" / "perceiver_ar_32", tmp_path / "ladder" / "perceiver_ar_32")
    shown = ladder("8,16,32", "3")
    assert "d16" not in shown and len(shown["d32_curve"]) == 1  # but a distance run before is shown


def test_flex_block_masks_compute_the_model_layouts_and_list_the_same_blocks_arithmetic_or_not():
    # bench's Flex blocks are 128 positions (8 x 8 tiles of 16 here): full where every tile is visible
    # and uncut, partial where some are. The kernels table's two Flex columns compare because the
    # arithmetic mask_mod and the layout's table list the same blocks; only the work per element of a
    # partial block differs.
    from torch.nn.attention.flex_attention import flex_attention
    n, block = 1024, 16
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, n, 16, generator=g) for _ in range(3))

    def listed(counts, indices):  # (1, H', m), (1, H', m, m) -> (H', m, m): which blocks a row lists
        first = torch.arange(indices.size(-1)) < counts[..., None]
        return torch.zeros(indices.shape).scatter_add(-1, indices.long(), first.float())[0] > 0
    kinds = []  # (partial, full) blocks listed, per layout
    for name, layout, window, mask_mod in bench.model_layouts(n, block, 256, 2):
        table = bench.flex_block_mask(layout, block, n, window, "cpu")
        kinds.append((int(table.kv_num_blocks.sum()), int(table.full_kv_num_blocks.sum())))
        expected = dense_attention(q, k, v, layout=layout, tile=block, window=window)
        got = flex_attention(q, k, v, block_mask=table)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5, msg=name)
        arithmetic = bench.flex_mask(mask_mod, layout.size(0), n, torch.device("cpu"))
        assert arithmetic.BLOCK_SIZE == table.BLOCK_SIZE == (128, 128), name
        for kind in ("kv", "full_kv"):
            a, t = (listed(getattr(m, f"{kind}_num_blocks"), getattr(m, f"{kind}_indices")) for m in (arithmetic, table))
            assert torch.equal(a, t), (name, kind)
    assert all(partial > 0 for partial, _ in kinds) and any(full > 0 for _, full in kinds), kinds


@pytest.mark.parametrize("n", [16384, 65536])
def test_flex_arithmetic_masks_equal_the_kernel_masks_of_the_model_layouts(n):
    # bench gives FlexAttention each pattern as arithmetic (model_layouts' mask_mod): at the bench's sizes (tiles
    # of 64, band 256, 8 heads), on the first, the last and 10 random query blocks of each layout, every element
    # equals kernels.attention_mask of the layout and window the model file builds, keys after the block included.
    block, H = 64, 8
    g = torch.Generator().manual_seed(n)
    h, kv_idx = torch.arange(H)[:, None, None], torch.arange(n)[None, None, :]
    layouts = bench.model_layouts(n, block, 256, H)
    assert [name.split()[0] for name, *_ in layouts] == ["local", "strided", "fixed"]
    for name, layout, window, mask_mod in layouts:
        nb = n // block
        for m in [0, nb - 1] + torch.randint(1, nb - 1, (10,), generator=g).tolist():
            # the rows of query block m: T = block queries at positions m*block.., S = the keys up to them
            expected = kernels.attention_mask(block, (m + 1) * block, layout=layout[:, m:m + 1, :m + 1], tile=block,
                                              window=window)  # (1 or H, block, (m + 1) block)
            later = torch.zeros(expected.size(0), block, n - (m + 1) * block, dtype=torch.bool)
            expected = torch.cat([expected, later], dim=-1).expand(H, block, n)
            got = mask_mod(0, h, torch.arange(m * block, (m + 1) * block)[None, :, None], kv_idx)
            assert torch.equal(got.expand(H, block, n), expected), (name, m)


def test_bench_kernel_sweep_runs_every_setting_and_each_matches_the_default(bench_run, monkeypatch):
    # The sweep the next GPU run makes in one call: every setting it names is an override the GPU's default
    # configuration takes (bf16, D 64, tiles of 64; launches stubbed); run at CPU sizes with tiles of 32, a
    # 16-wide setting gives the default's output and gradients.
    assert len(bench.SWEEP) > 1
    with pytest.MonkeyPatch.context() as stubbed:
        stub_launches(stubbed)
        q = torch.zeros(1, 1, 128, 64, dtype=torch.bfloat16)
        for _, settings in bench.SWEEP:
            with bench.launch_overrides(**settings):
                attention(q, q, q, tile=64, backend="triton")
    sixteen = dict(TILE_M=16, TILE_N=16)
    settings = dict(fwd=sixteen, dkdv=sixteen, dq=sixteen)
    monkeypatch.setattr(bench, "SWEEP", [("default", {}), ("16 wide", settings)])
    # the kernels stage after it measures sweep_best's pick (16 wide: CPU timings are noise) by the default
    picked = []
    monkeypatch.setattr(bench, "sweep_best", lambda rows: picked.append(rows) or ("16 wide", settings))
    results = bench_run("kernel_sweep,kernels")
    rows = results["kernel_sweep"]
    assert [(r["setting"], r["layout"].split()[0]) for r in rows] == [
        (s, layout) for s in ("default", "16 wide") for layout in ("local", "strided", "fixed")]
    for r in rows:
        assert r["status"] == "ok" and r["fwd_ms"] > 0 and r["fb_ms"] > 0 and r["max_diff"] < 1e-5, r
    assert picked == [rows]
    for r in results["kernels"]:
        assert r["best_fwd_ms"] > 0 and r["best_fb_ms"] > 0 and r["best_vs_default"] < 1e-5, r
    assert kernels.launch_config.__module__ == "kernels"  # the sweep leaves the defaults behind


def test_sweep_best_merges_the_fastest_forward_and_backward_settings_beyond_noise(monkeypatch):
    # Per side, the setting with the lowest geometric-mean time over the layouts, 3% or more below the default's;
    # a setting that failed on a layout, slows one by more than 3%, or changes both sides, is never chosen.
    monkeypatch.setattr(bench, "SWEEP", [
        ("default", {}), ("fwd a", dict(fwd=dict(num_warps=8))), ("fwd b", dict(fwd=dict(num_stages=2))),
        ("bwd a", dict(dq=dict(num_warps=4))), ("bwd noise", dict(dkdv=dict(num_warps=4))),
        ("bwd failed once", dict(dq=dict(num_stages=2))), ("both", dict(fwd=dict(num_warps=4), dq=dict(TILE_N=32)))])
    times = {"default": (1.0, 4.0), "fwd a": (0.9, 3.9), "fwd b": (0.8, 4.2), "bwd a": (1.0, 3.0),
             "bwd noise": (1.0, 3.95), "bwd failed once": (1.0, 1.0), "both": (0.5, 2.5)}
    layouts = [(65536, "local"), (65536, "fixed"), (16384, "strided")]
    rows = [dict(setting=s, n=n, layout=layout, status="ok", fwd_ms=f * scale, fb_ms=fb * scale)
            for s, (f, fb) in times.items() for scale, (n, layout) in enumerate(layouts, 1)]
    failed = next(r for r in rows if r["setting"] == "bwd failed once" and r["layout"] == "strided")
    failed.update(status="error: out of resources", fwd_ms=None, fb_ms=None)
    assert bench.sweep_best(rows) == ("fwd b + bwd a", dict(fwd=dict(num_stages=2), dq=dict(num_warps=4)))
    one_slower = next(r for r in rows if r["setting"] == "bwd a" and r["layout"] == "fixed")
    one_slower["fb_ms"] *= 1.4  # 3.0 / 4.0 x 1.4 = 1.05x the default's on fixed, still 0.84x in the mean
    assert bench.sweep_best(rows) == ("fwd b", dict(fwd=dict(num_stages=2)))
    slower = [r if r["setting"] == "default" or r["status"] != "ok" else dict(r, fwd_ms=2 * r["fwd_ms"],
                                                                             fb_ms=2 * r["fb_ms"]) for r in rows]
    assert bench.sweep_best(slower) is None and bench.sweep_best(None) is None


def stub_launches(monkeypatch):
    """Replace every Triton launch by a record of (kernel name, grid, launch arguments): the launch path without
    running a kernel."""
    launches = []
    monkeypatch.setattr(kernels.triton.runtime.jit.KernelInterface, "__getitem__", lambda kernel, grid: (
        lambda *args, **kw: launches.append((kernel.fn.__name__, grid, kw))))
    return launches


def test_launch_overrides_reach_the_launches_and_end_with_the_block(monkeypatch):
    launches = stub_launches(monkeypatch)
    q, k, v, dout = random_inputs(1, 2, 64, 64, 16)

    def settings():  # {kernel: (grid, launch arguments)} of one forward and backward
        launches.clear()
        torch.autograd.grad(attention(q, k, v, tile=32, backend="triton"), (q, k, v), dout)
        return {name: (grid, kw) for name, grid, kw in launches}
    default = settings()
    with bench.launch_overrides(dkdv=dict(num_warps=2, TILE_N=16), fwd=dict(num_stages=1)):
        changed = settings()
    assert changed["_bwd_dkdv_kernel"][1]["num_warps"] == 2 and changed["_bwd_dkdv_kernel"][0] == (64 // 16, 2)
    assert changed["_fwd_kernel"][1]["num_stages"] == 1 and changed["_bwd_dq_kernel"] == default["_bwd_dq_kernel"]
    assert settings() == default
    for bad in (dict(bwd=dict(num_warps=4)), dict(fwd=dict(warps=4))):
        with pytest.raises(ValueError, match="launch_overrides takes"):
            with bench.launch_overrides(**bad):
                pass
    with bench.launch_overrides(fwd=dict(TILE_N=48)), pytest.raises(ValueError, match="must divide tile=32"):
        attention(q, k, v, tile=32, backend="triton")


def test_launch_settings_are_computed_once_per_configuration(monkeypatch):
    # The dispatch runs on every call of every layer: its launch settings come from a cache, not recomputed.
    stub_launches(monkeypatch)
    calls = []
    config = kernels.launch_config
    monkeypatch.setattr(kernels, "launch_config", lambda *args: calls.append(args) or config(*args))
    kernels._launch_settings.cache_clear()
    q, k, v, dout = random_inputs(1, 2, 64, 64, 16)
    for _ in range(3):
        torch.autograd.grad(attention(q, k, v, tile=32, backend="triton"), (q, k, v), dout)
    attention(q, k, v, tile=16, backend="triton")
    assert calls == [(32, 16, torch.float32, None), (16, 16, torch.float32, None)]


def test_calls_without_gradients_skip_the_autograd_function_and_compute_the_same():
    q, k, v, _ = random_inputs(1, 2, 64, 64, 16, seed=4)
    mask = dict(layout=random_layout(2, 64, 64, 16, seed=4), tile=16, window=20)
    buckets = torch.randint(4, (1, 2, 2, 64), generator=torch.Generator().manual_seed(4))
    for run in (lambda q, k, v: attention(q, k, v, backend="triton", **mask),
                lambda q, k, v: lsh_attention(q, k, v, buckets, 16, backend="triton")):
        tracked = run(q, k, v)
        with torch.no_grad():
            untracked = run(q, k, v)
        detached = run(q.detach(), k.detach(), v.detach())
        assert tracked.grad_fn is not None and untracked.grad_fn is None and detached.grad_fn is None
        assert torch.equal(untracked, tracked.detach()) and torch.equal(detached, untracked)
        assert tracked.abs().sum() > 0


def test_bench_records_failures_and_goes_on(bench_run, tmp_path, monkeypatch):
    # A GPU is lent for minutes: a failing FlexAttention costs none of our kernel's figures, a failing stage
    # none of the stages after it, and bench.json holds what was measured.
    def fail(*args, **kwargs):
        raise RuntimeError("no valid configuration\nmore detail")
    for name in ("flex_mask", "flex_block_mask", "stage_lsh"):
        monkeypatch.setattr(bench, name, fail)
    results = bench_run("kernels,lsh,perceiver")
    assert [r["layout"].split()[0] for r in results["kernels"]] == ["local", "strided", "fixed"]
    for r in results["kernels"]:
        assert r["status"] == "ok" and r["ours_fwd_ms"] > 0, r
        for kind in ("flex", "table"):
            assert r[f"{kind}_status"] == "error: RuntimeError: no valid configuration" and f"{kind}_fwd_ms" not in r
    assert results["lsh"] == [{"status": "error: RuntimeError: no valid configuration"}]
    assert results["perceiver"][0]["status"] == "ok"
    assert json.loads((tmp_path / "bench.json").read_text())["results"] == results


def test_bench_keeps_the_cells_of_a_run_killed_mid_stage(bench_run, tmp_path, monkeypatch):
    # The GPU call's timeout can stop bench.py inside a stage: bench.json holds that stage's finished cells.
    finished, real_attempt = [], bench.attempt

    def attempt(cell):
        if finished:
            raise KeyboardInterrupt  # the timeout, during the stage's second cell
        finished.append(real_attempt(cell))
        return finished[-1]
    monkeypatch.setattr(bench, "attempt", attempt)
    with pytest.raises(KeyboardInterrupt):
        bench_run("aft")  # 3 cells
    saved = json.loads((tmp_path / "bench.json").read_text())["results"]
    assert [(r["model"], r["status"]) for r in saved["aft"]] == [("transformer", "ok")]
    assert saved["aft"][0]["step_ms"] > 0
    assert bench.SAVE_CELLS is None


def test_bench_skips_what_the_budget_cannot_fit_and_its_table_says_why_once(bench_run):
    table = bench.markdown([{"T": 64, "ms": 1.5}, {"T": 128, "status": "skipped: budget"}],
                           [("T", "T", "d"), ("ms", "ms", ".1f"), ("GiB", "gib", ".1f")])
    assert table.splitlines()[2:] == ["| 64 | 1.5 | - |", "| 128 | skipped: budget | - |"]
    results = bench_run("reformer,aft", "--budget", "0.001")
    assert list(results) == ["reformer", "aft"] and all(results.values())
    assert all(r["status"].startswith("skipped: budget") for rows in results.values() for r in rows)


def test_bench_models_stage_times_every_model_and_says_why_one_refuses_a_setting(bench_run, capsys):
    """A refusal is the model's one sentence, without a traceback; the unexpected keeps its traceback."""
    rows = bench_run("models", "--lengths", "64", "--n_layer", "1", "--n_embd", "32", "--n_head", "2")
    rows = rows["models"]
    assert [r["model"] for r in rows] == list(train.MODELS)
    assert all(r["status"] == "ok" and r["tokens_per_s"] > 0 for r in rows)
    capsys.readouterr()
    (row,) = bench_run("models", "--lengths", "7", "--models", "sparse_strided")["models"]
    assert row["status"].startswith("refused: no stride tiles block_size 7") and "\n" not in row["status"]
    assert "Traceback" not in capsys.readouterr().err
    assert bench.attempt(lambda: 1 / 0)["status"] == "error: ZeroDivisionError: division by zero"
    assert "Traceback" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------
# kernels.py: the block-sparse attention kernel (Triton interpreter) against the dense reference


def random_layout(heads, T, S, block, seed=0):
    """Random tiles with one block row emptied (its queries see nothing) and the diagonal left to chance."""
    g = torch.Generator().manual_seed(seed)
    layout = torch.rand(heads, T // block, S // block, generator=g) < 0.6
    layout[:, 1] = False
    return layout


def assert_close_to_reference(fn, q, k, v, dout, atol, **mask):
    """Output and gradients finite and as the float64 reference gives them; rows without visible
    keys exactly 0."""
    ours = outputs_and_grads(fn, q, k, v, dout)
    assert ours[0].dtype == q.dtype
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = outputs_and_grads(lambda q, k, v: reference(q, k, v, **mask), qd, kd, vd, dout.double())
    for name, a, b in zip(("out", "dq", "dk", "dv"), ours, ref):
        assert torch.isfinite(a).all(), name
        torch.testing.assert_close(a.double(), b, atol=atol, rtol=atol, msg=lambda m: f"{name}: {m}")
    empty = ~reference(q, k, v, **mask).ne(0).any(-1)  # (B, H, T): rows that see no key
    assert (ours[0][empty] == 0).all() and (ours[1][empty] == 0).all()


# case: (B, H, layout heads (0: no layout), T, S, D, tile, causal, window, options): attention on
# the Triton kernel (interpreted) against the float64 reference, output and gradients, in float32
# within 1e-4; a random layout leaves a row of queries without keys (their output and dq exactly
# 0, but in fp16 with the diagonal tiles added). options: backend dense: the PyTorch fallback,
# within 1e-6. sub_tile: programs and sub-tiles narrower than the layout's tile (a tile's rows
# split between programs, a list entry walked in pieces). fp16, with a scale and the diagonal
# tiles in the layout, within 2e-2 (bf16 takes the same code path, but the 3.9 interpreter's
# tl.dot multiplies raw bf16 bits, so bf16 is checked on a GPU only: by
# test_gpu_block_sparse_kernel_matches_float64_reference below, and by `python bench.py`, whose
# kernels stage compares it with FlexAttention).
CASES = {
    "per_head_layouts_uneven_heads": (1, 3, 3, 64, 64, 16, 16, True, None, {}),
    "broadcast_layout_batch_2": (2, 1, 1, 64, 64, 32, 32, True, None, {}),
    "cross_attention_T_lt_S": (1, 2, 1, 32, 96, 16, 16, True, None, {}),
    "window_with_layout": (1, 2, 2, 64, 64, 16, 16, True, 20, {}),
    "window_without_layout": (1, 1, 0, 64, 64, 32, 16, True, 24, {}),
    "not_causal_with_layout": (1, 2, 1, 32, 64, 16, 16, False, None, {}),
    "not_causal_cross_attention_with_window": (1, 2, 2, 32, 64, 16, 16, False, 24, {}),
    "dense_causal_no_layout": (1, 1, 0, 64, 64, 32, 32, True, None, {}),
    "sub_tiles_of_16_with_the_window_edge_inside": (1, 2, 1, 64, 64, 16, 32, True, 24,
                                                    dict(sub_tile=16)),
    "fp16_with_scale": (1, 2, 2, 32, 32, 16, 16, True, None,
                        dict(dtype=torch.float16, scale=0.3, diagonal=True)),
    "dense_fallback_with_empty_rows": (2, 2, 2, 32, 64, 16, 16, True, 20, dict(backend="dense")),
}


@pytest.mark.parametrize("case", CASES)
def test_block_sparse_attention_matches_the_float64_reference(case):
    B, H, heads, T, S, D, tile, causal, window, options = CASES[case]
    backend, dtype = options.get("backend", "triton"), options.get("dtype", torch.float32)
    q, k, v, dout = random_inputs(B, H, T, S, D, dtype, seed=len(case))
    layout = random_layout(heads, T, S, tile, seed=len(case)) if heads else None
    if options.get("diagonal"):
        layout = layout | torch.eye(T // tile, dtype=torch.bool)
    mask = dict(causal=causal, layout=layout, tile=tile, window=window, scale=options.get("scale"))
    sub = options.get("sub_tile")
    sub_tiles = dict(TILE_M=sub, TILE_N=sub) if sub else {}
    atol = {torch.float16: 2e-2, torch.float32: 1e-4 if backend == "triton" else 1e-6}[dtype]
    with bench.launch_overrides(fwd=sub_tiles, dkdv=sub_tiles, dq=sub_tiles):
        assert_close_to_reference(lambda q, k, v: attention(q, k, v, backend=backend, **mask),
                                  q, k, v, dout, atol=atol, **mask)
    assert kernels.last_backend == backend


# The compile check. compile_for_gpus starts fresh processes that run compile_check with TRITON_INTERPRET=0 (this
# file sets it to 1, and interpreted kernels do not compile). compile_check runs the kernels' own launch code,
# forward and backward, on CPU tensors, with a driver that only tells Triton which GPU to compile for. Every launch
# then compiles exactly what it compiles on that GPU (the same signature, constexprs, 16-byte alignment and
# divisibility-by-16 attributes, warps and stages) with the ptxas Triton ships, and stops before running. Per
# compiled kernel it reports shared memory, registers, stack bytes (spills) and whether the PTX uses wgmma.

class CompileOnlyDriver:  # all that a launch asks the driver before it runs the kernel
    def __init__(self, arch):
        from triton.backends.compiler import GPUTarget
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_device(self):
        return self.target.arch  # a device per architecture keeps their compiled kernels apart

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target


def resource_usage(kernel):
    """[shared bytes, registers, stack bytes, wgmma] of a compiled kernel, read with the cuobjdump Triton ships."""
    cuobjdump = os.path.join(os.path.dirname(kernels.triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        res = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    registers, stack = (int(re.search(key + r":(\d+)", res).group(1)) for key in ("REG", "STACK"))
    return [kernel.metadata.shared, registers, stack, "wgmma" in kernel.asm["ptx"]]


def launch_forward_and_backward(arch, kind, dtype, D, size):
    """Forward and backward of the autograd Function the public function calls, on sm_`arch`."""
    T = 2 * size
    q, k, v = (torch.randn(1, 2, T, D, dtype=getattr(torch, dtype), requires_grad=True) for _ in range(3))
    if kind == "sparse":
        out = kernels._sparse_attention(q, k, v, None, size, 0, T + 1, D ** -0.5, arch)
    elif kind == "aft":  # D features, a window of size (0: AFT-simple)
        k, v = (torch.randn(1, 256, D, dtype=getattr(torch, dtype), requires_grad=True) for _ in range(2))
        band = torch.randn(1, 256, size, requires_grad=True) if size else None
        out = kernels._aft_triton(k, v, band)
    else:
        buckets = torch.randint(4, (1, 2, 2, T))
        out = kernels._lsh_attention_triton(q, k, v, buckets, size, 1.0, False, kind == "lsh-dup-correction", False, arch)
    out.backward(torch.ones_like(out))


def compile_check(configs):
    """Compile each [arch, kind, dtype, D, tile, chunk or window] of the JSON list `configs`, with the launch settings
    of bench.SWEEP named by a sixth element if there is one; print a JSON line per configuration: the configuration
    and {kernel: resource_usage}. In a process of its own, with TRITON_INTERPRET=0: it replaces Triton's driver
    and turns every launch into a compilation."""
    from triton.runtime.jit import JITFunction
    compiled = []
    JITFunction.__getitem__ = lambda fn, grid: lambda *args, **kw: compiled.append(
        fn.run(*args, grid=grid, warmup=True, **kw))  # a launch up to the compiled kernel, not run
    for arch, kind, dtype, D, size, *setting in json.loads(configs):
        kernels.triton.runtime.driver.set_active(CompileOnlyDriver(arch))
        kernels._arch = lambda device: arch
        compiled.clear()
        with bench.launch_overrides(**dict(bench.SWEEP)[setting[0]] if setting else {}):
            launch_forward_and_backward(arch, kind, dtype, D, size)
        usage = {k.metadata.name: resource_usage(k) for k in compiled}
        print(json.dumps([arch, kind, dtype, D, size, *setting, usage]), flush=True)


ARCHS = {75: 65536, 80: 166912, 86: 101376, 89: 101376, 90: 232448}  # sm_XY: shared memory a block may use
DTYPES = ("float16", "bfloat16", "float32")
LSH_TILES = (16, 32, 64)  # any chunk up to 64 compiles to one of these tiles (chunk rounded up to a power of 2)
AFT_WINDOWS = (0, 32)  # AFT-simple, and AFT-local's window (the AFT kernels' tiles do not depend on it)


def dispatch_unfit(arch, kind, dtype, D, size):
    """Why the dispatch would not launch this configuration on sm_`arch` (a sentence), or None: the
    architecture check of kernels.triton_dispatch, then the family's own."""
    if kernels._gpu_unfit(arch):
        return kernels._gpu_unfit(arch)
    x = torch.empty(1, 1, size, D, dtype=getattr(torch, dtype), device="meta")  # T = S = size: a whole tile
    if kind == "sparse":
        return kernels._sparse_unfit(arch, x, x, x, size)
    if kind == "aft":
        return kernels.aft_unfit(arch, x[0])
    return kernels._lsh_unfit(arch, x.dtype, D, size, kind == "lsh-dup-correction")


def launchable(configs):
    return [c for c in configs if dispatch_unfit(*c) is None]


def all_gpu_configs():
    """Every (arch, kind, dtype, D, block or chunk) the dispatch launches on the five architectures."""
    sizes = dict(sparse=kernels.TRITON_TILES, lsh=LSH_TILES, **{"lsh-dup-correction": LSH_TILES})
    return launchable([(arch, kind, dtype, D, size) for arch in ARCHS for kind in sizes for dtype in DTYPES
                       for D in kernels.TRITON_HEAD_DIMS for size in sizes[kind]]
                      + [(arch, "aft", dtype, 512, s) for arch in ARCHS for dtype in DTYPES for s in AFT_WINDOWS])


def default_gpu_configs():
    """The configurations the models launch by default (bf16 autocast; Sparse Transformer and Perceiver AR at
    D = 64, block 64; the Reformer at D = 64, chunk 64; AFT-local at width 512, window 32) and the largest each
    kind and dtype takes, on each architecture the dispatch launches on. sm_89 compiles exactly as sm_86 and fp16
    as bf16 (same shared memory, registers and stack in the exhaustive check), so they are left out here."""
    configs = []
    for arch in (80, 86, 90):
        configs += [(arch, "sparse", "bfloat16", 64, 64), (arch, "lsh", "bfloat16", 64, 64),
                    (arch, "aft", "bfloat16", 512, 32)]
        for kind, dtype in itertools.product(("sparse", "lsh-dup-correction"), ("bfloat16", "float32")):
            fits = [c for c in all_gpu_configs() if c[:3] == (arch, kind, dtype)]
            configs += [max(fits, key=lambda c: c[3:])] if fits else []
    return launchable(configs)


def compile_for_gpus(configs, processes=2, timeout=1800):
    """{(arch, kind, dtype, D, size): {kernel: [shared bytes, registers, stack bytes, wgmma]}}, compiled in
    `processes` parallel subprocesses, each given `timeout` seconds."""
    run_check = "import sys, test_all; test_all.compile_check(sys.argv[1])"
    runs = [subprocess.Popen([sys.executable, "-c", run_check, json.dumps(configs[i::processes])], cwd=HERE,
                             env={**os.environ, "TRITON_INTERPRET": "0"}, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for i in range(processes)]
    results = {}
    for run in runs:
        out, err = run.communicate(timeout=timeout)
        assert run.returncode == 0, err[-3000:]
        for line in out.splitlines():
            *config, kernels_used = json.loads(line)
            results[tuple(config)] = kernels_used
    return results


def assert_fits(results):
    """Shared memory within the architecture's limit, and no spills from running out of registers: none at all
    at 255 registers a thread. Below that ptxas sometimes spills a few words anyway, to run more blocks at once
    (its occupancy heuristic, which no launch option overrides, and which differs between ptxas versions):
    up to 32 bytes of stack pass there."""
    assert results and all(results.values()), results  # every configuration compiled its kernels
    for config, used in results.items():
        for kernel, (shared, registers, stack, _) in used.items():
            spills = stack > (0 if registers >= 255 else 32)
            assert shared <= ARCHS[config[0]] and not spills, (config, kernel, shared, registers, stack)


@slow  # a minute and a half of ptxas on 2 cores, the first time (Triton caches what it compiled)
def test_kernels_compile_for_every_gpu_within_its_shared_memory_and_without_spills():
    # What the interpreter cannot show: each launch the dispatch makes by default on sm_80 .. sm_90 (sm_75 takes
    # the dense path, see the next test) compiles, keeps its tiles in registers and fits the architecture's
    # shared memory; on sm_90 the default blocks of 64 and chunks of 64 take Hopper's wgmma.
    # NANOLONG_COMPILE_ALL=1 checks every configuration the dispatch can launch (305 s on 2 cores: docs/results.md).
    every = os.environ.get("NANOLONG_COMPILE_ALL") == "1"
    if every:  # 305 s on 2 idle cores; over half an hour beside other jobs
        results = compile_for_gpus(all_gpu_configs(), timeout=4 * 3600)
    else:
        results = compile_for_gpus(default_gpu_configs())
    assert_fits(results)
    for kind in ("sparse", "lsh"):
        used = {kernel: u for kernel, u in results[(90, kind, "bfloat16", 64, 64)].items() if "delta" not in kernel}
        assert used and all(wgmma for *_, wgmma in used.values()), used
    print("\n".join(f"{config}: {used}" for config, used in results.items()))


@slow  # under a minute of ptxas on 2 cores
def test_kernel_sweep_settings_compile_for_sm90_within_its_limits():
    # The next GPU run measures bench.SWEEP on sm_90 at the models' default (bf16, D 64, tiles of 64): every
    # setting compiles there, within shared memory and without spills, so none wastes the run's time.
    results = compile_for_gpus([(90, "sparse", "bfloat16", 64, 64, name) for name, _ in bench.SWEEP])
    assert_fits(results)
    print("\n".join(f"{config}: {used}" for config, used in results.items()))


def test_dispatch_refuses_what_does_not_fit_a_gpu_with_a_reason(monkeypatch):
    assert dispatch_unfit(75, "sparse", "float16", 64, 64).startswith("the Triton kernels need sm_80")
    assert dispatch_unfit(75, "lsh", "bfloat16", 64, 64).startswith("the Triton kernels need sm_80")
    assert dispatch_unfit(90, "lsh", "bfloat16", 64, 128).startswith("the LSH Triton kernels take chunks of at most 64")
    assert dispatch_unfit(90, "lsh", "bfloat16", 48, 64).startswith("the LSH Triton kernels take head dims")
    for config in [(arch, kind, dtype, D, size) for arch in ARCHS for kind in ("sparse", "lsh", "lsh-dup-correction")
                   for dtype in DTYPES for D in kernels.TRITON_HEAD_DIMS for size in (16, 32, 64, 128)]:
        reason = dispatch_unfit(*config)
        assert reason is None or (reason.startswith("the ") and "\n" not in reason), (config, reason)
    compiled = os.environ["TRITON_INTERPRET"] != "1"
    if compiled and not torch.cuda.is_available():
        return  # compiled kernels take CUDA tensors only (refused before the arch), and there is no GPU here
    monkeypatch.setattr(kernels, "_arch", lambda device: 75)  # both public functions ask the device's arch
    device = "cuda" if compiled else "cpu"
    q, k, v, _ = (x.to(device) for x in random_inputs(1, 1, 32, 32, 16))
    with pytest.raises(ValueError, match="need sm_80"):
        attention(q, k, v, tile=16, backend="triton")
    with pytest.raises(ValueError, match="need sm_80"):
        lsh_attention(q, k, v, torch.zeros(1, 1, 1, 32, dtype=torch.long, device=device), 8, backend="triton")


def test_backends_are_the_pytorch_ones_on_cpu_and_what_a_kernel_cannot_take_is_refused():
    """CPU tensors take the PyTorch paths, even with the interpreter on: the dense fallback,
    cpu_lsh_attention, AFT's PyTorch sums; a backend asked for by name runs; an unknown one, or a
    shape a kernel cannot take, is refused."""
    q, k, v, _ = random_inputs(1, 1, 32, 32, 16)
    attention(q, k, v, layout=torch.ones(1, 2, 2, dtype=torch.bool), tile=16)
    assert kernels.last_backend == "dense"
    attention(q, k, v, tile=16, backend="triton")
    assert kernels.last_backend == "triton"
    assert kernels.backend_info("cpu") == "attention backend: dense PyTorch fallback (no CUDA device)"
    q, v, buckets = random_lsh_inputs()
    lsh_attention(q, q, v, buckets, 8)
    assert kernels.last_lsh_backend == "cpu"
    lsh_attention(q, q, v, buckets, 8, backend="dense")
    assert kernels.last_lsh_backend == "dense"
    with pytest.raises(ValueError, match="chunks of at most 64"):
        lsh_attention(q, q, v, buckets, 128, backend="triton")
    wide = torch.randn(1, 1, 16, 128)
    with pytest.raises(ValueError, match="in fp32 up to 64"):
        lsh_attention(wide, wide, wide, buckets[:, :1, :, :16], 8, backend="triton")
    with pytest.raises(ValueError, match="unknown LSH attention backend"):
        lsh_attention(q, q, v, buckets, 8, backend="cuda")
    q, k, v, band = aft_kernel_inputs("local", 9)
    assert not aft.kernel_runs(k, None, band)
    with pytest.raises(ValueError, match="unknown AFT backend"):
        aft.aft_simple(q, k, v, backend="cuda")
    with pytest.raises(ValueError, match="feature groups must divide"):
        aft.aft_banded(q, k, v, torch.zeros(3, 9, 2, dtype=torch.float64), backend="triton")
    huge = torch.empty(1, 1, 1, dtype=torch.bfloat16).expand(2**14, 2**9, 2**8)  # 2^31 elements, one stored
    assert "index in 32 bits" in kernels.aft_unfit(None, huge)


def test_layout_index_lists_are_cached_by_content_and_put_the_tiles_the_band_cuts_first():
    # A model's own layout tensor is looked up by identity (its content is not serialised again), a rebuilt one
    # by content; a layout changed in place gets new lists.
    layout = random_layout(2, 64, 64, 16)
    first = kernels.tile_lists(layout, 16, 64, 64, 0, 65, "cpu")
    assert kernels.tile_lists(layout, 16, 64, 64, 0, 65, "cpu") is first
    assert kernels.tile_lists(layout.clone(), 16, 64, 64, 0, 65, "cpu") is first
    assert kernels.tile_lists(~layout, 16, 64, 64, 0, 65, "cpu") is not first
    layout[0] = ~layout[0]
    changed = kernels.tile_lists(layout, 16, 64, 64, 0, 65, "cpu")
    assert changed is not first and not torch.equal(changed[1], first[1])
    # Causal, window 40 (query p sees keys p - 39 .. p), tile 16, T = S = 64: query tile 3 (rows 48..63) sees
    # key tiles 0 and 1 cut by the window (row 63 sees keys from 24 on), 2 whole and 3 cut by the diagonal.
    layout = torch.ones(1, 4, 4, dtype=torch.bool)
    row_ptr, cols, col_ptr, rows, row_mid, col_mid = kernels.tile_lists(layout, 16, 64, 64, 0, 40, "cpu")
    assert cols[row_ptr[3]:row_mid[3]].tolist() == [0, 1, 3] and cols[row_mid[3]:row_ptr[4]].tolist() == [2]
    assert rows[col_ptr[0]:col_mid[0]].tolist() == [0, 2, 3] and rows[col_mid[0]:col_ptr[1]].tolist() == [1]


# ----------------------------------------------------------------------------------------------------------
# GPU tests (skipped without CUDA): every kernel configuration the dispatch launches, compiled and run, against
# the float64 reference, and one training step of every model. The rest of this file runs the kernels in
# Triton's interpreter, so these run on their own: `TRITON_INTERPRET=0 python -m pytest test_all.py -k gpu`.

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available() or os.environ["TRITON_INTERPRET"] == "1",
                               reason="needs a CUDA GPU and compiled kernels: TRITON_INTERPRET=0 pytest -k gpu")
# dtype, and the error a kernel may have where PyTorch's own is near 0: fp32 multiplies in TF32 (10 mantissa
# bits, as fp16) in the kernels and exactly in PyTorch
GPU_DTYPES = {"bf16": (torch.bfloat16, 2e-3), "fp16": (torch.float16, 1e-3), "fp32": (torch.float32, 1e-2)}


@pytest.fixture(scope="module")
def gpu_arch():
    """This GPU's architecture (90 for sm_90), its kernels compiled beforehand in parallel processes (the
    compile check's launches fill Triton's cache), so that the tests below load them instead of compiling
    one after another."""
    major, minor = torch.cuda.get_device_capability()
    arch = 10 * major + minor
    configs = [c for c in all_gpu_configs() if c[0] == arch]
    if configs:
        compile_for_gpus(configs, processes=min(16, os.cpu_count() or 1))
    return arch


def error_vs_float64(fn, ref_fn, inputs, dout):
    """max |fn - ref| over the output and the input gradients, each relative to the reference's largest
    value, with fn on the GPU in the inputs' dtype and ref_fn on the CPU in float64."""
    def output_and_grads(fn, inputs, dout):
        out = fn(*inputs)
        return [out.detach(), *torch.autograd.grad(out, inputs, dout.to(out.dtype))]
    ours = output_and_grads(fn, inputs, dout)
    cpu = [x.detach().cpu().double().requires_grad_() for x in inputs]
    ref = output_and_grads(ref_fn, cpu, dout.cpu().double())
    return max(((a.cpu().double() - b).abs().max() / b.abs().max()).item() for a, b in zip(ours, ref))


def gpu_layouts(nb, heads):
    """The Sparse Transformer's block patterns over nb x nb tiles (stride 2 tiles), and a random one."""
    qb, kb = torch.arange(nb)[:, None], torch.arange(nb)[None, :]
    causal = kb <= qb
    return dict(local=(causal & (qb - kb < 2))[None], strided=(causal & ((qb - kb) % 2 == 0))[None],
                fixed=torch.stack([causal & ((qb // 2 == kb // 2) | (kb % 2 == h % 2)) for h in range(heads)]),
                random=torch.rand(heads, nb, nb, generator=torch.Generator().manual_seed(nb)) < 0.5)


def sparse_gpu_cases(block, heads, T):
    """(name, T, S, attention kwargs): causal and not, with and without windows and layouts."""
    layouts = gpu_layouts(T // block, heads)
    return [("causal", T, T, dict()), ("not-causal-cross", T // 2, T, dict(causal=False)),
            ("window", T, T, dict(window=block + 7)),
            ("local+window", T, T, dict(layout=layouts["local"], window=2 * block)),
            ("strided", T, T, dict(layout=layouts["strided"])), ("fixed-per-head", T, T, dict(layout=layouts["fixed"])),
            ("random-not-causal", T, T, dict(layout=layouts["random"], causal=False))]


@needs_gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("tile", kernels.TRITON_TILES)
def test_gpu_block_sparse_kernel_matches_float64_reference(gpu_arch, dtype, D, tile):
    # Forward and gradients of the compiled kernel within 3x the error of PyTorch's own attention (SDPA) in
    # the same dtype, plus a floor, under every mask kind.
    dtype, floor = GPU_DTYPES[dtype]
    x = torch.empty(1, 1, tile, D, dtype=dtype, device="meta")
    reason = kernels._gpu_unfit(gpu_arch) or kernels._sparse_unfit(gpu_arch, x, x, x, tile)
    if reason:  # the dispatch takes the dense path here
        pytest.skip(reason)
    for name, T, S, mask in sparse_gpu_cases(tile, 2, 4 * max(tile, 64)):
        q, k, v, dout = (x.cuda() for x in random_inputs(2, 2, T, S, D, dtype, seed=tile + D))
        mask = dict(tile=tile, **mask)
        ours = error_vs_float64(lambda q, k, v: attention(q, k, v, backend="triton", **mask),
                                lambda q, k, v: reference(q, k, v, **mask), (q, k, v), dout)
        sdpa = error_vs_float64(lambda q, k, v: attention(q, k, v, backend="dense", **mask),
                                lambda q, k, v: reference(q, k, v, **mask), (q, k, v), dout)
        assert ours <= 3 * sdpa + floor, (name, ours, sdpa)


@needs_gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("chunk", [8, 32, 64])
def test_gpu_lsh_kernel_matches_float64_reference(gpu_arch, dtype, D, chunk):
    # 1 to 4 rounds in every mode the dispatch runs on the kernels, on a length chunk does not divide; the
    # error within 3x that of the dense twin in the same dtype, plus a floor.
    dtype, floor = GPU_DTYPES[dtype]
    modes = [mode for mode in LSH_MODES if not kernels._gpu_unfit(gpu_arch)
             and not kernels._lsh_unfit(gpu_arch, dtype, D, chunk, LSH_MODES[mode].get("dup_correction", False))]
    if not modes:  # the dispatch takes the dense twin here
        pytest.skip(kernels._gpu_unfit(gpu_arch) or kernels._lsh_unfit(gpu_arch, dtype, D, chunk, False))
    T = 6 * chunk + 5
    for R, mode in itertools.product(range(1, 5), modes):
        g = torch.Generator().manual_seed(R)
        q, v, dout = (torch.randn(2, 2, T, D, generator=g).to("cuda", dtype) for _ in range(3))
        buckets = torch.randint(4, (2, 2, R, T), generator=g).cuda()  # buckets longer than a chunk
        k = F.normalize(q.float(), dim=-1).to(dtype)
        q, k, v = (x.requires_grad_() for x in (q, k, v))

        def run(backend):
            return lambda q, k, v: lsh_attention(q, k, v, buckets.to(q.device), chunk, backend=backend,
                                                 **LSH_MODES[mode])
        ours = error_vs_float64(run("triton"), run("dense"), (q, k, v), dout)
        twin = error_vs_float64(run("dense"), run("dense"), (q, k, v), dout)
        assert ours <= 3 * twin + floor, (R, mode, ours, twin)


@needs_gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("case", ["simple", "local", "conv-8-groups"])
def test_gpu_aft_kernels_match_float64_reference(gpu_arch, dtype, case):
    # AFT-local at the models' window of 32 over 1,000 positions (16 chunks, the last cut), keys x10; the error
    # within 3x that of the PyTorch path on the same inputs upcast to float32, plus a 16-bit output's rounding.
    dtype, _ = GPU_DTYPES[dtype]
    g = torch.Generator().manual_seed(len(case))
    q, k, v, dout = (torch.randn(2, 1000, 128, generator=g) for _ in range(4))
    G, s = dict(simple=(1, 0), local=(1, 32)).get(case, (8, 32))
    band = 3 * torch.randn(G, 1000, s, generator=g) if s else None
    inputs = [x.to("cuda", dtype) for x in (q, 10 * k, v)] + ([band.cuda()] if s else [])
    inputs = [x.requires_grad_() for x in inputs]

    def run(backend, upcast=False):
        def mixing(*xs):
            q, k, v, *band = (x.float() if upcast else x for x in xs)
            return aft_mixing(q, k, v, band[0] if band else None, backend)
        return mixing
    ours = error_vs_float64(run("triton"), run("dense"), inputs, dout.cuda())
    twin = error_vs_float64(run("dense", upcast=True), run("dense"), inputs, dout.cuda())
    floor = 1e-4 if dtype == torch.float32 else 5e-3
    assert ours <= 3 * twin + floor, (ours, twin)


@needs_gpu
@pytest.mark.parametrize("name", list(train.MODELS))
def test_gpu_every_model_takes_a_training_step(gpu_arch, name):
    # bf16 autocast as train.py runs it; the attention models take the Triton kernels.
    torch.manual_seed(0)
    config = dict(block_size=256, vocab_size=256, n_layer=2, n_head=4, n_embd=256, dropout=0.0,
                  **train.MODELS[name][2])
    if train.MODELS[name][0] == "sparse_transformer":
        config.update(tile=64, summary=64, n_offsets=2)  # blocks that take wgmma on sm_90
    model = train.build_model(name, config).cuda()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    idx = torch.randint(256, (2, 257), device="cuda")
    kernels.last_backend = kernels.last_lsh_backend = None
    losses = []
    for _ in range(2):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            _, loss = model(idx[:, :-1], idx[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert math.isfinite(losses[0]) and losses[1] < losses[0]  # the step learned something about the batch
    assert all(torch.isfinite(p).all() for p in model.parameters())
    if name in ("transformer", "sparse_strided", "sparse_fixed", "perceiver_ar"):
        assert kernels.last_backend == "triton"
    if name == "reformer":
        assert kernels.last_lsh_backend == "triton"
