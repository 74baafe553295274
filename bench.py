"""
Every speed and memory claim of the README, measured side by side in one run.

    python bench.py --budget 420          # on a GPU: every default stage within 7 minutes; out_bench/
    python bench.py                       # on a CPU: every default stage at tiny sizes (the test suite runs this)
    python bench.py --stages models --lengths 256,1024,4096 --n_layer 2 --n_embd 128 --n_head 4 --batch_size 2
    python bench.py --stages same_budget --seeds 3 --steps 1000 --data text:PATH    # the README's CPU table
    python bench.py --stages attention --out_dir docs/attention     # the README's pictures, with their record

Stages, in the order they run (the first five are the project's GPU targets):
  kernels    block-sparse kernel vs FlexAttention vs dense SDPA on the layouts sparse_transformer.py builds
  lsh        the LSH kernel vs its PyTorch twin: time, peak memory and their largest difference
  reformer   a 6-layer Reformer training step at n = 2^12 .. 2^20, beside the dense Transformer
  aft        AFT-local and AFT-simple vs the Transformer at 4,096 tokens
  perceiver  a Perceiver AR training step at a 65,536-token context with 1,024 latents
  generate   generation tokens/s with and without each model's cache
  memory     the Sparse Transformer post's attention-memory table, from the formula and measured
  models     (on request) training tokens/s and peak memory of every model at several lengths
  reformer_cpu (on request) the Reformer's CPU training step (its two attention paths) beside Perceiver AR's
  same_budget (on request) short training runs of every model under one budget, several seeds
  long_context (on request) every model trained at a long context, bits by position in the window
  recall     (on request) copy accuracy across growing distances, each run trained until it stops improving
  ladder     (on request) the copy task at long distances (1,024 .. 65,536), one recipe, until a rung is missed
  kernel_sweep (on request) the block-sparse kernels' launch settings (bench.SWEEP), one change at a time
  attention  (on request) docs/attention's pictures of what each output depends on, drawn from fresh models

Within --budget seconds: each stage gets a share of the time left (STAGE_WEIGHT), and a cell (one size of one
model) starts only when the stage's time left exceeds an estimate of its cost (4x that model's previous cell,
2x in the kernel stages); the others are printed as skipped. Out-of-memory and errors are table entries.
Each stage prints a markdown table; out_dir/bench.json holds the record (device_record: commit and changed files,
machine, versions, command, seeds) and every figure with its timing repeats, rewritten after every cell, so a run
stopped from outside keeps what it finished.
"""
import argparse
import dataclasses
import functools
import gc
import json
import math
import os
import platform
import resource
import shlex
import subprocess
import sys
import time
import traceback
import warnings
from contextlib import contextmanager, nullcontext

import numpy as np
import torch
import torch.nn.functional as F

warnings.filterwarnings("ignore", "flex_attention called without torch.compile")  # the CPU run uses it eagerly

import kernels
import reformer
import sample
import sparse_transformer as st
import train

GPU_STAGES = ("kernels", "lsh", "reformer", "aft", "perceiver")
DEFAULT_STAGES = GPU_STAGES + ("generate", "memory")
ALL_STAGES = DEFAULT_STAGES + ("models", "reformer_cpu", "same_budget", "long_context", "recall", "ladder",
                               "kernel_sweep", "attention")

