"""
Train any nanolong model on any data set, on a CPU, one GPU, or many under torchrun (DDP).

    python train.py --model aft_local                          # enwik8, or offline a fallback text
    python train.py --model sparse_strided --data cifar10 --block_size 3072 --stride 96
    python train.py --model transformer --resume               # continue from out/ckpt.pt exactly
    torchrun --standalone --nproc_per_node 8 train.py --model reformer --block_size 65536

Flags below are common to all models; every field of the chosen model's Config is a flag too
(e.g. --pattern, --n_hashes, --window, --n_latents): `python train.py --model NAME --help` lists them.
"""
import argparse
import ast
import dataclasses
import importlib
import math
import os
import struct
import sys
import time
import wave
import zlib
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import data as datasets
import kernels

MODELS = {  # name: (module, model class, Config values that make the variant)
    "transformer": ("sparse_transformer", "SparseTransformer", {}),
    "sparse_strided": ("sparse_transformer", "SparseTransformer", {"pattern": "strided"}),
    "sparse_fixed": ("sparse_transformer", "SparseTransformer", {"pattern": "fixed"}),
    "reformer": ("reformer", "Reformer", {}),
    "aft_full": ("aft", "AFT", {"variant": "full"}),
    "aft_simple": ("aft", "AFT", {"variant": "simple"}),
    "aft_local": ("aft", "AFT", {"variant": "local"}),
    "aft_conv": ("aft", "AFT", {"variant": "conv"}),
    "perceiver_ar": ("perceiver_ar", "PerceiverAR", {}),
}
SHARED_FIELDS = ("block_size", "vocab_size", "n_layer", "n_head", "n_embd", "dropout")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                add_help=False)
    p.add_argument("--model", default="transformer", help=f"one of: {', '.join(MODELS)}")
    p.add_argument("--data", default="enwik8", help="enwik8, cifar10, audio, copy, text:PATH, wav:DIR, images:PATH")
    p.add_argument("--block_size", type=int, default=256, help="context length in tokens")
    p.add_argument("--n_layer", type=int, default=4)
    p.add_argument("--n_head", type=int, default=4)
    p.add_argument("--n_embd", type=int, default=256)
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--batch_size", type=int, default=16, help="sequences per micro-step per process")
    p.add_argument("--grad_accum", type=int, default=1, help="micro-steps per optimizer step")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--min_lr", type=float, default=None, help="end of the cosine (default lr / 10)")
    p.add_argument("--warmup", type=int, default=100, help="linear warmup steps")
    p.add_argument("--max_iters", type=int, default=2000, help="optimizer steps to run (in total, when resuming)")
    p.add_argument("--lr_decay_iters", type=int, default=None, help="length of the cosine (default max_iters)")
    p.add_argument("--weight_decay", type=float, default=0.1)
    p.add_argument("--grad_clip", type=float, default=1.0)
    p.add_argument("--eval_interval", type=int, default=250, help="evaluate and checkpoint every N steps")
    p.add_argument("--eval_iters", type=int, default=20, help="batches per evaluation")
    p.add_argument("--audio_rate", type=int, default=datasets.AUDIO_RATE)
    p.add_argument("--audio_seq_len", type=int, default=datasets.AUDIO_SEQ_LEN)
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="autocast dtype; auto = bfloat16 on GPUs that have it, float32 on CPU")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--out_dir", default="out")
    p.add_argument("--resume", action="store_true", help="continue from out_dir/ckpt.pt")
    p.add_argument("-h", "--help", action="store_true")
    p.add_argument("--evaluate", choices=["val", "test"], default=None,
                   help="score out_dir/ckpt.pt on the whole split in consecutive windows, then exit")
    g = p.add_argument_group("sampling (--sample: load out_dir/ckpt.pt and generate; see README)")
    g.add_argument("--sample", action="store_true", help="generate from the checkpoint instead of training")
    g.add_argument("--prompt", default=None, help="text prompt (default: a random validation excerpt)")
    g.add_argument("--num_samples", type=int, default=3, help="text continuations / images / audio clips")
    g.add_argument("--max_new_tokens", type=int, default=500, help="text: tokens to generate per sample")
    g.add_argument("--completions", type=int, default=3, help="images: completions of each half image")
    g.add_argument("--seconds", type=float, default=5.0, help="audio: seconds to generate")
    g.add_argument("--unconditional", action="store_true", help="images/audio: start from the start token alone")
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top_k", type=int, default=None)
    g.add_argument("--no_cache", action="store_true", help="recompute the whole context for every new token")
    args, rest = p.parse_known_args(argv)
    if args.model not in MODELS:
        raise ValueError(f"unknown model {args.model!r}; choose one of: {', '.join(MODELS)}")

    # The chosen model's own Config fields become flags; anything left over is an error that lists them.
    module, _, variant = MODELS[args.model]
    Config = importlib.import_module(module).Config
    own = [f for f in dataclasses.fields(Config) if f.name not in SHARED_FIELDS and f.name not in variant]
    mp = argparse.ArgumentParser(prog=f"train.py --model {args.model}", parents=[p], add_help=False)
    for f in own:
        mp.add_argument(f"--{f.name}", type=literal, default=None, help=f"{args.model} setting (default {f.default!r})")
    if args.help:
        mp.print_help()
        sys.exit(0)
    model_args = vars(mp.parse_args(argv))
    args.model_overrides = {f.name: model_args[f.name] for f in own if model_args[f.name] is not None}
    return args


