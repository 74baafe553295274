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
import sys
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist
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


def model_config(args, vocab_size):
    _, _, variant = MODELS[args.model]
    shared = {k: getattr(args, k) for k in SHARED_FIELDS if k != "vocab_size"}
    return {**shared, "vocab_size": vocab_size, **variant, **args.model_overrides}


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
        raise ValueError(f"checkpoint {path} is damaged and cannot be read ({type(e).__name__}: {e}); "
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


def main(argv=None):
    args = parse_args(argv)
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
        device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    master = rank == 0
    device_type = "cuda" if device.startswith("cuda") else "cpu"
    if args.dtype == "auto":
        args.dtype = "bfloat16" if device_type == "cuda" and torch.cuda.is_bf16_supported() else "float32"
    dtype = getattr(torch, args.dtype)
    ctx = nullcontext() if dtype == torch.float32 else torch.autocast(device_type, dtype=dtype)
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
        config = model_config(args, data.vocab_size)
    model = build_model(args.model, config).to(device)
    sampler = datasets.BatchSampler(data, "train", args.block_size, args.batch_size, args.seed + rank, device)
    optimizer = model.configure_optimizers(args.weight_decay, args.lr, (0.9, 0.95), device_type)
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
    unit = "bits/dim" if data.kind == "image" else "bits/byte" if data.kind in ("text", "audio") else "bits/token"
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
            bar.write(f"step {done}: train {losses['train'] / math.log(2):.4f} {unit}, "
                      f"val {losses['val'] / math.log(2):.4f} {unit}")
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