# Sizes per stage: what the targets name on a GPU, and tiny ones that run everything quickly on a CPU.
SIZES = {
    "gpu": dict(attn=dict(B=2, H=8, D=64, tile=64, lengths=(16384, 65536), band=256),
                lsh=dict(B=1, H=8, D=64, T=65536, n_hashes=4, chunk=64),
                reformer=dict(lengths=tuple(2**k for k in range(12, 21)), n_layer=6, n_embd=256, n_head=4),
                aft=dict(T=4096, batch=4, n_layer=12, n_embd=512, n_head=8),
                perceiver=dict(T=65536, n_latents=1024, n_layer=6, n_embd=512, n_head=8),
                generate=dict(lengths=(4096,), new=256, n_layer=6, n_embd=512, n_head=8, batch=1)),
    "cpu": dict(attn=dict(B=1, H=2, D=16, tile=16, lengths=(128,), band=32),
                lsh=dict(B=1, H=2, D=16, T=128, n_hashes=2, chunk=16),
                reformer=dict(lengths=(64, 128), n_layer=2, n_embd=32, n_head=2),
                aft=dict(T=128, batch=2, n_layer=2, n_embd=32, n_head=2),
                perceiver=dict(T=256, n_latents=32, n_layer=2, n_embd=32, n_head=2),
                generate=dict(lengths=(64,), new=4, n_layer=2, n_embd=32, n_head=2, batch=1)),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stages", default=",".join(DEFAULT_STAGES), help=f"comma-separated, from: {', '.join(ALL_STAGES)}")
    p.add_argument("--budget", type=float, default=420.0, help="seconds for the whole run (default 420)")
    p.add_argument("--device", default="auto", help="auto (the GPU when there is one), cpu, cuda, cuda:1, ...")
    p.add_argument("--out_dir", default="out_bench", help="where bench.json and bench.md go")
    p.add_argument("--tiny", action="store_true", help="the CPU sizes on any device (a quick smoke run)")
    g = p.add_argument_group("models, generate and same_budget stages")
    g.add_argument("--models", default=",".join(train.MODELS), help="comma-separated model names")
    g.add_argument("--lengths", default="1024,4096,16384,65536", help="models stage: context lengths")
    g.add_argument("--n_layer", type=int, default=4)
    g.add_argument("--n_head", type=int, default=4)
    g.add_argument("--n_embd", type=int, default=256)
    g.add_argument("--batch_size", type=int, default=2)
    g.add_argument("--steps", type=int, default=1000, help="same_budget: optimizer steps per run")
    g.add_argument("--seeds", type=int, default=3, help="same_budget: runs per model (seeds 1..N)")
    g.add_argument("--data", default="enwik8", help="same_budget: the --data of train.py")
    g.add_argument("--distances", default="128,256,512,1024", help="recall: copy distances d (block size 2d)")
    g.add_argument("--recall_cap", type=int, default=2000, help="recall: most optimizer steps per run")
    g.add_argument("--recall_check", type=int, default=100, help="recall: steps between accuracy checks")
    g.add_argument("--recall_patience", type=int, default=5,
                   help="recall: checks without progress before a run stops (a large value runs to the cap)")
    g.add_argument("--recall_layers", type=int, default=2,
                   help="recall: blocks per model (Perceiver AR: its cross-attention block counts as one)")
    g.add_argument("--context", type=int, default=2048, help="long_context: the context length")
    g.add_argument("--ladder_cap", type=int, default=4000, help="ladder: most optimizer steps per distance")
    g.add_argument("--ladder_check", type=int, default=250, help="ladder: steps between accuracy checks")
    g.add_argument("--ladder_minutes", type=float, default=60.0, help="ladder: most training minutes per distance")
    g.add_argument("--ladder_tokens", type=int, default=32768,
                   help="ladder: tokens per step; batch = tokens / 2d, between 1 and 8 sequences")
    g.add_argument("--ladder_flags", default="", help="ladder: train.py flags added to the recipe (LADDER), e.g. "
                   "'--n_embd 128 --rotary_base 0'")
    args = p.parse_args(argv)
    bad = lambda flag, why: p.error(f"--{flag} {getattr(args, flag)!r}: {why}")
    stages = args.stages.split(",")
    if any(s not in ALL_STAGES for s in stages):
        bad("stages", f"choose from {', '.join(ALL_STAGES)}")
    if any(m not in train.MODELS for m in args.models.split(",")):
        bad("models", f"choose from {', '.join(train.MODELS)}")
    for flag in ("lengths", "distances"):
        if not all(n.isdigit() and int(n) > 0 for n in getattr(args, flag).split(",")):
            bad(flag, "give positive integers separated by commas, e.g. 1024,4096")
    for flag in ("budget", "n_layer", "n_head", "n_embd", "batch_size", "steps", "seeds", "recall_cap", "recall_check",
                 "recall_patience", "recall_layers", "context", "ladder_cap", "ladder_check", "ladder_minutes",
                 "ladder_tokens"):
        if getattr(args, flag) <= 0:
            bad(flag, "must be positive")
    args.stages, args.models = stages, args.models.split(",")
    args.lengths = [int(n) for n in args.lengths.split(",")]
    args.distances = [int(n) for n in args.distances.split(",")]
    try:  # last: it makes the folder
        train.check_out_dir(args.out_dir)
    except ValueError as e:
        p.error(str(e))
    return args


# ----------------------------------------------------------------------------------------------------------
# Measuring: time per call, peak memory, out-of-memory as a result, the budget

DEADLINE = math.inf  # time.time() by which the run must end; set by main()
STAGE_DEADLINE = math.inf  # by which the running stage must end: its share of the time left, set by main()
SAVE_CELLS = None  # main's: records the running stage's cells so far, so a run killed mid-stage keeps them
# Shares of the time left: a stage gets weight / (sum of the weights of it and the stages after it), so an early
# stage cannot starve the later ones, and what a stage leaves unused goes to those after it.
STAGE_WEIGHT = dict(kernels=5, kernel_sweep=3, reformer=2)  # the others 1


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


TIMINGS = []  # every timed() and host_us() of the run: {"ms" or "us": the figure, "repeats": each loop's}


def timed(fn, device, warm_up=True, repeats=3):
    """Mean milliseconds per call of fn(): one warm-up call (compilation, autotuning; warm_up=False when the
    caller made it), one call to size the loops, then `repeats` loops of calls that together fill about half a
    second on a GPU (a few calls on a CPU); a call of a quarter second or more is timed once (one repeat). Each
    loop's mean is kept in TIMINGS, which attempt() files with the cell, so the record holds the spread."""
    if warm_up:
        fn()
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    once = time.perf_counter() - t0
    times = [1000 * once]
    if once < 0.25:
        n = max(1, min(50, int((0.5 if device.type == "cuda" else 0.05) / max(once, 1e-9))) // repeats)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            sync(device)
            times.append(1000 * (time.perf_counter() - t0) / n)
    TIMINGS.append(dict(ms=sum(times) / len(times), repeats=times))
    return TIMINGS[-1]["ms"]


def peak_gib(fn, device, above=0):
    """Peak GPU memory (GiB) while fn() runs, less `above` bytes; None on a CPU, where the allocator reuses memory
    freed earlier without the process's resident size showing it, so no honest peak can be read."""
    if device.type != "cuda":
        fn()
        return None
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    sync(device)
    return (torch.cuda.max_memory_allocated(device) - above) / 2**30


def failure(error):
    """The status a table shows for an exception. A ValueError is a setting refused with its reason (a model's
    own check, as a stride that cannot tile the length): "refused: its sentence", no traceback. Anything else
    was not anticipated: its traceback is printed, and the status is "error: Type: first line of the message"."""
    if isinstance(error, ValueError):
        return f"refused: {(str(error).splitlines() or ['ValueError'])[0]}"
    traceback.print_exc()
    return f"error: {type(error).__name__}: {(str(error).splitlines() or [''])[0][:160]}"


def attempt(cell):
    """cell() -> dict of figures, {"status": "OOM"} when the device runs out of memory, or the status failure()
    gives any other exception: a GPU is lent for minutes, so one failing cell must not cost the others. An ok
    cell also holds `timings`: the TIMINGS its figures came from, each with its repeats."""
    first = len(TIMINGS)
    try:
        row = {"status": "ok", **cell()}
        return {**row, "timings": TIMINGS[first:]} if len(TIMINGS) > first else row
    except torch.cuda.OutOfMemoryError:
        return {"status": "OOM"}
    except Exception as e:
        if "can't allocate memory" in str(e):  # the CPU allocator's out-of-memory is a plain RuntimeError
            return {"status": "OOM"}
        return {"status": failure(e)}
    finally:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def run_cells(cells, first_guess, growth=4):
    """Run (label, cell) pairs in order while the stage's time lasts: a cell starts only if `growth` times the
    time of the previous cell of the same model (first_guess seconds for the first) fits before the stage's
    deadline; 4 for cells that grow (a doubled length), less where the next is about as costly. Returns one dict
    per cell."""
    results, estimates = [], {}
    for label, cell in cells:
        estimate = estimates.get(label.get("model"), first_guess)
        if time.time() + estimate > STAGE_DEADLINE:
            results.append({**label, "status": f"skipped: budget (needs ~{estimate:.0f} s)"})
            print(f"  {label}: skipped, ~{estimate:.0f} s would overrun the budget")
            continue
        t0 = time.time()
        results.append({**label, **attempt(cell)})
        estimates[label.get("model")] = growth * (time.time() - t0)
        print(f"  {label}: {results[-1]['status']} ({time.time() - t0:.1f} s)")
        if SAVE_CELLS:
            SAVE_CELLS(results)
    return results


def markdown(rows, columns):
    """rows (dicts) -> a markdown table of `columns` (header, key, format); absent or None figures print -, but
    the first of a row that failed or was skipped says why (its status), once."""
    def cells(row):
        said = row.get("status", "ok") == "ok"
        for _, key, fmt in columns:
            value = row.get(key)
            if value is not None:
                yield format(value, fmt)
            else:
                yield "-" if said else row["status"]
                said = True
    lines = ["| " + " | ".join(c[0] for c in columns) + " |", "|" + "---|" * len(columns)]
    return "\n".join(lines + ["| " + " | ".join(cells(r)) + " |" for r in rows])


TABLES = []  # every table printed in this run, for bench.md


def show(title, rows, columns):
    """Print a table under its title and keep it for bench.md."""
    TABLES.append(f"{title}\n\n{markdown(rows, columns)}")
    print(f"\n{TABLES[-1]}")


def autocast(device):
    """bf16 autocast on GPUs that have it (the targets' setting), float32 on a CPU."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def build(name, **settings):
    """Model `name` of train.MODELS with the given Config settings, byte vocabulary, no dropout."""
    return train.build_model(name, {"vocab_size": 256, **settings})


def training_step(name, batch, T, device, **settings):
    """A cell: step time, tokens/s and peak memory of one AdamW training step of model `name` at length T."""
    def cell():
        model = build(name, block_size=T, **settings).to(device)
        optimizer = train.configure_optimizers(model, 0.1, 1e-4, (0.9, 0.95), device.type)
        x = torch.randint(0, 256, (batch, T), device=device)

        def step():
            with autocast(device):
                loss = model(x, x)[1]
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        peak = peak_gib(step, device)  # the first step: the optimizer's state is allocated, as in every run
        ms = timed(step, device, warm_up=False)
        return dict(params_m=sum(p.numel() for p in model.parameters()) / 1e6, step_ms=ms,
                    tokens_per_s=batch * T / ms * 1000, peak_gib=peak)
    return cell


# ----------------------------------------------------------------------------------------------------------
# Stage kernels: the block-sparse kernel vs FlexAttention vs dense SDPA

def model_layouts(n, tile, band, H):
    """The layouts sparse_transformer.py builds at length n, as (name, layout, window, mask_mod): the local band
    (A1 of strided, window `band`), A2 of strided on the transposed order (its own stride l ~ sqrt(n)), and fixed
    (A1 u A2 merged, stride `band`, summary one tile, per-head summary offsets). mask_mod is the same pattern as
    FlexAttention's users write it, arithmetic on the positions of the order the kernel sees; a test holds it
    equal to kernels.attention_mask of the layout and window."""
    local = st.Config(block_size=n, n_head=H, pattern="local", stride=band, tile=tile)
    strided = st.Config(block_size=n, n_head=H, pattern="strided", tile=tile)
    strided.stride = st.auto_stride(strided)
    fixed = st.Config(block_size=n, n_head=H, pattern="fixed", combine="merged", stride=band, summary=tile,
                      n_offsets=min(4, band // tile), tile=tile)
    run = n // strided.stride  # the transposed order: each residue class mod l is a run of n/l positions
    l, c, n_offsets = fixed.stride, fixed.summary, fixed.n_offsets

    def local_mod(b, h, q_idx, kv_idx):  # the last `band` positions
        return (kv_idx <= q_idx) & (q_idx - kv_idx < band)

    def strided_mod(b, h, q_idx, kv_idx):  # causal inside each run
        return (kv_idx <= q_idx) & (q_idx // run == kv_idx // run)

    def fixed_mod(b, h, q_idx, kv_idx):  # the query's own block of l, or head h's c summary columns of every block
        offset = (h % n_offsets) * c
        summary = (kv_idx % l >= l - c - offset) & (kv_idx % l < l - offset)
        return (kv_idx <= q_idx) & ((q_idx // l == kv_idx // l) | summary)
    return [("local", st.layer_layout(local, 0, "local", n), band, local_mod),
            (f"strided (l={strided.stride})", st.layer_layout(strided, 1, "strided", n), None, strided_mod),
            ("fixed", st.layer_layout(fixed, 0, "fixed", n), None, fixed_mod)]


def flex_block_mask(layout, tile, n, window, device, flex_block=128):
    """FlexAttention's BlockMask for what `attention(layout=layout, window=window)` computes, in Flex's own blocks
    of `flex_block` positions (its default, 128): a block is full where all its tiles of the layout are visible
    and uncut by the causal or window edge, partial (masked element by element) where some are visible.

    Blocks of 128, not the layout's 64: Flex's sm_90 backward for head dim 64 (torch 2.11) tiles by 128 and takes
    only masks whose blocks its tiles divide; a 64-block mask failed to compile on an H100 whatever the
    kernel_options (inductor filters its configurations by its default tiles, not by those options)."""
    from torch.nn.attention.flex_attention import BlockMask
    nb, f = n // tile, max(1, flex_block // tile)
    first = torch.arange(nb, device=device) * tile  # first position of each tile row / column
    q_lo, k_lo = first[:, None], first[None, :]
    w = n + 1 if window is None else window
    inside = (k_lo <= q_lo + tile - 1) & (k_lo + tile - 1 > q_lo - w)  # the band touches the tile
    cut = (k_lo + tile - 1 > q_lo) | (k_lo <= q_lo + tile - 1 - w)  # the band's edge crosses it
    visible = layout.to(device) & inside  # (H or 1, nb, nb)

    def coarse(tiles, reduce):  # (H', nb, nb) -> (H', nb / f, nb / f): each f x f group of tiles reduced
        return reduce(reduce(tiles.view(tiles.size(0), nb // f, f, nb // f, f), dim=4), dim=2)

    def kv_lists(blocks):  # (H', m, m) -> counts (1, H', m), indices (1, H', m, m), listed blocks first
        order = torch.argsort(blocks.to(torch.int8), dim=-1, descending=True, stable=True)
        return blocks.sum(-1, dtype=torch.int32)[None], order.to(torch.int32)[None]

    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (kv_idx > q_idx - w) & visible[h % visible.size(0), q_idx // tile,
                                                                   kv_idx // tile]

    full = coarse(visible & ~cut, torch.all)
    partial, full = kv_lists(coarse(visible, torch.any) & ~full), kv_lists(full)
    return BlockMask.from_kv_blocks(*partial, full_kv_num_blocks=full[0], full_kv_indices=full[1],
                                    BLOCK_SIZE=tile * f, mask_mod=mask_mod)


def flex_mask(mask_mod, heads, n, device):
    """FlexAttention's BlockMask of mask_mod as its users build it: create_block_mask at its default block size
    (128) for 1 (broadcast) or H heads; on a GPU compiled, as torch advises (eager, it materialises the whole
    (heads, n, n) mask: 34 GB of bools for 8 heads at 65,536)."""
    from torch.nn.attention.flex_attention import create_block_mask
    build = torch.compile(create_block_mask) if device.type == "cuda" else create_block_mask
    return build(mask_mod, None, heads, n, n, device=device)


def host_us(fn, calls=20, repeats=25):
    """Host microseconds per fn() with every Triton launch stubbed out: what a call costs the CPU before its kernels
    start, the bound on short calls. The fastest of `repeats` loops of `calls`: short loops, so that on a busy
    machine some run undisturbed. `TRITON_INTERPRET=1 python bench.py --stages kernels --device cpu` prints it for the CPU."""
    from triton.runtime.jit import KernelInterface  # JIT and interpreted kernels alike launch by kernel[grid]
    launch = KernelInterface.__getitem__
    KernelInterface.__getitem__ = lambda kernel, grid: lambda *args, **kwargs: None
    try:
        fn()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            times.append(1e6 * (time.perf_counter() - t0) / calls)
        TIMINGS.append(dict(us=min(times), repeats=times))
        return min(times)
    finally:
        KernelInterface.__getitem__ = launch


def stage_kernels(sizes, device, best=None):
    """fwd and fwd+bwd ms of the three implementations on each layout; TFLOP/s over the computed tiles (4 D
    flops per score for q k^T and p v; the backward does 2.5x that), our time over Flex's, max |ours - Flex|, and
    the host time of our call (host_us). Flex gets each pattern as its users write it (model_layouts' mask_mod,
    flex_mask); beside it, as an extra column, Flex given our layout as a table it reads per element
    (flex_block_mask), measured after every layout's other figures (the GPU run's time goes to those first).
    Every ratio is to the first. best: (name, launch_overrides settings) from sweep_best, our kernels measured
    again under them (the best_ figures)."""
    c = sizes["attn"]
    B, H, D, tile = c["B"], c["H"], c["D"], c["tile"]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    ours_runs = kernels.triton is not None and (device.type == "cuda" or interpreted)
    flex = None
    try:
        from torch.nn.attention.flex_attention import flex_attention
        flex = torch.compile(flex_attention, dynamic=False) if device.type == "cuda" else flex_attention
    except ImportError:
        pass

    def measure(fn, q, k, v, do, backward=True):
        """(output, fwd ms, fwd+bwd ms, peak GiB above the inputs); without backward only the first two."""
        if not backward:
            q, k, v = q.detach(), k.detach(), v.detach()
        with torch.no_grad():
            out = fn(q, k, v)
            fwd = timed(lambda: fn(q, k, v), device)
        if not backward:
            return out, fwd, None, None
        both = timed(lambda: torch.autograd.grad(fn(q, k, v), (q, k, v), do), device)
        peak = peak_gib(lambda: torch.autograd.grad(fn(q, k, v), (q, k, v), do), device,
                        above=torch.cuda.memory_allocated(device) if device.type == "cuda" else 0)
        return out, fwd, both, peak

    def inputs(n):
        g = torch.Generator(device=device).manual_seed(0)
        q, k, v, do = (torch.randn(B, H, n, D, device=device, dtype=dtype, generator=g) for _ in range(4))
        return [t.requires_grad_() for t in (q, k, v)] + [do]

    def flex_figures(make_mask, q, k, v, do):
        """{out, fwd_ms, fb_ms, peak_gib} of compiled Flex with the BlockMask make_mask() builds."""
        torch._dynamo.reset()  # each cell compiles its own: past dynamo's recompile limit Flex runs eagerly
        mask = make_mask()
        # FlexAttention has no backward on a CPU: there it is timed forward only
        figures = measure(lambda q, k, v: flex(q, k, v, block_mask=mask), q, k, v, do, backward=device.type == "cuda")
        return dict(zip(("out", "fwd_ms", "fb_ms", "peak_gib"), figures))

    def cell(n, name, layout, window, mask_mod):
        def run():
            q, k, v, do = inputs(n)
            tiles = kernels.tile_lists(layout, tile, n, n, 0, n + 1 if window is None else window, device)[1]
            flops = 4.0 * B * D * tile * tile * tiles.numel() * (H // layout.size(0))  # tiles are per layout head
            row = dict(tiles_pct=100 * tiles.numel() / (layout.size(0) * (n // tile) ** 2))
            ours = theirs = None
            if ours_runs:
                def call(q, k, v):
                    return kernels.attention(q, k, v, layout=layout, tile=tile, window=window, backend="triton")
                ours = measure(call, q, k, v, do)
                row.update(ours_fwd_ms=ours[1], ours_fb_ms=ours[2], ours_peak_gib=ours[3],
                           ours_fwd_tflops=flops / ours[1] / 1e9, ours_fb_tflops=3.5 * flops / ours[2] / 1e9,
                           fb_vs_fwd=ours[2] / ours[1], host_grad_us=host_us(lambda: call(q, k, v)))
                with torch.no_grad():
                    row["host_us"] = host_us(lambda: call(q, k, v))
                if best:
                    with launch_overrides(**best[1]):
                        out, fwd_ms, fb_ms, _ = measure(call, q, k, v, do)
                    row.update(best_fwd_ms=fwd_ms, best_fb_ms=fb_ms, best_fwd_tflops=flops / fwd_ms / 1e9,
                               best_fb_vs_fwd=fb_ms / fwd_ms, best_vs_default=(out.float() - ours[0].float()).abs()
                               .max().item())
            if flex is not None:
                figures = attempt(lambda: flex_figures(lambda: flex_mask(mask_mod, layout.size(0), n, device),
                                                       q, k, v, do))  # a failing Flex costs no other figure
                status, theirs = figures.pop("status"), figures.pop("out", None)
                row.update({f"flex_{key}": value for key, value in figures.items()})
                if status != "ok":
                    row["flex_status"] = status
            if ours and theirs is not None:
                row["max_diff"] = (ours[0].float() - theirs.float()).abs().max().item()
                row["fwd_vs_flex"] = ours[1] / row["flex_fwd_ms"]
                if row["flex_fb_ms"]:
                    row["fb_vs_flex"] = ours[2] / row["flex_fb_ms"]
                    if best:
                        row["best_fb_vs_flex"] = row["best_fb_ms"] / row["flex_fb_ms"]
            if name == "local":  # the dense reference once per length, beside the first layout
                sdpa = measure(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True), q, k, v, do)
                row.update(sdpa_fwd_ms=sdpa[1], sdpa_fb_ms=sdpa[2], sdpa_peak_gib=sdpa[3],
                           sdpa_fwd_tflops=2.0 * B * H * D * n * n / sdpa[1] / 1e9)
            return row
        return run

    def table_cell(n, layout, window):
        def run():
            figures = flex_figures(lambda: flex_block_mask(layout, tile, n, window, device), *inputs(n))
            return {f"table_{key}": value for key, value in figures.items() if key != "out"}
        return run

    layouts = [(n, *spec) for n in c["lengths"] for spec in model_layouts(n, tile, c["band"], H)]
    cells = [({"n": n, "layout": name}, cell(n, name, layout, window, mask_mod))
             for n, name, layout, window, mask_mod in layouts]
    if flex is not None:
        cells += [({"n": n, "layout": name, "flex": "table"}, table_cell(n, layout, window))
                  for n, name, layout, window, _ in layouts]
    rows = run_cells(cells, first_guess=60 if device.type == "cuda" else 1, growth=2)
    rows, tables = rows[:len(layouts)], rows[len(layouts):]
    for row, table in zip(rows, tables):  # the table Flex's figures join their layout's row
        status = table.pop("status")
        row.update({("table_" if key == "timings" else "") + key: value for key, value in table.items()
                    if key.startswith("table_") or key == "timings"})
        if status != "ok":
            row["table_status"] = status
    note = "" if ours_runs else " (our kernel: n/a without CUDA; TRITON_INTERPRET=1 runs it on the interpreter)"
    compiled = " and torch.compile" if device.type == "cuda" else ""
    chosen = f"best: ours with the kernel sweep's best setting in this run ({best[0]}); " if best else ""
    show(f"Block-sparse attention, B={B} H={H} D={D} {str(dtype)[6:]}, tiles of {tile}{note}; ms per call, "
         f"TFLOP/s over the computed tiles, peak GiB above the inputs during fwd+bwd; flex: FlexAttention with the "
         f"arithmetic mask_mod through create_block_mask (blocks of 128){compiled}, every ratio to it; flex (table): "
         f"with our layout read per element; {chosen}host us: Python time per call, launches stubbed, without and "
         f"with gradients", rows,
         [("n", "n", ""), ("layout", "layout", ""), ("tiles %", "tiles_pct", ".1f"),
          ("ours fwd", "ours_fwd_ms", ".3f"), ("TF/s", "ours_fwd_tflops", ".0f"), ("ours f+b", "ours_fb_ms", ".3f"),
          ("TF/s", "ours_fb_tflops", ".0f"), ("f+b / fwd", "fb_vs_fwd", ".1f"), ("flex fwd", "flex_fwd_ms", ".3f"),
          ("flex f+b", "flex_fb_ms", ".3f"), ("fwd / flex", "fwd_vs_flex", ".2f"),
          ("f+b / flex", "fb_vs_flex", ".2f"),
          ("best fwd", "best_fwd_ms", ".3f"), ("TF/s", "best_fwd_tflops", ".0f"), ("best f+b", "best_fb_ms", ".3f"),
          ("best f+b / fwd", "best_fb_vs_fwd", ".1f"), ("best f+b / flex", "best_fb_vs_flex", ".2f"),
          ("best vs ours", "best_vs_default", ".1e"),
          ("flex (table) fwd", "table_fwd_ms", ".3f"), ("flex (table) f+b", "table_fb_ms", ".3f"),
          ("ours GiB", "ours_peak_gib", ".2f"), ("flex GiB", "flex_peak_gib", ".2f"),
          ("SDPA fwd", "sdpa_fwd_ms", ".3f"),
          ("SDPA TF/s", "sdpa_fwd_tflops", ".0f"), ("SDPA f+b", "sdpa_fb_ms", ".3f"), ("host us", "host_us", ".0f"),
          ("host us (grad)", "host_grad_us", ".0f"), ("max diff", "max_diff", ".1e"),
          ("flex failed", "flex_status", ""), ("flex (table) failed", "table_status", "")])
    return rows


# ----------------------------------------------------------------------------------------------------------
# Stage kernel_sweep: the block-sparse kernels' launch settings, one change at a time

@contextmanager
def launch_overrides(**settings):
    """Inside the with statement, the given settings replace the launch settings kernels.py
    chooses, per kernel: "fwd", "dkdv" and "dq" (the block-sparse kernels; kernels.launch_config
    says what each setting is) and "lsh" (the three LSH kernels; kernels.lsh_launch_config), e.g.
    launch_overrides(dkdv=dict(num_warps=4), dq=dict(TILE_N=32)). It swaps kernels' config
    functions for ones that override them. For the sweep and the tests; a setting the GPU cannot
    compile fails at the launch."""
    names = ("TILE_M", "TILE_N", "num_warps", "num_stages")
    overridable = dict(fwd=names, dkdv=names, dq=names, lsh=names[1:])
    for kernel, chosen in settings.items():
        if kernel not in overridable or set(chosen) - set(overridable[kernel]):
            raise ValueError(f"launch_overrides takes {overridable} (kernel: settings), "
                             f"got {kernel}={chosen}")
    sparse_config, lsh_config = kernels.launch_config, kernels.lsh_launch_config

    def sparse_overridden(tile, *args):
        cfg = {kernel: {**chosen, **settings.get(kernel, {})}
               for kernel, chosen in sparse_config(tile, *args).items()}
        widths = [c[side] for c in cfg.values() for side in ("TILE_M", "TILE_N")]
        if any(tile % width or width < 16 for width in widths):
            raise ValueError(f"block-sparse programs' rows and sub-tiles must divide tile={tile} "
                             f"and be at least 16 wide; got {cfg}")
        return cfg

    kernels.launch_config = sparse_overridden
    kernels.lsh_launch_config = lambda *args: {**lsh_config(*args), **settings.get("lsh", {})}
    try:
        yield
    finally:
        kernels.launch_config, kernels.lsh_launch_config = sparse_config, lsh_config


# (name, launch_overrides settings), most promising first (a run short of time measures the head of the
# list). The defaults (launch_config; on sm_90 for bf16, D 64, tiles of 64: fwd 64 rows x 64-wide sub-tiles,
# 4 warps; dK/dV and dQ 64 rows x 64, 8 warps; 3 stages each), then the suspects of the backward's slow pace
# (issue 26): 8 warps splitting 64-row tiles between two warp groups, pipelines deeper than the 2-5 tiles a
# row's list holds, tile shapes. Settings that change the kernels' code (programs over several tiles, one
# masked loop, dq by atomic adds) left with the code: commit fe3965d (tag kernels-sweep-options), docs/kernels.md.
SWEEP = [
    ("default", {}),
    ("bwd 4 warps", dict(dkdv=dict(num_warps=4), dq=dict(num_warps=4))),
    ("dkdv 4 warps", dict(dkdv=dict(num_warps=4))),
    ("dq 4 warps", dict(dq=dict(num_warps=4))),
    ("bwd 2 stages", dict(dkdv=dict(num_stages=2), dq=dict(num_stages=2))),
    ("bwd 4 warps, 2 stages", dict(dkdv=dict(num_warps=4, num_stages=2), dq=dict(num_warps=4, num_stages=2))),
    ("bwd 32-wide sub-tiles, 4 warps", dict(dkdv=dict(TILE_M=32, num_warps=4), dq=dict(TILE_N=32, num_warps=4))),
    ("fwd 8 warps", dict(fwd=dict(num_warps=8))),
    ("fwd 2 stages", dict(fwd=dict(num_stages=2))),
    ("fwd 32-wide sub-tiles", dict(fwd=dict(TILE_N=32))),
    ("bwd 32-row programs, 4 warps", dict(dkdv=dict(TILE_N=32, num_warps=4), dq=dict(TILE_M=32, num_warps=4))),
    ("bwd 4 warps, 1 stage", dict(dkdv=dict(num_warps=4, num_stages=1), dq=dict(num_warps=4, num_stages=1))),
]


def stage_kernel_sweep(sizes, device):
    """Every SWEEP setting on the layouts the targets name (local and fixed at the longest length, strided at the
    shortest): fwd and fwd+bwd ms and TFLOP/s as in stage_kernels, and the largest difference of the output and
    gradients from the first (default) setting's, where a wrong tile setting would show."""
    c = sizes["attn"]
    B, H, D, tile = c["B"], c["H"], c["D"], c["tile"]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if kernels.triton is None or not (device.type == "cuda" or kernels.INTERPRETED):
        raise ValueError("the kernel sweep needs triton and a GPU (or TRITON_INTERPRET=1 for the interpreter)")
    short, long = min(c["lengths"]), max(c["lengths"])
    cases = [(n, name, layout, window) for n in sorted({short, long})
             for name, layout, window, _ in model_layouts(n, tile, c["band"], H)
             if short == long or name.startswith("strided") == (n == short)]
    inputs, defaults = {}, {}

    def cell(setting, n, name, layout, window):
        def run():
            if n not in inputs:  # one set per length, shared by every setting
                g = torch.Generator(device=device).manual_seed(0)
                inputs[n] = [torch.randn(B, H, n, D, device=device, dtype=dtype, generator=g) for _ in range(4)]
            *qkv, do = inputs[n]
            q, k, v = (t.requires_grad_() for t in qkv)
            tiles = kernels.tile_lists(layout, tile, n, n, 0, n + 1 if window is None else window, device)[1]
            flops = 4.0 * B * D * tile * tile * tiles.numel() * (H // layout.size(0))

            def fwd():
                return kernels.attention(q, k, v, layout=layout, tile=tile, window=window, backend="triton")
            with launch_overrides(**dict(SWEEP)[setting]):
                results = [fwd().detach(), *torch.autograd.grad(fwd(), (q, k, v), do)]  # compiles the setting
                with torch.no_grad():
                    fwd_ms = timed(fwd, device, warm_up=False)
                fb_ms = timed(lambda: torch.autograd.grad(fwd(), (q, k, v), do), device, warm_up=False)
            reference = defaults.setdefault((n, name), results)
            return dict(fwd_ms=fwd_ms, fwd_tflops=flops / fwd_ms / 1e9, fb_ms=fb_ms,
                        fb_tflops=3.5 * flops / fb_ms / 1e9, fb_vs_fwd=fb_ms / fwd_ms,
                        max_diff=max((a.float() - b.float()).abs().max().item() for a, b in zip(results, reference)))
        return run

    rows = run_cells([({"setting": setting, "n": n, "layout": name}, cell(setting, n, name, layout, window))
                      for setting, _ in SWEEP for n, name, layout, window in cases],
                     first_guess=20 if device.type == "cuda" else 1, growth=2)
    show(f"Kernel launch settings, B={B} H={H} D={D} {str(dtype)[6:]}, tiles of {tile} (launch_overrides; "
         f"bench.SWEEP says what each changes); ms per call, TFLOP/s over the computed tiles; max diff: output and "
         f"gradients against the default setting's", rows,
         [("setting", "setting", ""), ("n", "n", ""), ("layout", "layout", ""), ("fwd ms", "fwd_ms", ".3f"),
          ("TF/s", "fwd_tflops", ".0f"), ("f+b ms", "fb_ms", ".3f"), ("TF/s", "fb_tflops", ".0f"),
          ("f+b / fwd", "fb_vs_fwd", ".1f"), ("max diff", "max_diff", ".1e")])
    return rows


def sweep_best(rows, gain=0.97):
    """The sweep's best setting, as (name, launch_overrides settings), or None when none beats the
    default: the forward's best (by fwd time) merged with the backward's (by fwd+bwd time), each among the
    settings that change only that side's kernels and were measured on every layout, its time under `gain`
    times the default's in the geometric mean over the layouts (closer is noise) and over 1 / gain times it on
    none (a default for every layout must slow none). The kernels stage measures it beside the default, so a new
    default comes from the run that chose it."""
    ok = [r for r in rows or [] if r.get("status") == "ok"]
    default = {(r["n"], r["layout"]): r for r in ok if r["setting"] == "default"}
    if not default:
        return None
    best = {}  # side -> (name, settings, time ratio to the default)
    for side, side_kernels, figure in (("fwd", {"fwd"}, "fwd_ms"), ("bwd", {"dq", "dkdv"}, "fb_ms")):
        for name, settings in SWEEP:
            mine = {(r["n"], r["layout"]): r for r in ok if r["setting"] == name}
            if not settings or set(settings) - side_kernels or set(mine) != set(default):
                continue
            ratios = [mine[c][figure] / default[c][figure] for c in default]
            ratio = math.exp(sum(map(math.log, ratios)) / len(ratios))  # the geometric mean
            if ratio < best.get(side, (None, None, gain))[2] and max(ratios) <= 1 / gain:
                best[side] = (name, settings, ratio)
    if not best:
        return None
    return " + ".join(name for name, _, _ in best.values()), {k: v for _, s, _ in best.values() for k, v in s.items()}


# ----------------------------------------------------------------------------------------------------------
# Stage lsh: the LSH kernel vs its PyTorch twin

def stage_lsh(sizes, device):
    c = sizes["lsh"]
    B, H, D, T, R, chunk = c["B"], c["H"], c["D"], c["T"], c["n_hashes"], c["chunk"]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    backends = ["dense"] + (["triton"] if kernels.triton is not None and (device.type == "cuda" or interpreted)
                            else [])

    def cell(backend):
        def run():
            g = torch.Generator(device=device).manual_seed(0)
            q, v, do = (torch.randn(B, H, T, D, device=device, dtype=dtype, generator=g) for _ in range(3))
            q, v = q.requires_grad_(), v.requires_grad_()
            buckets = torch.randint(2 * T // chunk, (B, H, R, T), device=device, generator=g)

            def fwd():
                return kernels.lsh_attention(q, F.normalize(q, dim=-1), v, buckets, chunk, backend=backend)

            def both():
                return torch.autograd.grad(fwd(), (q, v), do)
            base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
            return dict(out=fwd().detach(), fb_ms=timed(both, device), peak_gib=peak_gib(both, device, above=base))
        return run

    rows = run_cells([({"backend": b}, cell(b)) for b in backends], first_guess=10 if device.type == "cuda" else 1)
    if len(rows) == 2 and all(r["status"] == "ok" for r in rows):
        dense, ours = rows
        ours.update(speedup=dense["fb_ms"] / ours["fb_ms"], max_diff=(ours["out"].float() - dense["out"].float())
                    .abs().max().item())
        if ours["peak_gib"]:
            ours["memory_ratio"] = ours["peak_gib"] / dense["peak_gib"]
    for r in rows:
        r.pop("out", None)
    show(f"LSH attention fwd+bwd, T={T}, {R} rounds, chunk {chunk}, D={D}, B*H={B * H}, {str(dtype)[6:]}; "
         f"peak GiB above the inputs", rows, [("backend", "backend", ""), ("f+b ms", "fb_ms", ".2f"), ("peak GiB", "peak_gib", ".2f"),
                          ("speed-up vs twin", "speedup", ".1f"), ("memory vs twin", "memory_ratio", ".2f"),
                          ("max diff", "max_diff", ".1e")])
    return rows


# ----------------------------------------------------------------------------------------------------------
# Stages reformer, aft, perceiver: training steps of whole models

STEP_COLUMNS = [("model", "model", ""), ("n", "n", ""), ("params (M)", "params_m", ".2f"),
                ("ms / step", "step_ms", ".1f"), ("tokens/s", "tokens_per_s", ",.0f"), ("peak GiB", "peak_gib", ".2f")]


def stage_reformer(sizes, device):
    """The Reformer's memory claim: a 6-layer, 256-wide Reformer (reversible, chunked feed-forward) at growing n,
    beside the dense Transformer of the same shape (positions factorised so its embedding table stays small)."""
    c = sizes["reformer"]
    shape = dict(n_layer=c["n_layer"], n_embd=c["n_embd"], n_head=c["n_head"])
    # the Reformer with trax's factorised hash (hashing O(n^1.5), not O(n^2); from 2 x 64 buckets, the CPU sizes
    # have fewer), its feed-forward in slices of 16K positions, its attention a head at a time from 2^18 on
    extra = dict(reformer=lambda n: dict(factorize_hash=n >= 4096, ff_chunks=max(1, n // 16384),
                                         attn_chunks=min(c["n_head"], n // 2**16 or 1)),
                 transformer=lambda n: dict(pos_emb="factorized"))
    # side by side at each n, so the dense model is measured as far as the budget takes it
    cells = [({"model": name, "n": n}, training_step(name, 1, n, device, **shape, **extra[name](n)))
             for n in c["lengths"] for name in ("reformer", "transformer")]
    rows = run_cells(cells, first_guess=10 if device.type == "cuda" else 1)
    show(f"Training step, batch 1, {c['n_layer']} layers, width {c['n_embd']}, {c['n_head']} heads (Reformer: "
         f"factorised hash, attention a head at a time from 2^18)", rows,
         STEP_COLUMNS)
    return rows


def stage_aft(sizes, device):
    c = sizes["aft"]
    shape = dict(n_layer=c["n_layer"], n_embd=c["n_embd"], n_head=c["n_head"])
    cells = [({"model": name, "n": c["T"]}, training_step(name, c["batch"], c["T"], device, **shape))
             for name in ("transformer", "aft_local", "aft_simple")]
    rows = run_cells(cells, first_guess=10 if device.type == "cuda" else 1)
    base = rows[0]
    for r in rows[1:]:
        if r["status"] == base["status"] == "ok":
            r["vs_transformer"] = r["tokens_per_s"] / base["tokens_per_s"]
            if r["peak_gib"]:
                r["memory_vs_transformer"] = r["peak_gib"] / base["peak_gib"]
    show(f"Training step, batch {c['batch']}, {c['n_layer']} layers, width {c['n_embd']}", rows, STEP_COLUMNS + [("throughput vs transformer", "vs_transformer", ".2f"),
                                         ("memory vs transformer", "memory_vs_transformer", ".2f")])
    return rows


def stage_perceiver(sizes, device):
    c = sizes["perceiver"]
    cell = training_step("perceiver_ar", 1, c["T"], device, n_latents=c["n_latents"], n_layer=c["n_layer"],
                         n_embd=c["n_embd"], n_head=c["n_head"])
    rows = run_cells([({"model": "perceiver_ar", "n": c["T"]}, cell)], first_guess=10 if device.type == "cuda" else 1)
    show(f"Perceiver AR training step, batch 1, {c['n_latents']} latents, {c['n_layer']} latent layers, "
         f"width {c['n_embd']}", rows, STEP_COLUMNS)
    return rows


# ----------------------------------------------------------------------------------------------------------
# Stages generate, memory and models

def stage_generate(sizes, device, names):
    """Generation tokens/s with and without each model's cache; the prompt fills the context up to n - new."""
    c = sizes["generate"]

    def cell(name, T):
        def run():
            model = build(name, block_size=T, n_layer=c["n_layer"], n_embd=c["n_embd"], n_head=c["n_head"])
            model = model.to(device).eval()
            new = min(c["new"], T // 2)
            prompt = torch.randint(0, 256, (c["batch"], T - new), device=device)
            speed = {}
            with torch.no_grad(), autocast(device):
                model.generate(prompt, 2)  # warm-up: allocations, kernel compilation
            for use_cache in (True, False):
                gen = torch.Generator(device=device).manual_seed(0)
                sync(device)
                t0 = time.perf_counter()
                with torch.no_grad(), autocast(device):
                    model.generate(prompt, new, generator=gen, use_cache=use_cache)
                sync(device)
                speed[use_cache] = c["batch"] * new / (time.perf_counter() - t0)
            return dict(new=new, cached=speed[True], uncached=speed[False], speedup=speed[True] / speed[False])
        return run

    rows = run_cells([({"model": name, "n": T}, cell(name, T)) for name in names for T in c["lengths"]],
                     first_guess=20 if device.type == "cuda" else 1)
    show(f"Generation, batch {c['batch']}, {c['n_layer']} layers, width {c['n_embd']}", rows, [("model", "model", ""), ("context", "n", ""), ("new tokens", "new", ""),
                          ("tok/s cached", "cached", ",.1f"), ("tok/s uncached", "uncached", ",.1f"),
                          ("speed-up", "speedup", ".1f")])
    return rows


def saved_attention_bytes(n, n_layer, recompute):
    """Bytes of n x n tensors autograd keeps for the backward of a dense 4-head model on one sequence of n
    tokens, with attention computed the plain way (softmax(q k^T) v, which keeps the attention matrix)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    model = st.SparseTransformer(st.Config(block_size=n, n_layer=n_layer, n_head=4, n_embd=32, recompute=recompute))
    storages = {}

    def keep(t):
        if t.dim() >= 2 and tuple(t.shape[-2:]) == (n, n):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    x = torch.randint(0, 256, (1, n))
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t), sdpa_kernel(SDPBackend.MATH):
        model(x, x)
    return sum(storages.values())


def stage_memory(sizes, device):
    """The Sparse Transformer post's table: memory of the attention matrices of a dense 64-layer, 4-head model
    in float32, stored for the backward (layers x heads x n^2 x 4 bytes) vs recomputed (one layer at a time).
    Checked by measurement (on the CPU) where it fits: the n x n bytes autograd saves for a 2-layer model, per
    layer, times 64; with recompute (the checkpointed blocks) nothing n x n is saved at all."""
    post = {"1024 text tokens": (1024, 1.0e9, 16e6), "32x32x3 image": (3072, 9.6e9, 151e6),
            "64x64x3 image": (12288, 154e9, 2.4e9), "24,000 audio samples": (24000, 590e9, 9.2e9)}
    rows = []
    for what, (n, post_stored, post_recomputed) in post.items():
        one_layer = 4 * n * n * 4  # heads x n^2 x bytes
        row = dict(status="ok", data=what, n=n, stored=64 * one_layer / 1e9, post_stored=post_stored / 1e9,
                   recomputed=one_layer / 1e6, post_recomputed=post_recomputed / 1e6)
        if n <= 1024 or (n <= 3072 and sizes is SIZES["gpu"]):  # larger ones need tens of GB to measure
            row["measured_stored"] = 64 * saved_attention_bytes(n, 2, False) / 2 / 1e9
            row["measured_recomputed"] = saved_attention_bytes(n, 2, True) / 1e6
        rows.append(row)
    show("Attention matrices of a dense 64-layer, 4-head model, float32 (GB stored, MB recomputed)", rows, [("data", "data", ""), ("n", "n", ""), ("stored (formula)", "stored", ".2f"),
                          ("stored (post)", "post_stored", ".1f"), ("measured x64", "measured_stored", ".2f"),
                          ("recomputed (formula)", "recomputed", ",.1f"), ("recomputed (post)", "post_recomputed",
                                                                           ",.0f"),
                          ("measured, recompute", "measured_recomputed", ".0f")])
    return rows


def stage_models(args, device):
    """Training tokens/s and peak memory of every model at the same width, depth and batch, per length."""
    shape = dict(n_layer=args.n_layer, n_embd=args.n_embd, n_head=args.n_head)
    cells = [({"model": name, "n": T}, training_step(name, args.batch_size, T, device, **shape))
             for name in args.models for T in args.lengths]
    rows = run_cells(cells, first_guess=10 if device.type == "cuda" else 1)
    show(f"Training, batch {args.batch_size}, {args.n_layer} layers, width {args.n_embd}, {args.n_head} heads",
         rows, STEP_COLUMNS)
    return rows


# ----------------------------------------------------------------------------------------------------------
# Stage reformer_cpu: the Reformer's training step on a CPU beside Perceiver AR's, its two CPU attention paths

def stage_reformer_cpu(args, device):
    """One AdamW training step at each of args.lengths (batch 1, width 64, 2 heads; issue 36's setting): Perceiver
    AR with 256 latents (its cross-attention and one latent block), then the Reformer (2 layers, 4 rounds, chunks
    of 64) with its attention on cpu_lsh_attention or on the twin (backend 'dense'), with the paper's hash (one
    factor: T/64 columns, O(T^2)) or factorize_hash; each step also as a multiple of Perceiver AR's in this run."""
    shape = dict(n_embd=64, n_head=2)
    cells = []
    for T in args.lengths:
        cells.append(({"model": "perceiver_ar", "n": T},
                      training_step("perceiver_ar", 1, T, device, n_layer=1, n_latents=256, **shape)))
        for lsh, factorize in (("cpu", True), ("cpu", False), ("dense", True), ("dense", False)):
            step = training_step("reformer", 1, T, device, n_layer=2, factorize_hash=factorize, **shape)
            cells.append(({"model": "reformer", "n": T, "lsh": lsh, "factorize_hash": factorize},
                          lambda step=step, lsh=lsh: with_lsh_backend(lsh, step)))
    rows = run_cells(cells, first_guess=30)
    for row in rows:
        base = find(rows, model="perceiver_ar", n=row["n"])
        if row.get("step_ms") and base:
            row["vs_perceiver"] = row["step_ms"] / base["step_ms"]
    show("Reformer vs Perceiver AR, one training step on the CPU, batch 1, width 64, 2 heads", rows,
         [("model", "model", ""), ("n", "n", ""), ("attention", "lsh", ""), ("factorize_hash", "factorize_hash", ""),
          ("ms / step", "step_ms", ".0f"), ("x Perceiver AR", "vs_perceiver", ".1f"), ("peak GiB", "peak_gib", ".2f")])
    return rows


def with_lsh_backend(backend, cell):
    """cell() with the Reformer's lsh_attention calls on `backend` ('cpu': the default on a CPU; 'dense': the twin)."""
    lsh_attention = reformer.lsh_attention
    reformer.lsh_attention = functools.partial(lsh_attention, backend=None if backend == "cpu" else backend)
    try:
        return cell()
    finally:
        reformer.lsh_attention = lsh_attention


# ----------------------------------------------------------------------------------------------------------
# Stage same_budget: every model trained the same way on the same text, several seeds

SAME_BUDGET = ["--block_size", "256", "--n_layer", "4", "--n_head", "4", "--n_embd", "128", "--batch_size", "8",
               "--eval_iters", "20", "--warmup", "30", "--lr", "2e-3"]
SAME_RUNS = {  # model: (row label, its flags) for each row; parameter counts stay within 10% of the Transformer's
    "aft_full": [("aft_full", ["--w_rank", "32"])],  # a full 256 x 256 w per layer would add 30% parameters
    "perceiver_ar": [("perceiver_ar", ["--n_layer", "3"])],  # its cross-attention block is a fourth block
    "reformer": [("reformer", []), ("reformer, causal_lsh", ["--causal_lsh", "True"])],
}


def stage_same_budget(args, device):
    """train.py on args.data for args.steps steps per model and seed (1..args.seeds), one loop and setting for
    all; validation bits on 20 fixed batches. A model whose forward is not exactly causal is also scored on 2048
    positions fed their prefix alone (sample.evaluate_prefixes), the figure to compare."""
    rows = []
    for name in args.models:
        for label, flags in SAME_RUNS.get(name, [(name, [])]):
            runs = []
            for seed in range(1, args.seeds + 1):
                out = os.path.join(args.out_dir, "same_budget", f"{label.replace(', ', '_')}_{seed}")
                argv = ["--model", name, "--data", args.data, "--max_iters", str(args.steps), "--eval_interval",
                        str(max(1, args.steps // 10)), "--seed", str(seed), "--out_dir", out, "--device", str(device)]
                evaluations = train_once(argv + SAME_BUDGET + flags, out, args.steps)
                ckpt, model, data = sample.load_trained(out, device)
                run = dict(bits=evaluations[-1]["val_bits"],  # tokens/s between evaluations, evaluation excluded
                           tokens_per_s=sum(r["tokens_per_s"] for r in evaluations) / len(evaluations),
                           params_m=sum(p.numel() for p in model.parameters()) / 1e6)
                if not getattr(model, "exactly_causal", True):
                    run["prefix_bits"], run["window_bits"], _ = sample.evaluate_prefixes(
                        model, data, "val", ckpt["model_config"]["block_size"], device, nullcontext(), n_windows=64,
                        n_positions=32)
                run["curve"] = [(r["step"], r["val_bits"]) for r in evaluations]
                runs.append(run)
                print(f"  {label} seed {seed}: {run['bits']:.3f} bits, {run['tokens_per_s']:,.0f} tokens/s")
            mean = lambda key: sum(r[key] for r in runs) / len(runs) if key in runs[0] else None
            bits = [r["bits"] for r in runs]
            curve = [(step, sum(r["curve"][i][1] for r in runs) / len(runs)) for i, (step, _) in
                     enumerate(runs[0]["curve"])]  # validation bits at each evaluation, mean over seeds
            rows.append(dict(model=label, status="ok", params_m=runs[0]["params_m"], bits=mean("bits"),
                             spread=max(bits) - min(bits), per_seed=bits, prefix_bits=mean("prefix_bits"),
                             window_bits=mean("window_bits"), tokens_per_s=mean("tokens_per_s"), curve=curve))
    show(f"Same budget: {args.steps} steps of batch 8 x 256 tokens on {args.data}, 4 layers, width 128, "
         f"seeds 1..{args.seeds}; validation bits per byte on 20 fixed batches (mean over seeds), and for a forward "
         f"that is not exactly causal on 2048 positions fed their prefix alone vs inside their windows", rows,
         [("model", "model", ""), ("params (M)", "params_m", ".3f"), ("val bits", "bits", ".3f"),
          ("max - min", "spread", ".3f"), ("prefix-only bits", "prefix_bits", ".3f"),
          ("same positions, windowed", "window_bits", ".3f"), ("tokens/s", "tokens_per_s", ",.0f")])
    plot_curves(rows, os.path.join(args.out_dir, "same_budget.png"))
    return rows


def train_once(argv, out, steps):
    """train.main(argv) into out for `steps` steps, and its evaluations (metrics.jsonl). A run already finished
    there is reused as it is, an interrupted one continues from its last checkpoint: a long stage that stops
    halfway loses nothing."""
    metrics = os.path.join(out, "metrics.jsonl")
    evaluations = read_jsonl(metrics) if os.path.exists(metrics) else []
    if not evaluations or evaluations[-1]["step"] != steps:
        train.main(argv + (["--resume"] if os.path.exists(os.path.join(out, "ckpt.pt")) else []))
        evaluations = read_jsonl(metrics)
    return evaluations


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def read_json(path):
    with open(path) as f:
        return json.load(f)


def pyplot():
    """matplotlib.pyplot drawing into files, or None when matplotlib is not installed (it is optional)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def plot_curves(rows, path, ylabel="validation bits per byte (mean over seeds)"):
    """A figure against steps, one line per row, when matplotlib is installed."""
    plt = pyplot()
    if plt is None:
        print(f"(pip install matplotlib for the curves in {path}; the table above has the figures)")
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for row in rows:
        ax.plot(*zip(*row["curve"]), marker="o", markersize=3, label=row["model"])
    ax.set(xlabel="step", ylabel=ylabel)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    print(f"wrote {path}")


def plot_positions(curves, path, unit):
    """{label: [(first, last, bits)]} -> one line per label against the buckets' last positions (log scale);
    False when matplotlib is not installed."""
    plt = pyplot()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, rows in curves.items():
        ax.plot([last for _, last, _ in rows], [b for _, _, b in rows], marker="o", markersize=3, label=label)
    ax.set(xscale="log", xlabel="position in the window (end of each bucket)", ylabel=unit)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return True


# ----------------------------------------------------------------------------------------------------------
# Stage long_context: every model trained at a long context, scored by position in the window

LONG = ["--n_layer", "2", "--n_head", "4", "--n_embd", "128", "--batch_size", "2", "--eval_iters", "4", "--warmup",
        "30", "--lr", "2e-3"]
LONG_RUNS = {  # model: (row label, its flags) for each row; parameter counts stay within 10% of the Transformer's
    "aft_full": [("aft_full", ["--w_rank", "8"])],  # a learned (T x T) w per layer would dwarf every other model
    "aft_local": [("aft_local", ["--w_rank", "8"])],  # its (T x window) band too, at T = 2048
    "perceiver_ar": [("perceiver_ar", ["--n_layer", "2"])],  # + its cross-attention block; no position table
    "reformer": [("reformer", ["--n_layer", "3", "--n_hashes", "2"]),  # no position table either (axial)
                 ("reformer, causal_lsh", ["--n_layer", "3", "--n_hashes", "2", "--causal_lsh", "True"])],
}


def stage_long_context(args, device):
    """train.py on args.data at a context of args.context for args.steps steps per model and seed, one setting
    for all (LONG); then validation bits over the whole split in consecutive windows (sample.evaluate_split),
    overall and by position in the window, training tokens/s and the peak memory of one training step. A forward
    that is not exactly causal is also scored on positions fed their prefix alone. Each finished row is kept in
    its run folder (long_context.json) and reused."""
    rows, curves = [], {}
    for name in args.models:
        for label, flags in LONG_RUNS.get(name, [(name, [])]):
            runs = [long_context_run(name, label, flags, seed, args, device) for seed in range(1, args.seeds + 1)]
            mean = lambda key: sum(r[key] for r in runs) / len(runs) if runs[0].get(key) is not None else None
            buckets = [(first, last, sum(r["by_position"][i][2] for r in runs) / len(runs))
                       for i, (first, last, _) in enumerate(runs[0]["by_position"])]
            row = dict(model=label, status="ok", **{k: mean(k) for k in ("params_m", "bits", "prefix_bits",
                                                                         "prefix_window_bits", "tokens_per_s",
                                                                         "peak_gib")},
                       per_seed=[r["bits"] for r in runs], by_position=buckets)
            row.update({f"p{last}": b for _, last, b in buckets})
            rows.append(row)
            curves[label] = buckets
    edges = sorted({last for r in rows for _, last, _ in r["by_position"]})
    show(f"Long context: {args.steps} steps of batch 2 x {args.context} tokens on {args.data}, width 128, "
         f"seeds 1..{args.seeds}; validation bits per byte over the whole split in consecutive windows, overall and "
         f"by position in the window (bucket ending at p); prefix-only bits for a forward that is not exactly "
         f"causal; peak memory of one training step (GPU only)", rows,
         [("model", "model", ""), ("params (M)", "params_m", ".3f"), ("val bits", "bits", ".3f"),
          ("prefix-only", "prefix_bits", ".3f"), ("same, windowed", "prefix_window_bits", ".3f")] + [(f"<= {p}", f"p{p}", ".3f") for p in edges]
         + [("tokens/s", "tokens_per_s", ",.0f"), ("peak GiB", "peak_gib", ".2f")])
    path = os.path.join(args.out_dir, "long_context.png")
    if plot_positions(curves, path, "validation bits per byte"):
        print(f"wrote {path}")
    return rows


def long_context_run(name, label, flags, seed, args, device):
    """One (model, seed) of the long_context stage: trained (or resumed, or reused) and scored."""
    out = os.path.join(args.out_dir, "long_context", f"{label.replace(', ', '_')}_{seed}")
    record = os.path.join(out, "long_context.json")
    run = read_json(record) if os.path.exists(record) else None
    if run and run["steps"] == args.steps:
        return run
    settings = ["--block_size", str(args.context)] + LONG + flags
    argv = ["--model", name, "--data", args.data, "--max_iters", str(args.steps), "--eval_interval",
            str(max(1, args.steps // 4)), "--seed", str(seed), "--out_dir", out, "--device", str(device)]
    evaluations = train_once(argv + settings, out, args.steps)
    ckpt, model, data = sample.load_trained(out, device)
    bits, _, _, by_position = sample.evaluate_split(model, data, "val", args.context, 4, device, autocast(device))
    run = dict(steps=args.steps, bits=bits, by_position=by_position,
               params_m=sum(p.numel() for p in model.parameters()) / 1e6,
               tokens_per_s=sum(r["tokens_per_s"] for r in evaluations) / len(evaluations))  # evaluation excluded
    if not getattr(model, "exactly_causal", True):
        run["prefix_bits"], run["prefix_window_bits"], _ = sample.evaluate_prefixes(
            model, data, "val", args.context, device, autocast(device), n_windows=8, n_positions=16)
    del model
    config = {k: v for k, v in ckpt["model_config"].items() if k not in ("vocab_size", "block_size")}
    run["peak_gib"] = training_step(name, 2, args.context, device, **config)()["peak_gib"] \
        if device.type == "cuda" else None  # peak_gib: not measurable on a CPU
    with open(record, "w") as f:
        json.dump(run, f)
    print(f"  {label} seed {seed}: {bits:.3f} bits, {run['tokens_per_s']:,.0f} tokens/s")
    return run


# ----------------------------------------------------------------------------------------------------------
# Stage recall: what each model can remember, on the copy task at growing distances

RECALL = ["--data", "copy", "--n_head", "2", "--n_embd", "64", "--batch_size", "16", "--lr", "3e-3",
          "--warmup", "20", "--eval_iters", "4"]
RECALL_SETTINGS = {"aft_full": ["--w_rank", "32"],  # a full (2d x 2d) w per layer would dwarf every other model
                   # patterns that stay sparse at these lengths: tiles of 8 let the strided stride be ~sqrt(2d)
                   # (8 or 16, not 2 or 4), and fixed blocks of 16 (the paper's 128 would cover the whole row)
                   "sparse_strided": ["--tile", "8"],
                   "sparse_fixed": ["--tile", "8", "--stride", "16", "--summary", "8", "--n_offsets", "2"]}


@torch.no_grad()
def copy_accuracy(model, d, device, n_rows=16, n_positions=32, rows_per_call=16):
    """Fraction of copied tokens predicted exactly (argmax) on fresh rows [start, x, x] with |x| = d: at
    n_positions positions of the second half, where every target repeats the token d positions back (for a
    model that predicts only its last k positions, such as Perceiver AR's latents, among those). A forward that
    is not exactly causal predicts each from its prefix alone (the sort could carry the answer back)."""
    half = torch.randint(0, 256, (n_rows, d), generator=torch.Generator().manual_seed(999))
    seq = torch.cat([torch.full((n_rows, 1), 256), half, half], dim=1).to(device)  # (B, 2d + 1)
    if getattr(model, "exactly_causal", True):
        rows = [model(seq[i:i + rows_per_call, :-1])[0] for i in range(0, n_rows, rows_per_call)]
        logits = torch.cat(rows)  # (B, k, V): the last k positions
        first = max(d, 2 * d - logits.size(1))
        positions = torch.linspace(first, 2 * d - 1, n_positions).long().tolist()  # targets are copies
        predicted = logits[:, [t - (2 * d - logits.size(1)) for t in positions]].argmax(-1)
    else:
        positions = torch.linspace(d, 2 * d - 1, n_positions).long().tolist()
        predicted = torch.stack([model(seq[:, :t + 1])[0][:, -1].argmax(-1) for t in positions], dim=1)
    return (predicted == seq[:, [t + 1 for t in positions]]).float().mean().item()


def copy_rows(models):
    """(model, row label, its flags) for the copy-task stages: a row per model, two for the Reformer (paper and
    causal LSH, as SAME_RUNS)."""
    return [(name, label, flags) for name in models
            for label, flags in (SAME_RUNS["reformer"] if name == "reformer" else [(name, [])])]


def stage_recall(args, device):
    """Every model learns the copy task (data.py's `copy`: each row's second half repeats its first) at each
    distance d, same size and settings for all, trained to the end (recall_run); accuracy on fresh rows, mean
    over seeds 1..args.seeds. Chance is 1/256. Distances run shortest first, so a run cut short by the session
    leaves the longest ones, which resume where they stopped."""
    labels = copy_rows(args.models)
    rows = {label: dict(model=label, status="ok") for _, label, _ in labels}
    for d in args.distances:
        for name, label, flags in labels:
            curves = [recall_run(name, label, flags, d, seed, args, device) for seed in range(1, args.seeds + 1)]
            row = rows[label]
            row[f"d{d}"] = sum(c[-1][1] for c in curves) / len(curves)
            row[f"d{d}_steps"] = max(c[-1][0] for c in curves)
            row[f"d{d}_curves"] = curves
            print(f"  {name} d={d}: copy accuracy {[c[-1][1] for c in curves]} after {row[f'd{d}_steps']} steps")
    show(f"Recall: copy accuracy across d positions, trained until it stops improving ({args.recall_patience} checks "
         f"every {args.recall_check} steps without progress) or {args.recall_cap} steps ({args.recall_layers} layers, width 64, batch 16, lr 3e-3), mean over "
         f"seeds 1..{args.seeds}; chance 0.004; (steps)", list(rows.values()),
         [("model", "model", "")] + [c for d in args.distances
                                      for c in ((f"d = {d}", f"d{d}", ".2f"), ("(steps)", f"d{d}_steps", ""))])
    return list(rows.values())


def recall_run(name, label, flags, d, seed, args, device):
    """Train one model on the copy task at distance d in rounds of args.recall_check steps, measuring copy
    accuracy on fresh rows after each, until recall_finished says so. The learning rate follows one cosine over
    the cap whatever the stopping step. Returns the curve [(step, accuracy, validation bits)], also kept in the
    run folder, so a stopped stage resumes at its last round."""
    layers = args.recall_layers
    run = f"{label.replace(', ', '_')}_{d}_{seed}" + (f"_{layers}layers" if layers != 2 else "")
    out = os.path.join(args.out_dir, "recall", run)
    path = os.path.join(out, "recall_curve.json")
    curve = read_json(path) if os.path.exists(path) else []
    if name == "perceiver_ar":  # its cross-attention block is the first layer
        settings = ["--n_latents", str(d), "--n_layer", str(layers - 1)]
    else:
        settings = RECALL_SETTINGS.get(name, []) + ["--n_layer", str(layers)]
    while not recall_finished(curve, args.recall_cap, args.recall_patience):
        steps = min(args.recall_cap, (curve[-1][0] if curve else 0) + args.recall_check)
        evaluations = train_once(["--model", name, "--block_size", str(2 * d), "--max_iters", str(steps),
                                  "--lr_decay_iters", str(args.recall_cap), "--eval_interval", str(args.recall_check),
                                  "--seed", str(seed), "--out_dir", out, "--device", str(device)]
                                 + RECALL + settings + flags, out, steps)
        _, model, _ = sample.load_trained(out, device)
        curve.append((steps, copy_accuracy(model, d, device), evaluations[-1]["val_bits"]))
        with open(path, "w") as f:
            json.dump(curve, f)
    return curve


def recall_finished(curve, cap, patience, gain=0.02):
    """Done at the cap, at 99% accuracy, or when the last `patience` rounds raised neither the accuracy nor the
    validation bits by `gain` past their best before those rounds: a model that stays at chance while its
    loss still falls is still learning. The copy task's loss can also sit at 8 bits for hundreds of steps before
    it falls (the Transformer at d = 128: 300 steps), so a run stopped at chance says "not yet learned", not
    "cannot", until it is run on to the cap (a large patience)."""
    if not curve:
        return False
    step, accuracy, _ = curve[-1]
    if step >= cap or accuracy >= 0.99:
        return True
    if len(curve) <= patience:
        return False
    before, recent = curve[:-patience], curve[-patience:]
    return (max(a for _, a, _ in recent) < max(a for _, a, _ in before) + gain
            and min(b for _, _, b in recent) > min(b for _, _, b in before) - gain)


# ----------------------------------------------------------------------------------------------------------
# Stage ladder: the copy task at long distances, one recipe for every distance

LADDER = ["--data", "copy", "--n_head", "2", "--n_embd", "64", "--lr", "1e-3", "--min_lr", "1e-3", "--warmup", "100",
          "--eval_iters", "2"]  # lr held: the copy is learned in stairs, and a decaying lr stalls the next stair
LADDER_RUNS = {  # model: its flags; 2 layers (Perceiver AR: its cross-attention block + 1), 256 latents at every d
    "perceiver_ar": ["--n_latents", "256", "--n_layer", "1"],
    **{name: flags + ["--n_layer", "2"] for name, flags in RECALL_SETTINGS.items()}}


def rotary_margin(inv_freq, span):
    """How well rotary encodings with frequencies inv_freq (n_pairs of them, perceiver_ar's) can single out one
    offset among 0 .. span - 1: a head whose query is turned back by the source's offset scores sum_i cos(delta
    f_i) at delta offsets from the source, n_pairs at the source; returns n_pairs minus the best other score and
    the offset where it is. A margin near 0 means another offset looks the same: logits would need a gain of
    about log(span) / margin to pick the source, so a small margin says "cannot" before training says anything."""
    n_pairs, inv_freq = inv_freq.numel(), inv_freq.double()
    delta = torch.arange(1, span, dtype=torch.float64)
    score = torch.cos(delta[:, None] * inv_freq).sum(1)
    return n_pairs - score.max().item(), int(delta[score.argmax()])


def ladder_batch(d, tokens):
    """Sequences per step at distance d: 8 while they hold at most `tokens` tokens, then fewer (at least 1)."""
    return max(1, min(8, tokens // (2 * d)))


def stage_ladder(args, device):
    """Each model learns the copy at the distances args.distances, one recipe for all (LADDER), in rounds of
    args.ladder_check steps until copy accuracy on fresh rows reaches 0.99, args.ladder_cap steps, or
    args.ladder_minutes of training; going up the ladder until a distance is not learned (past it, only distances
    already run in out_dir are shown). Per round: accuracy, validation bits, seconds per step, the process's peak
    memory (ru_maxrss: run one distance per command for a cell's own figure) and, for Perceiver AR, how well its
    rotary encoding separates offsets up to 2d (rotary_margin). Rounds are kept in the run folder, so a stopped
    stage resumes."""
    rows = []
    for name, label, flags in copy_rows(args.models):
        row, missed = dict(model=label, status="ok"), False
        for d in args.distances:
            curve = ladder_run(name, label, flags, d, args, device, train=not missed)
            if not curve:
                continue
            row[f"d{d}"], row[f"d{d}_curve"] = curve[-1]["accuracy"], curve
            print(f"  {label} d={d}: copy accuracy {curve[-1]['accuracy']:.3f} after {curve[-1]['step']} steps, "
                  f"{curve[-1]['s_per_step']:.2f} s/step, {curve[-1]['maxrss_gb']:.2f} GiB")
            missed = missed or curve[-1]["accuracy"] < 0.99
        rows.append(row)
    show(f"Ladder: copy accuracy at distance d (block 2d), one recipe ({' '.join(LADDER)}), until 0.99, "
         f"{args.ladder_cap} steps or {args.ladder_minutes} minutes", rows,
         [("model", "model", "")] + [(f"d = {d}", f"d{d}", ".3f") for d in args.distances])
    plot_ladder(rows, os.path.join(args.out_dir, "ladder.png"))
    return rows


def plot_ladder(rows, path):
    """Copy accuracy against step, one line per (model, distance)."""
    plot_curves([dict(model=f"{row['model']}, d = {int(key[1:-6]):,}", curve=[(r["step"], r["accuracy"]) for r in curve])
                 for row in rows for key, curve in row.items() if key.endswith("_curve")],
                path, "copy accuracy on fresh rows (chance 1/256)")


def ladder_run(name, label, flags, d, args, device, train=True):
    """One (model, distance) of the ladder stage: its rounds, kept in the run folder (train=False: only those)."""
    out = os.path.join(args.out_dir, "ladder", f"{label.replace(', ', '_')}_{d}")
    path = os.path.join(out, "ladder_curve.json")
    curve = read_json(path) if os.path.exists(path) else []
    batch = ladder_batch(d, args.ladder_tokens)
    argv = (["--model", name, "--block_size", str(2 * d), "--batch_size", str(batch), "--lr_decay_iters",
             str(args.ladder_cap), "--eval_interval", str(args.ladder_check), "--seed", "1", "--out_dir", out,
             "--device", str(device)] + LADDER + LADDER_RUNS.get(name, ["--n_layer", "2"])
            + flags + args.ladder_flags.split())
    while train and (not curve or (curve[-1]["accuracy"] < 0.99 and curve[-1]["step"] < args.ladder_cap
                                   and sum(r["seconds"] for r in curve) < 60 * args.ladder_minutes)):
        steps = min(args.ladder_cap, (curve[-1]["step"] if curve else 0) + args.ladder_check)
        start = time.time()
        evaluations = train_once(argv + ["--max_iters", str(steps)], out, steps)
        seconds = time.time() - start
        _, model, _ = sample.load_trained(out, device)
        accuracy = copy_accuracy(model, d, device, n_rows=8, n_positions=64, rows_per_call=1)
        done = steps - (curve[-1]["step"] if curve else 0)
        curve.append(dict(step=steps, accuracy=accuracy, val_bits=evaluations[-1]["val_bits"], seconds=seconds,
                          s_per_step=seconds / done, batch=batch,
                          maxrss_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20))
        print(f"    {name} d={d} step {steps}: accuracy {accuracy:.3f}, {curve[-1]['val_bits']:.3f} bits")
        with open(path, "w") as f:
            json.dump(curve, f)
    if curve and name == "perceiver_ar":  # how well its rotary encoding can single out the source at this d
        _, model, _ = sample.load_trained(out, device)
        curve[-1]["rotary_margin"] = list(rotary_margin(model.cross.attn.inv_freq.cpu(), 2 * d))
    return curve


# ----------------------------------------------------------------------------------------------------------
# Stage attention: docs/attention's pictures of what each output depends on, measured through the real models

PICTURE_BASE = dict(block_size=64, vocab_size=256, n_layer=2, n_head=2, n_embd=32)  # every picture: 64 tokens
PICTURES = {  # picture: (model, its settings at which every pattern is visible in a 64-token picture)
    "transformer": ("transformer", {}), "sparse_strided": ("sparse_strided", dict(stride=8, tile=4)),
    "sparse_fixed": ("sparse_fixed", dict(stride=16, summary=4, n_offsets=2, tile=4)),
    "reformer": ("reformer", dict(chunk=8, n_hashes=2)),
    "reformer_causal_lsh": ("reformer", dict(chunk=8, n_hashes=2, causal_lsh=True)),
    "aft_full": ("aft_full", {}), "aft_simple": ("aft_simple", {}), "aft_local": ("aft_local", dict(window=8)),
    "aft_conv": ("aft_conv", dict(window=8)), "perceiver_ar": ("perceiver_ar", dict(n_latents=16))}


def pictures():
    """Every picture the stage draws: PICTURES, then each other registered model at its own defaults."""
    return {**PICTURES, **{name: (name, {}) for name in train.MODELS if name not in PICTURES}}


def stage_attention(args, device):
    """docs/attention (python bench.py --stages attention --out_dir docs/attention): attention_NAME.png for every
    picture of pictures(), over 64 tokens drawn from seed 1337, and a table of the cells each whole-network panel
    has in the future (only the paper LSH's has any)."""
    rows = []
    for name, (_, settings) in pictures().items():
        path = os.path.join(args.out_dir, f"attention_{name}.png")
        whole = draw_attention(picture_model(name).to(device).eval(), 64, path, seed=1337)[-1]  # (T_out, T_in)
        future = whole.triu(whole.size(1) - whole.size(0) + 1).count_nonzero().item()  # columns after the row's own
        rows.append(dict(status="ok", picture=name, settings=settings, future_cells=future))
    show("Pictures of what each output depends on (2 layers, width 32, 64 tokens, float64)", rows,
         [("picture", "picture", ""), ("settings", "settings", ""), ("cells in the future", "future_cells", "")])
    return rows


def draw_attention(model, T, path, seed):
    """Write path, the picture of what each output of model depends on over T random tokens drawn from seed; returns
    its maps (dependence_maps)."""
    idx = torch.randint(model.config.vocab_size, (1, T), generator=torch.Generator().manual_seed(seed))
    maps = [m.cpu() for m in dependence_maps(model, idx.to(next(model.parameters()).device))]
    sample.write_png(path, picture(maps))
    print(f"wrote {path}: one panel per layer's token mixer, then the whole network")
    return maps


def picture_model(name, **settings):
    """Picture `name` of pictures() as a fresh model, its settings overridden by `settings`, built and run in
    float64: no cell of its picture then rests on float32 rounding (the paper LSH's leaks are bucket decisions),
    and its weights are the same bits on every CPU (float32's normal_ has its own AVX2 kernel, float64's not)."""
    model, own = pictures()[name]
    torch.manual_seed(0)
    with default_dtype(torch.float64):
        return train.build_model(model, {**PICTURE_BASE, **own, **settings}).double()


@contextmanager
def default_dtype(dtype):
    """torch's default dtype set to dtype (float32 or float64) inside the block: what a model builds or draws
    without naming a dtype (its weights, the Reformer's rotations) comes in that dtype."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


@torch.enable_grad()  # also under sample.main's no_grad
def dependence_maps(model, idx):
    """What each output depends on, for one sequence idx (1, T). Per token mixer (the `attn` modules: attention or
    AFT's mixer) in forward order, a (T_out, T_in) map of |d out_t / d in_j| (its key input where queries and keys
    differ); then, for the whole network, the largest change of the logits at t when token j is replaced, which
    also sees discrete paths (where positions sort) that have no gradient. The replaced sequences are compared row
    for row with the unchanged one in a batch of the same shape, for a model's rounding may depend on the batch size
    (nn.GRU's logits move by ~1e-7 between batch 1 and 64 on a CPU). Tensors the forward draws come in the model's
    dtype (default_dtype)."""
    with default_dtype(next(model.parameters()).dtype):
        if getattr(model.config, "reversible", False):  # the same function with ordinary autograd: hooks see a graph
            model.config = dataclasses.replace(model.config, reversible=False)
        mixers = [m for name, m in model.named_modules() if name.endswith("attn")]
        seen = []
        hooks = [m.register_forward_hook(lambda m, inputs, out: seen.append((inputs, out))) for m in mixers]
        model(idx)  # the hooks keep each mixer's inputs and output
        for h in hooks:
            h.remove()
        maps = []
        for inputs, out in seen:
            y = out[0] if isinstance(out, tuple) else out  # (1, T_out, C)
            x = max((t for t in inputs if torch.is_tensor(t) and t.is_floating_point()), key=lambda t: t.size(1))
            probe = torch.randn(y.size(-1), generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(y)
            rows = [torch.autograd.grad((y[0, t] * probe).sum(), x, retain_graph=True)[0][0].norm(dim=-1)
                    for t in range(y.size(1))]
            grads = torch.stack(rows).detach()  # (T_out, T_in)
            maps.append(beyond_rounding(grads, grads.amax()))
        with torch.no_grad():
            same = idx.repeat(idx.size(1), 1)  # (T, T)
            changed = same.clone()  # row j has token j replaced
            changed.diagonal().add_(1).remainder_(model.config.vocab_size)
            logits = model(same)[0]  # (T, T_out, V)
            moved = (model(changed)[0] - logits).abs().amax(-1)  # (T, T_out): replaced j, output t
        return maps + [beyond_rounding(moved, logits.abs().amax()).T]


def beyond_rounding(m, largest):
    """m with every value within 64 units of rounding of `largest` (a map's largest gradient or logit change) set to
    0: no dependence. Where the paper LSH's sort only permutes an earlier chunk's keys, the sums there move in their
    last bits on one CPU and not at all on another (3e-17 to 2e-16 in the float64 picture, real changes 1e-5 up)."""
    return m.masked_fill(m <= 64 * torch.finfo(m.dtype).eps * largest, 0)


def picture(maps, scale=4, gap=8):
    """Panels side by side: gray where an output (row) depends on an input (column), darker for more; white where
    it does not; the future (column after the row's own position) pale red, deep red where something is there."""
    height = max(m.size(0) for m in maps) * scale
    panels = []
    for m in maps:
        T_out, T_in = m.shape
        own = T_in - T_out + torch.arange(T_out)[:, None]  # the input position of each output row
        future = torch.arange(T_in)[None, :] > own
        level = torch.log10(m.clamp_min(1e-30))
        nonzero = m > 0
        shade = 44 + 176 * ((level.max() - level) / 3).clamp(max=1)  # 44 (strongest) .. 220 (3 decades weaker)
        img = torch.full((T_out, T_in, 3), 255.0)
        img[future] = torch.tensor([255.0, 225, 225])
        img[nonzero] = shade[nonzero][:, None].expand(-1, 3).to(img.dtype)
        img[nonzero & future] = torch.tensor([200.0, 0, 0])
        img = img.to(torch.uint8).numpy().repeat(scale, axis=0).repeat(scale, axis=1)
        panels.append(np.pad(img, ((height - img.shape[0], 0), (0, gap), (0, 0)), constant_values=255))
    return np.concatenate(panels, axis=1)[:, :-gap]


# ----------------------------------------------------------------------------------------------------------
# The targets the README states for one H100, checked against this run's figures

def find(rows, **match):
    return next((r for r in rows if all(r.get(k) == v for k, v in match.items()) and r["status"] == "ok"), None)


def targets(results):
    """(target, verdict) pairs; a verdict says met or missed by how much, or why it was not measured."""
    out = []

    def verdict(value, goal, better, fmt):
        if value is None:
            return "not measured in this run"
        met = value <= goal if better == "lower" else value >= goal
        return f"{'met' if met else 'missed'}: {format(value, fmt)} (target {'<=' if better == 'lower' else '>='} " \
               f"{format(goal, fmt)})"

    kernel_rows = results.get("kernels", [])
    variants = [("", dict(flex="fb_vs_flex", fwd="fb_vs_fwd", tflops="ours_fwd_tflops"))]
    if any("best_fb_ms" in r for r in kernel_rows):  # the sweep's best setting, measured beside the default
        variants.append((", sweep's best setting", dict(flex="best_fb_vs_flex", fwd="best_fb_vs_fwd",
                                                       tflops="best_fwd_tflops")))
    at_65536 = {layout: find(kernel_rows, n=65536, layout=layout) or {} for layout in ("local", "fixed")}
    strided = next((r for r in kernel_rows if r.get("n") == 16384 and r.get("layout", "").startswith("strided")
                    and r["status"] == "ok"), {})
    for label, key in variants:
        for n in (16384, 65536):
            for r in (r for r in kernel_rows if r.get("n") == n):
                out.append((f"block-sparse fwd+bwd <= 0.7x FlexAttention (arithmetic mask_mod), n={n}, "
                            f"{r['layout']}{label}", verdict(r.get(key["flex"]), 0.7, "lower", ".2f")))
        for layout, r in at_65536.items():
            out.append((f"block-sparse fwd+bwd <= 4x its fwd, n=65536, {layout}{label}",
                        verdict(r.get(key["fwd"]), 4, "lower", ".1f")))
        out.append((f"block-sparse fwd >= 400 TFLOP/s on the computed tiles, n=65536, fixed{label}",
                    verdict(at_65536["fixed"].get(key["tflops"]), 400, "higher", ".0f")))
        out.append((f"block-sparse fwd >= 120 TFLOP/s on the computed tiles, n=16384, strided{label}",
                    verdict(strided.get(key["tflops"]), 120, "higher", ".0f")))
    host = max((r["host_us"] for r in kernel_rows if "host_us" in r), default=None)
    out.append(("host (Python) time per attention() call <= 40 us, launches stubbed (slowest layout)",
                verdict(host, 40, "lower", ".0f")))
    lsh = find(results.get("lsh", []), backend="triton") or {}
    out.append(("LSH fwd+bwd >= 5x faster than its PyTorch twin at 64K", verdict(lsh.get("speedup"), 5, "higher", ".1f")))
    out.append(("LSH peak memory <= 1/5 of the twin's", verdict(lsh.get("memory_ratio"), 0.2, "lower", ".2f")))
    big = find(results.get("reformer", []), model="reformer", n=2**20) or {}
    out.append(("2^20-token 6-layer Reformer training step under 16 GiB", verdict(big.get("peak_gib"), 16, "lower",
                                                                                   ".1f")))
    local = find(results.get("aft", []), model="aft_local") or {}
    out.append(("AFT-local >= 1.44x the Transformer's throughput at 4,096 tokens",
                verdict(local.get("vs_transformer"), 1.44, "higher", ".2f")))
    out.append(("AFT-local <= 1/3 of the Transformer's memory", verdict(local.get("memory_vs_transformer"), 1 / 3,
                                                                         "lower", ".2f")))
    perceiver = find(results.get("perceiver", []), n=65536)
    out.append(("Perceiver AR trains at a 65,536 context with 1,024 latents",
                "met" if perceiver else "not measured in this run"))
    return out


def quietly(*argv):
    """The standard output of a command, or None where it fails or does not exist (git outside a checkout)."""
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=30,
                           cwd=os.path.dirname(os.path.abspath(__file__)))
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip() if r.returncode == 0 else None


def device_record(device, args, seeds):
    """What every published figure carries (bench.py's bench.json, sample.py --evaluate's record): the code (git
    commit, and `dirty`, the tracked files changed since it: a figure from a dirty tree says so), date, CPU model
    and threads, the GPU's name, driver and CUDA, python/torch/triton versions, the exact command line (with the
    environment that changes figures), every flag as parsed, and the seeds."""
    cpu = [line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")] \
        if os.path.exists("/proc/cpuinfo") else []
    env = [f"{k}={os.environ[k]}" for k in ("OMP_NUM_THREADS", "TRITON_INTERPRET", "CUDA_VISIBLE_DEVICES")
           if k in os.environ]
    changed = quietly("git", "diff", "--name-only", "HEAD")  # tracked files only, staged or not
    record = dict(commit=quietly("git", "rev-parse", "HEAD"),
                  dirty=None if changed is None else changed.splitlines(),
                  date=time.strftime("%Y-%m-%d %H:%M:%S %Z"), device=str(device),
                  cpu=cpu[0] if cpu else platform.processor() or platform.machine(), threads=torch.get_num_threads(),
                  gpu=None, python=platform.python_version(), torch=torch.__version__,
                  triton=getattr(kernels.triton, "__version__", None),
                  command=" ".join(env + [shlex.join([sys.executable] + sys.argv)]), args=vars(args), seeds=seeds)
    if device.type == "cuda":
        record.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda,
                      driver=quietly("nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"),
                      capability=".".join(map(str, torch.cuda.get_device_capability(device))))
    return record


def write_record(args, record, results, verdicts):
    """out_dir/bench.json (device, versions, command, every figure) and bench.md (the tables); returns the first."""
    os.makedirs(args.out_dir, exist_ok=True)
    path = os.path.join(args.out_dir, "bench.json")
    with open(path, "w") as f:
        json.dump(dict(record, budget_s=args.budget, seconds=round(time.time() - (DEADLINE - args.budget), 1),
                       results=results, targets=verdicts), f, indent=1,
                  default=lambda value: None)  # a stage's cells may hold tensors it reduces to figures at its end
    with open(os.path.join(args.out_dir, "bench.md"), "w") as f:
        code = f"commit {(record['commit'] or 'unknown')[:12]}" + (" with changes to " + ", ".join(record["dirty"])
                                                                    if record["dirty"] else "")
        f.write(f"{record['gpu'] or record['cpu']}, torch {record['torch']}, triton {record['triton']}, {code}: "
                f"`{record['command']}`\n\n" + "\n\n".join(TABLES) + "\n")
    return path


def main(argv=None):
    global DEADLINE, STAGE_DEADLINE, SAVE_CELLS
    args = parse_args(argv)
    device = torch.device(train.default_device(args))
    DEADLINE = time.time() + args.budget
    sizes = SIZES["gpu" if device.type == "cuda" and not args.tiny else "cpu"]
    record = device_record(device, args, seeds=list(range(1, args.seeds + 1)))  # the training stages'
    print(f"bench on {record['gpu'] or 'CPU'}: torch {record['torch']}, triton {record['triton']}, budget "
          f"{args.budget:.0f} s, {'GPU' if sizes is SIZES['gpu'] else 'tiny'} sizes; {kernels.backend_info(device)}")
    results = {}
    stages = dict(kernels=lambda: stage_kernels(sizes, device, sweep_best(results.get("kernel_sweep"))),
                  lsh=lambda: stage_lsh(sizes, device),
                  reformer=lambda: stage_reformer(sizes, device), aft=lambda: stage_aft(sizes, device),
                  perceiver=lambda: stage_perceiver(sizes, device),
                  generate=lambda: stage_generate(sizes, device, args.models),
                  memory=lambda: stage_memory(sizes, device), models=lambda: stage_models(args, device),
                  reformer_cpu=lambda: stage_reformer_cpu(args, device),
                  same_budget=lambda: stage_same_budget(args, device),
                  long_context=lambda: stage_long_context(args, device), recall=lambda: stage_recall(args, device),
                  ladder=lambda: stage_ladder(args, device),
                  kernel_sweep=lambda: stage_kernel_sweep(sizes, device),
                  attention=lambda: stage_attention(args, device))
    try:
        for i, name in enumerate(args.stages):
            weights = [STAGE_WEIGHT.get(stage, 1) for stage in args.stages[i:]]
            STAGE_DEADLINE = time.time() + (DEADLINE - time.time()) * weights[0] / sum(weights)
            print(f"\n## {name} (until {STAGE_DEADLINE - time.time():.0f} s from now)")
            SAVE_CELLS = lambda rows: write_record(args, record, {**results, name: rows}, [])
            try:
                results[name] = stages[name]()
            except Exception as e:  # outside any cell (e.g. FlexAttention's compile): recorded, the next stage runs
                results[name] = [{"status": failure(e)}]
            path = write_record(args, record, results, [])  # after every stage too
    finally:
        SAVE_CELLS = None
    verdicts = targets(results) if device.type == "cuda" else []
    if verdicts:
        show("Targets (for one H100; see README)", [dict(target=t, verdict=v) for t, v in verdicts],
             [("target", "target", ""), ("verdict", "verdict", "")])
        path = write_record(args, record, results, verdicts)
    print(f"\nwrote {path} and bench.md")
    return results


if __name__ == "__main__":
    main()