def literal(text):
    """Flag values for model settings: Python literals (128, 0.5, True, (64, 64)) or plain strings."""
    text = {"true": "True", "false": "False", "none": "None"}.get(text.lower(), text)
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def build_model(name, config_dict):
    module, cls, _ = MODELS[name]
    mod = importlib.import_module(module)
    return getattr(mod, cls)(mod.Config(**config_dict))


def model_config(name, args, vocab_size, **overrides):
    """The Config values of model `name`: the shared flags, the variant's own values, then overrides."""
    shared = {k: getattr(args, k) for k in SHARED_FIELDS if k != "vocab_size"}
    return {**shared, "vocab_size": vocab_size, **MODELS[name][2], **overrides}


def configure_optimizers(model, weight_decay, learning_rate, betas, device_type):
    """AdamW with weight decay on matrices only (not on biases, norms or other 1-D parameters)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=device_type == "cuda")


def lr_at(step, args):
    """Linear warmup, then cosine from lr down to min_lr over lr_decay_iters steps."""
    decay_iters = args.lr_decay_iters or args.max_iters
    min_lr = args.lr / 10 if args.min_lr is None else args.min_lr
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    if step >= decay_iters:
        return min_lr
    ratio = (step - args.warmup) / max(1, decay_iters - args.warmup)
    return min_lr + 0.5 * (1 + math.cos(math.pi * ratio)) * (args.lr - min_lr)


def load_checkpoint(path):
    if not os.path.exists(path):
        raise FileNotFoundError(f"--resume given but {path} does not exist; drop --resume to start afresh")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        missing = {"model", "optimizer", "step", "args", "model_config", "rng", "samplers"} - set(ckpt)
    except Exception as e:  # truncated zip, bad pickle, wrong format: torch raises many types
        reason = str(e).split(". ")[0][:120]  # torch's own message runs to a paragraph
        raise ValueError(f"checkpoint {path} is damaged and cannot be read ({type(e).__name__}: {reason}); "
                         f"restore a copy or start afresh without --resume") from e
    if missing:
        raise ValueError(f"checkpoint {path} lacks {sorted(missing)}; it was not written by this train.py")
    return ckpt


def save_checkpoint(path, state):
    """Write to a temporary file, then rename: a run killed mid-write leaves the previous checkpoint intact."""
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


@torch.no_grad()
def evaluate(model, data, args, device, ctx):
    """Mean loss in nats on eval_iters fixed batches of each split (the same batches at every evaluation)."""
    model.eval()
    out = {}
    for split in ("train", "val"):
        sampler = datasets.BatchSampler(data, split, args.block_size, args.batch_size, seed=12345, device=device)
        losses = []
        for _ in range(args.eval_iters):
            x, y = sampler.next_batch()
            with ctx:
                losses.append(model(x, y)[1].item())
        out[split] = sum(losses) / len(losses)
    model.train()
    return out


@torch.no_grad()
def evaluate_split(model, data, split, block_size, batch_size, device, ctx):
    """Bits per token over a whole split in consecutive windows of block_size. Each window scores the targets
    of its last `k` positions (all of them for most models, the latents for Perceiver AR) and the next window
    starts k positions later, so every scored token is predicted once; within a row (images, audio) the first
    window starts at the start token. Returns (bits, tokens scored, tokens in the split)."""
    model.eval()
    tokens = data.splits[split]
    rows = [tokens] if tokens.dim() == 1 else [torch.cat([torch.tensor([data.bos]), r.long()]) for r in tokens]
    T = min(block_size, len(rows[0]) - 1)
    with ctx:
        k = model(rows[0][None, :T].long().to(device))[0].size(1)  # positions the model scores per window
    windows = [(r, s) for r in range(len(rows)) for s in range(0, len(rows[r]) - T, k)
               if s + T + 1 <= len(rows[r])]
    nats, count = 0.0, 0
    for i in tqdm(range(0, len(windows), batch_size), desc=f"evaluate {split}", unit="batch"):
        chunk = windows[i:i + batch_size]
        seq = torch.stack([rows[r][s:s + T + 1] for r, s in chunk]).long().to(device)  # (b, T + 1)
        with ctx:
            logits = model(seq[:, :-1])[0]  # (b, k, V): the last k positions
        targets = seq[:, -logits.size(1):]
        nats += F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1),
                                reduction="sum").item()
        count += targets.numel()
    total = sum(len(r) - 1 for r in rows)
    return nats / count / math.log(2), count, total


def default_device(args):
    """--device, with auto meaning the GPU when there is one."""
    return ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device


def load_trained(args, device):
    """The checkpoint in out_dir, its model (in eval mode, on device) and its data set."""
    ckpt = load_checkpoint(os.path.join(args.out_dir, "ckpt.pt"))
    model = build_model(ckpt["args"]["model"], ckpt["model_config"])
    model.load_state_dict(ckpt["model"])
    model.to(device).eval()
    data = datasets.load(ckpt["args"]["data"], ckpt["args"]["audio_rate"], ckpt["args"]["audio_seq_len"])
    return ckpt, model, data


def autocast_for(args, device):
    """Resolve --dtype auto and return (device_type, dtype, autocast context)."""
    device_type = "cuda" if str(device).startswith("cuda") else "cpu"
    if args.dtype == "auto":
        args.dtype = "bfloat16" if device_type == "cuda" and torch.cuda.is_bf16_supported() else "float32"
    dtype = getattr(torch, args.dtype)
    ctx = nullcontext() if dtype == torch.float32 else torch.autocast(device_type, dtype=dtype)
    return device_type, dtype, ctx


# ----------------------------------------------------------------------------------------------------------
# sampling: text to the terminal, images to a PNG grid, audio to WAV files (standard library writers)

def write_png(path, img):
    """uint8 [H, W, 3] -> PNG: signature, IHDR, one zlib-compressed IDAT (filter 0 per row), IEND."""
    h, w, _ = img.shape

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    raw = b"".join(b"\x00" + img[r].tobytes() for r in range(h))
    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)  # 8-bit RGB, no interlace
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9))
                + chunk(b"IEND", b""))


def write_wav(path, tokens, rate):
    """8-bit mu-law tokens -> 16-bit mono PCM WAV."""
    pcm = np.clip(datasets.mu_law_decode(np.asarray(tokens)) * 32767, -32767, 32767).astype("<i2")
    with wave.open(path, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())


def image_grid(rows, scale=4, pad=2):
    """Rows of token sequences (3072 each, raster order) -> one uint8 picture, 32x32 tiles upscaled."""
    tile = 32 * scale
    canvas = np.full((pad + len(rows) * (tile + pad), pad + max(map(len, rows)) * (tile + pad), 3), 255, np.uint8)
    for i, row in enumerate(rows):
        for j, seq in enumerate(row):
            img = seq.clamp(max=255).to(torch.uint8).view(32, 32, 3).cpu().numpy()  # (32, 32, 3)
            y, x = pad + i * (tile + pad), pad + j * (tile + pad)
            canvas[y:y + tile, x:x + tile] = img.repeat(scale, axis=0).repeat(scale, axis=1)
    return canvas


def generate(model, idx, n, args, gen, desc):
    """model.generate in up to 20 pieces so that a progress bar can follow (each piece re-primes the cache)."""
    piece = max(1, math.ceil(n / 20))
    with tqdm(total=n, desc=desc, unit="tok") as bar:
        while bar.n < n:
            k = min(piece, n - bar.n)
            idx = model.generate(idx, k, temperature=args.temperature, top_k=args.top_k, generator=gen,
                                 use_cache=not args.no_cache)
            bar.update(k)
    return idx


@torch.no_grad()
def sample(args):
    device = default_device(args)
    ckpt, model, data = load_trained(args, device)
    name, config = ckpt["args"]["model"], ckpt["model_config"]
    print(f"sampling from {name} (step {ckpt['step']}, {config}); {data.describe()}")
    gen = torch.Generator(device=device).manual_seed(args.seed)
    _, _, ctx = autocast_for(args, device)
    k = args.num_samples
    with ctx:
        if data.kind == "text":
            if args.prompt is not None:
                prompt = torch.tensor(list(args.prompt.encode()), dtype=torch.long)[None].repeat(k, 1)
            else:
                start = torch.randint(0, len(data.splits["val"]) - 256, (1,), generator=torch.Generator()
                                      .manual_seed(args.seed)).item()
                prompt = data.splits["val"][start:start + 256].long()[None].repeat(k, 1)
            out = generate(model, prompt.to(device), args.max_new_tokens, args, gen, "text")
            for i in range(k):
                print(f"\n--- sample {i + 1} ---\n{bytes(out[i].tolist()).decode('utf-8', errors='replace')}")
        elif data.kind == "image":
            k = min(k, len(data.splits["test"]))
            bos = torch.full((k, 1), data.bos, device=device)
            rows = []
            if not args.unconditional:  # prompt | completions | ground truth, per test image
                truth = data.splits["test"][:k].long().to(device)  # (k, 3072)
                prompt = torch.cat([bos, truth[:, :1536]], dim=1)
                completions = [generate(model, prompt, 1536, args, gen, f"completion {c + 1}")[:, 1:]
                               for c in range(args.completions)]
                top_half = torch.cat([truth[:, :1536], torch.full_like(truth[:, 1536:], 128)], dim=1)
                rows = [[top_half[i]] + [c[i] for c in completions] + [truth[i]] for i in range(k)]
            uncond = generate(model, bos, 3072, args, gen, "unconditional")[:, 1:]
            rows.append(list(uncond))
            path = os.path.join(args.out_dir, "samples.png")
            write_png(path, image_grid(rows))
            print(f"wrote {path}: " + ("" if args.unconditional else "rows of prompt | completions | "
                                       "ground truth, then ") + "a row of unconditional samples")
        elif data.kind == "copy":  # show the first half, ask for the second: it should repeat the first
            half_len = config["block_size"] // 2
            half = torch.randint(0, 256, (k, half_len), generator=torch.Generator().manual_seed(args.seed))
            prompt = torch.cat([torch.full((k, 1), data.bos), half], dim=1).to(device)
            out = generate(model, prompt, half_len, args, gen, "copy")[:, -half_len:].cpu()
            print(f"copy task: {(out == half).float().mean().item():.1%} of {k} x {half_len} tokens recalled "
                  f"across a distance of {half_len}")
        else:
            rate, k = ckpt["args"]["audio_rate"], min(k, len(data.splits["val"]))
            bos = torch.full((k, 1), data.bos, device=device)
            prompt = bos if args.unconditional else torch.cat(
                [bos, data.splits["val"][:k, :rate].long().to(device)], dim=1)  # up to 1 s of validation audio
            out = generate(model, prompt, int(args.seconds * rate), args, gen, "audio")[:, 1:]
            for i in range(k):
                path = os.path.join(args.out_dir, f"sample_{i + 1}.wav")
                write_wav(path, out[i].clamp(max=255).cpu().numpy(), rate)
                print(f"wrote {path} ({out.shape[1] / rate:.1f} s at {rate} Hz)")


def evaluate_checkpoint(args):
    device = default_device(args)
    ckpt, model, data = load_trained(args, device)
    if not data.splits:
        raise ValueError(f"{data.name} is generated on the fly and has no fixed split; --sample reports recall")
    _, _, ctx = autocast_for(args, device)
    block_size = ckpt["model_config"]["block_size"]
    bits, count, total = evaluate_split(model, data, args.evaluate, block_size, args.batch_size, device, ctx)
    print(f"{ckpt['args']['model']} (step {ckpt['step']}) on {data.name} {args.evaluate}: {bits:.4f} "
          f"{data.unit} over {count:,} of {total:,} tokens, windows of {block_size}")
    return bits


def main(argv=None):
    args = parse_args(argv)
    if args.sample:
        return sample(args)
    if args.evaluate:
        return evaluate_checkpoint(args)
    ddp = "RANK" in os.environ  # launched by torchrun
    if ddp:
        use_cuda = torch.cuda.is_available() and args.device != "cpu"
        dist.init_process_group("nccl" if use_cuda else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}" if use_cuda else "cpu"
        if use_cuda:
            torch.cuda.set_device(device)
    else:
        rank, world = 0, 1
        device = default_device(args)
    master = rank == 0
    device_type, dtype, ctx = autocast_for(args, device)
    torch.manual_seed(args.seed + rank)
    log = print if master else (lambda *a, **k: None)

    data = datasets.load(args.data, audio_rate=args.audio_rate, audio_seq_len=args.audio_seq_len)
    log(data.describe())
    ckpt_path = os.path.join(args.out_dir, "ckpt.pt")
    ckpt = load_checkpoint(ckpt_path) if args.resume else None
    if ckpt is not None:
        if ckpt["args"]["model"] != args.model:
            raise ValueError(f"{ckpt_path} holds a {ckpt['args']['model']} model, not {args.model}; "
                             f"pass --model {ckpt['args']['model']} or another --out_dir")
        if args.block_size > ckpt["model_config"]["block_size"]:
            raise ValueError(f"--block_size {args.block_size} is larger than the checkpoint model's block_size "
                             f"{ckpt['model_config']['block_size']}; use at most that")
        config = ckpt["model_config"]
    else:
        config = model_config(args.model, args, data.vocab_size, **args.model_overrides)
    model = build_model(args.model, config).to(device)
    sampler = datasets.BatchSampler(data, "train", args.block_size, args.batch_size, args.seed + rank, device)
    optimizer = configure_optimizers(model, args.weight_decay, args.lr, (0.9, 0.95), device_type)
    scaler = torch.amp.GradScaler(device_type, enabled=dtype == torch.float16)
    step = 0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        sampler.load_state_dict(ckpt["samplers"][rank])
        torch.set_rng_state(ckpt["rng"]["torch"][rank])
        if device_type == "cuda" and ckpt["rng"]["cuda"]:
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"][rank])
        step = ckpt["step"]
        log(f"resumed from {ckpt_path} at step {step}")

    n_params = sum(p.numel() for p in model.parameters())
    log(f"model: {args.model}, {n_params / 1e6:.2f}M parameters, config {config}")
    log(f"{kernels.backend_info(device)}; device {device}, dtype {args.dtype}, {world} process(es)")
    log("flags: " + " ".join(f"{k}={v}" for k, v in vars(args).items()))
    raw_model = model
    if args.compile:
        model = torch.compile(model)
    if ddp:
        model = DDP(model, device_ids=[int(os.environ["LOCAL_RANK"])] if device_type == "cuda" else None)
    tokens_per_step = args.batch_size * args.block_size * args.grad_accum * world
    os.makedirs(args.out_dir, exist_ok=True)

    history = []  # (step, train loss) per step and evaluations, returned for tests and notebooks
    bar = tqdm(range(step, args.max_iters), initial=step, total=args.max_iters, disable=not master, desc="train")
    t0 = time.time()
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args)
        loss_sum = 0.0
        for micro in range(args.grad_accum):
            x, y = sampler.next_batch()
            if ddp:  # all-reduce gradients only on the last micro-step
                model.require_backward_grad_sync = micro == args.grad_accum - 1
            with ctx:
                loss = model(x, y)[1] / args.grad_accum
            scaler.scale(loss).backward()
            loss_sum += loss.item()
        if args.grad_clip > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        history.append({"step": step, "loss": loss_sum})
        t1 = time.time()
        bar.set_postfix(loss=f"{loss_sum:.4f}", bits=f"{loss_sum / math.log(2):.3f}",
                        tok_s=f"{tokens_per_step / max(t1 - t0, 1e-9):,.0f}")
        t0 = t1

        done = step + 1
        if done % args.eval_interval == 0 or done == args.max_iters:
            losses = evaluate(model, data, args, device, ctx)
            history.append({"step": step, **{f"{k}_loss": v for k, v in losses.items()}})
            bar.write(f"step {done}: train {losses['train'] / math.log(2):.4f} {data.unit}, "
                      f"val {losses['val'] / math.log(2):.4f} {data.unit}")
            samplers = [sampler.state_dict()]
            rng = {"torch": [torch.get_rng_state()],
                   "cuda": [torch.cuda.get_rng_state()] if device_type == "cuda" else []}
            if ddp:  # every rank's sampler and RNG, so each resumes on its own stream
                gathered = [None] * world
                dist.all_gather_object(gathered, (samplers[0], rng["torch"][0], rng["cuda"]))
                samplers = [g[0] for g in gathered]
                rng = {"torch": [g[1] for g in gathered], "cuda": [c for g in gathered for c in g[2]]}
            if master:
                save_checkpoint(ckpt_path, {
                    "model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scaler": scaler.state_dict(), "step": done, "args": vars(args), "model_config": config,
                    "rng": rng, "samplers": samplers, "val_loss": losses["val"]})
    bar.close()
    if ddp:
        dist.destroy_process_group()
    return history


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
