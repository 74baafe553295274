"""
Train any nanolong model on any data set, on a CPU, one GPU, or many under torchrun (DDP).

    python train.py --model aft_local                          # enwik8, or offline a fallback text
    python train.py --model sparse_strided --data cifar10 --block_size 3072 --stride 96
    python train.py --resume                                   # continue out/ckpt.pt exactly where it stopped
    torchrun --standalone --nproc_per_node 8 train.py --model reformer --block_size 65536

Flags below are common to all models; every field of the chosen model's Config is a flag too (--pattern,
--n_hashes, --window, --n_latents, ...): `python train.py --model NAME --help` lists them. The file reads top to
bottom: models and flags, optimizer and schedule, evaluation, checkpoints, then the loop (main). sample.py
generates from a checkpoint or scores it on a whole split, bench.py measures speed and memory.
"""
import argparse
import ast
import dataclasses
import importlib
import inspect
import json
import math
import os
import re
import signal
import sys
import tempfile
import threading
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import data as datasets
import kernels

# To add a model, add a line here and a file like aft.py (README, "Add a model"). The module provides a
# `Config` dataclass, whose fields all become flags (typed by their annotations; block_size, vocab_size, n_layer,
# n_head, n_embd and dropout are the shared ones), and the model class: Model(config) raises ValueError for
# settings it cannot take; forward(idx, targets=None) -> (logits, loss) with logits (B, T or the last k
# positions, V) and loss the mean cross-entropy in nats against the matching targets; generate(idx,
# max_new_tokens, temperature, top_k, generator, use_cache) -> idx; `exactly_causal = False` only if a later
# token can change an earlier output (sample.py --evaluate then also scores it on prefixes alone).
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
DATA_FLAGS = ("data", "audio_rate", "audio_seq_len")  # a checkpoint's data set: fixed when resuming
RUN_FLAGS = ("out_dir", "resume", "device", "compile")  # where and how this process runs: never the checkpoint's

# ----------------------------------------------------------------------------------------------------------
# Flags: parsed and checked in one place, so a value the code cannot take stops here with one sentence


def parse_args(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                add_help=False, allow_abbrev=False,
                                usage="python train.py [--model NAME] [flags]   (--help lists them)")
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
    p.add_argument("--grad_clip", type=float, default=1.0, help="clip the gradient norm to this (0: no clipping)")
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
    p.add_argument("--resume", action="store_true", help="continue from out_dir/ckpt.pt (its model and data)")
    p.add_argument("-h", "--help", action="store_true")
    args, _ = p.parse_known_args(argv)
    if args.model not in MODELS:
        p.error(f"--model {args.model!r} is not a model here; choose one of: {', '.join(MODELS)}")

    # The chosen model's own Config fields become flags, typed by their annotations; anything left over is an
    # error that lists them.
    module, _, variant = MODELS[args.model]
    Config = importlib.import_module(module).Config
    own = [f for f in dataclasses.fields(Config) if f.name not in SHARED_FIELDS and f.name not in variant]
    mp = argparse.ArgumentParser(prog=f"train.py --model {args.model}", parents=[p], add_help=False,
                                 allow_abbrev=False, usage=p.usage)
    helps = field_comments(Config)
    for f in own:  # argparse %-formats help texts, so a literal % is written %%
        mp.add_argument(f"--{f.name}", type=flag_type(f.type), default=None,
                        help=f"{helps[f.name]} (default {f.default!r})".replace("%", "%%"))
    if args.help:
        mp.print_help()
        sys.exit(0)
    given = {a.split("=")[0][2:] for a in argv if a.startswith("--")}  # flags typed on the command line
    args, unknown = mp.parse_known_args(argv)
    if unknown:
        hint = (" (a model's own flags are known with --model: add the checkpoint's --model NAME to resume with them)"
                if args.resume and "model" not in given else "")
        mp.error(f"unrecognized arguments: {' '.join(unknown)}{hint}")
    args.model_overrides = {f.name: getattr(args, f.name) for f in own if getattr(args, f.name) is not None}
    for f in own:
        delattr(args, f.name)
    args.given = given
    del args.help
    problem = check_args(args)
    if problem:
        mp.error(problem)
    return args


def field_comments(Config):
    """Each Config field's trailing comment by name, as written beside the field: its flag's help text."""
    lines = inspect.getsource(Config).splitlines()
    fields = [node for node in ast.parse("\n".join(lines)).body[0].body if isinstance(node, ast.AnnAssign)]
    # the rest of a field's last line after its default value is blank or its comment
    return {node.target.id: lines[node.end_lineno - 1][node.end_col_offset:].strip().lstrip("#").strip()
            for node in fields}


def flag_type(annotation):
    """The argparse type for a Config field: int, float, bool (true/false), str, or a tuple literal of ints."""
    if annotation is bool:
        def boolean(text):
            if text.lower() not in ("true", "false", "1", "0"):
                raise ValueError(text)
            return text.lower() in ("true", "1")
        boolean.__name__ = "true/false"
        return boolean
    if annotation is tuple:
        def int_tuple(text):
            try:
                value = ast.literal_eval(text) if text.strip() else ()
            except (ValueError, SyntaxError) as e:  # argparse turns only ValueError into its one-line message
                raise ValueError(text) from e
            if not isinstance(value, (tuple, list)) or not all(isinstance(v, int) for v in value):
                raise ValueError(text)
            return tuple(value)
        int_tuple.__name__ = "tuple of ints, e.g. '(64, 64)',"
        return int_tuple
    return annotation


def check_args(args):
    """One sentence naming the first flag whose value the code cannot take, or None."""
    at_least = {"block_size": 1, "n_layer": 1, "n_head": 1, "n_embd": 1, "batch_size": 1, "grad_accum": 1,
                "max_iters": 1, "eval_interval": 1, "eval_iters": 1, "audio_rate": 1, "audio_seq_len": 2,
                "warmup": 0, "lr_decay_iters": 1}
    for flag, low in at_least.items():
        value = getattr(args, flag)
        if value is not None and value < low:
            return f"--{flag} {value}: must be at least {low}"
    for flag in ("lr", "min_lr", "weight_decay", "grad_clip"):
        value = getattr(args, flag)
        if value is not None and not (math.isfinite(value) and value >= (1e-12 if flag == "lr" else 0)):
            return f"--{flag} {value}: must be a finite number, " + ("positive" if flag == "lr" else "0 or more")
    if not 0 <= args.dropout < 1:
        return f"--dropout {args.dropout}: must be a fraction in [0, 1)"
    for name, value in args.model_overrides.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and (value < 0 or value != value):
            return f"--{name} {value}: must not be negative (0 means automatic or off where --help says so)"
    problem = check_device(args.device)
    if problem or args.resume:
        return problem  # a checkpoint brings its own model settings, checked when it was trained
    try:  # the model's own checks, on the meta device: no memory, no time
        with torch.device("meta"):
            build_model(args.model, model_config(args.model, args, vocab_size=257, **args.model_overrides))
    except (ValueError, TypeError) as e:
        return f"{args.model}: {e}"
    return None


def check_device(name):
    if name == "auto":
        return None
    try:
        device = torch.device(name)
    except RuntimeError:
        return f"--device {name}: not a device; use auto, cpu, cuda or cuda:N"
    if device.type == "cuda" and not torch.cuda.is_available():
        return f"--device {name}: torch sees no CUDA GPU here; use --device cpu (or auto)"
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        return f"--device {name}: only {torch.cuda.device_count()} GPU(s) are visible"
    if device.type not in ("cpu", "cuda"):
        return f"--device {name}: nanolong runs on cpu or cuda"
    return None


def default_device(args):
    """--device, with auto meaning the GPU when there is one."""
    return ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device


def autocast_for(args, device):
    """Resolve --dtype auto and return (device_type, dtype, autocast context)."""
    device_type = "cuda" if str(device).startswith("cuda") else "cpu"
    if args.dtype == "auto":
        args.dtype = "bfloat16" if device_type == "cuda" and torch.cuda.is_bf16_supported() else "float32"
    dtype = getattr(torch, args.dtype)
    ctx = nullcontext() if dtype == torch.float32 else torch.autocast(device_type, dtype=dtype)
    return device_type, dtype, ctx


# ----------------------------------------------------------------------------------------------------------
# Model, optimizer, schedule

def build_model(name, config_dict):
    """Model `name` from Config values; the variant's own values (MODELS) are filled in."""
    module, cls, variant = MODELS[name]
    mod = importlib.import_module(module)
    return getattr(mod, cls)(mod.Config(**{**config_dict, **variant}))


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


# ----------------------------------------------------------------------------------------------------------
# Evaluation during training (sample.py --evaluate scores a checkpoint on a whole split)

@torch.no_grad()
def evaluate(model, data, args, device, ctx):
    """Mean loss in nats on eval_iters fixed batches of each split (the same batches at every evaluation; the
    two splits draw different ones, which matters for the copy task, whose batches are generated)."""
    model.eval()
    out = {}
    for split, seed in (("train", 12345), ("val", 54321)):
        sampler = datasets.BatchSampler(data, split, args.block_size, args.batch_size, seed=seed, device=device)
        losses = []
        for _ in range(args.eval_iters):
            x, y = sampler.next_batch()
            with ctx:
                losses.append(model(x, y)[1].item())
        out[split] = sum(losses) / len(losses)
    model.train()
    return out


# ----------------------------------------------------------------------------------------------------------
# Checkpoints: everything needed to resume exactly, written so that a good one is never lost

def load_checkpoint(path, purpose="--resume"):
    """The checkpoint at path, read as data only: torch.load(weights_only=True) rebuilds tensors and plain values
    (numbers, strings, lists, tuples, dicts) and refuses any other object before anything in the file runs, for
    unpickling an object can run code it names."""
    if not os.path.exists(path):
        hint = ("drop --resume to start afresh" if purpose == "--resume" else
                "train one first (python train.py --out_dir DIR) or point --out_dir at the run's folder")
        raise FileNotFoundError(f"{purpose} needs a checkpoint, but {path} does not exist; {hint}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        missing = {"model", "optimizer", "step", "args", "model_config", "rng", "samplers"} - set(ckpt)
    except Exception as e:  # truncated zip, bad pickle, wrong format: torch raises many types
        other = re.search(r"GLOBAL (\S+)", str(e))  # how torch names the object it refused
        if other:
            raise ValueError(f"checkpoint {path} was refused: it holds a {other[1]} object where train.py writes "
                             f"only tensors and plain values, and loading it could run code (none ran); use a "
                             f"checkpoint that train.py wrote") from e
        reason = str(e).split(". ")[0][:120]  # torch's own message runs to a paragraph
        raise ValueError(f"checkpoint {path} is damaged and cannot be read ({type(e).__name__}: {reason}); "
                         f"restore a copy or start afresh in another --out_dir") from e
    if missing:
        raise ValueError(f"checkpoint {path} lacks {sorted(missing)}; it was not written by this train.py")
    return ckpt


def check_resume(ckpt, args, path):
    """Resuming continues the checkpoint's run: its model, data and every setting (batch size, lr and schedule,
    max_iters, evaluation, dtype, seed, ...) replace the defaults in args, all but RUN_FLAGS. A model or data flag
    typed on the command line that differs from the checkpoint's is refused, naming both values; a typed training
    flag overrides the checkpoint's, and {flag: the checkpoint's value} of those is returned to be printed. A
    --max_iters the checkpoint has already reached is refused."""
    saved = {**ckpt["args"], **ckpt["model_config"]}
    for flag in sorted(args.given & (set(ckpt["model_config"]) | {"model", *DATA_FLAGS})):
        if flag == "block_size":
            continue  # a shorter training window is allowed (checked below); the model keeps its own
        value = args.model_overrides.get(flag, getattr(args, flag, None))
        if value != saved[flag]:
            raise ValueError(f"--{flag} {value} differs from the checkpoint's {saved[flag]} ({path}); resuming "
                             f"keeps the checkpoint's, so drop the flag, or train afresh in another --out_dir")
    overridden = {}
    for flag, value in ckpt["args"].items():
        if flag in RUN_FLAGS or not hasattr(args, flag):  # not hasattr: a flag this train.py no longer has
            continue
        if flag not in args.given:
            setattr(args, flag, value)
        elif getattr(args, flag) != value:
            overridden[flag] = value
    if args.block_size > ckpt["model_config"]["block_size"]:
        raise ValueError(f"--block_size {args.block_size} is larger than the checkpoint model's block_size "
                         f"{ckpt['model_config']['block_size']}; use at most that")
    if args.max_iters <= ckpt["step"]:
        raise ValueError(f"{path} is already at step {ckpt['step']}, so --max_iters {args.max_iters} leaves "
                         f"nothing to do; pass a larger --max_iters to train on")
    return overridden


def checkpoint_data(ckpt, path, refused):
    """The data ckpt was trained on, loaded again (an offline stand-in rebuilt as it was, whatever data/ holds now)
    and held to the checkpoint's record of it: other data stops with one sentence ending in `refused` (what is
    refused and what to do). A checkpoint written before records were kept gets a printed note instead."""
    args, record = ckpt["args"], ckpt.get("data")
    data = datasets.load_recorded(record, args["data"], args["audio_rate"], args["audio_seq_len"])
    if record is None:
        print(f"note: {path} predates data records, so its data cannot be checked; using {data.name}, what --data "
              f"{args['data']} loads now")
    elif data.record != record:
        now = data.name if data.name != record["name"] else \
            f"{data.name} with other contents (md5 {data.record['md5']}, recorded {record['md5']})"
        raise ValueError(f"{path} was trained on {record['name']}, but --data {args['data']} now loads {now}; "
                         f"{refused}")
    return data


class CtrlC:
    """Ctrl-C during training ends the run after the current step, between steps, where a checkpoint on disk and
    the step recorded as saved agree; a second Ctrl-C interrupts at once. A flag rather than Python's
    KeyboardInterrupt, which can land inside a finaliser and be swallowed there, leaving the run going."""

    def __init__(self):
        self.requested, self.previous = False, None
        if threading.current_thread() is threading.main_thread():  # only the main thread may set handlers
            self.previous = signal.signal(signal.SIGINT, self.request)

    def request(self, signum, frame):
        self.requested = True
        signal.signal(signal.SIGINT, self.previous)  # the next Ctrl-C: Python's own, at once

    def restore(self):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


def save_checkpoint(path, state):
    """Write to a temporary file, then rename: a run killed mid-write leaves the previous checkpoint intact."""
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def append_metrics(path, record, first, resumed_at):
    """Append one evaluation to the JSON-lines file at path, after its checkpoint is written so that the two
    agree. The first append of a fresh run starts the file anew; that of a resumed run keeps the lines up to the
    step it resumed from."""
    if first:
        kept = []
        if resumed_at is not None and os.path.exists(path):
            with open(path) as f:
                kept = [line for line in f if json.loads(line)["step"] <= resumed_at]
        with open(path, "w") as f:
            f.writelines(kept)
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


class Diverged(RuntimeError):
    """Training produced non-finite or worse-than-guessing numbers; the last good checkpoint is kept."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during training, saying the step reached and that of the last checkpoint; still a KeyboardInterrupt,
    so a caller such as bench.py stops too."""


def check_out_dir(path):
    """out_dir must be a folder we can write to; say so before any work is done."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"--out_dir {path} is a file, not a folder; choose another --out_dir")
    try:
        os.makedirs(path, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
    except OSError as e:
        raise ValueError(f"--out_dir {path} cannot be written ({e.strerror}); choose another --out_dir") from e


# ----------------------------------------------------------------------------------------------------------
# The loop

def setup_distributed(args):
    """(ddp, rank, world, device): under torchrun one process per GPU (or CPU processes with gloo)."""
    if "RANK" not in os.environ:
        return False, 0, 1, default_device(args)
    use_cuda = torch.cuda.is_available() and args.device != "cpu"
    dist.init_process_group("nccl" if use_cuda else "gloo")
    device = f"cuda:{int(os.environ['LOCAL_RANK'])}" if use_cuda else "cpu"
    if use_cuda:
        torch.cuda.set_device(device)
    return True, dist.get_rank(), dist.get_world_size(), device


def train_step(model, optimizer, scaler, sampler, args, ctx, ddp, step):
    """One optimizer step over grad_accum micro-batches -> mean loss. A non-finite gradient stops the run before
    the update, so the weights and the last checkpoint stay as they were (with fp16 the loss scaler skips such
    steps itself, as it calibrates its scale)."""
    loss_sum = 0.0
    for micro in range(args.grad_accum):
        x, y = sampler.next_batch()
        if ddp:  # all-reduce gradients only on the last micro-step
            model.require_backward_grad_sync = micro == args.grad_accum - 1
        with ctx:
            loss = model(x, y)[1] / args.grad_accum
        scaler.scale(loss).backward()
        loss_sum += loss.item()
    scaler.unscale_(optimizer)
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip or math.inf).item()
    if not math.isfinite(norm) and not scaler.is_enabled():
        raise Diverged(f"training diverged at step {step + 1}: the gradient is not finite (loss {loss_sum:.3g}), so "
                       f"the update was not made and the last checkpoint was left as it was; lower --lr (now "
                       f"{args.lr:g}) or raise --warmup")
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum


def checkpoint_state(model, optimizer, scaler, sampler, step, args, config, data, val_loss, device_type, ddp):
    """The checkpoint's contents, tensors and plain values only (load_checkpoint reads nothing else): under DDP every
    rank's sampler and RNG, so each resumes on its own stream, and the record of the data trained on."""
    samplers = [sampler.state_dict()]
    rng = {"torch": [torch.get_rng_state()], "cuda": [torch.cuda.get_rng_state()] if device_type == "cuda" else []}
    if ddp:
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, (samplers[0], rng["torch"][0], rng["cuda"]))
        samplers = [g[0] for g in gathered]
        rng = {"torch": [g[1] for g in gathered], "cuda": [c for g in gathered for c in g[2]]}
    args_record = {k: v for k, v in vars(args).items() if k != "given"}
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
            "step": step, "args": args_record, "model_config": config, "rng": rng, "samplers": samplers,
            "data": data.record, "val_loss": val_loss}


def restore(ckpt, model, optimizer, scaler, sampler, rank, device_type):
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scaler.load_state_dict(ckpt["scaler"])
    sampler.load_state_dict(ckpt["samplers"][rank])
    torch.set_rng_state(ckpt["rng"]["torch"][rank])
    if device_type == "cuda" and ckpt["rng"]["cuda"]:
        torch.cuda.set_rng_state(ckpt["rng"]["cuda"][rank])
    return ckpt["step"]


def main(argv=None):
    args = parse_args(argv)
    check_out_dir(args.out_dir)
    ckpt_path = os.path.join(args.out_dir, "ckpt.pt")
    ckpt = load_checkpoint(ckpt_path) if args.resume else None
    overridden = check_resume(ckpt, args, ckpt_path) if ckpt else {}
    ddp, rank, world, device = setup_distributed(args)
    master, log = rank == 0, print if rank == 0 else (lambda *a, **k: None)
    device_type, dtype, ctx = autocast_for(args, device)
    torch.manual_seed(args.seed + rank)

    if ckpt:
        data = checkpoint_data(ckpt, ckpt_path, "resuming on other data is refused: restore the data it was trained "
                                                "on, or train afresh in another --out_dir")
    else:
        data = datasets.load(args.data, audio_rate=args.audio_rate, audio_seq_len=args.audio_seq_len)
    log(data.describe())
    config = ckpt["model_config"] if ckpt else model_config(args.model, args, data.vocab_size, **args.model_overrides)
    model = build_model(args.model, config).to(device)
    sampler = datasets.BatchSampler(data, "train", args.block_size, args.batch_size, args.seed + rank, device)
    optimizer = configure_optimizers(model, args.weight_decay, args.lr, (0.9, 0.95), device_type)
    scaler = torch.amp.GradScaler(device_type, enabled=dtype == torch.float16)
    step = restore(ckpt, model, optimizer, scaler, sampler, rank, device_type) if ckpt else 0
    log(f"model: {args.model}, {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, config {config}"
        + (f"; resumed from {ckpt_path} at step {step}" if ckpt else ""))
    changed = [f"{k}={getattr(args, k)} (checkpoint: {v})" for k, v in overridden.items() if getattr(args, k) != v]
    if changed:  # (a typed --dtype auto may resolve to the checkpoint's own dtype)
        log("from the command line, overriding the checkpoint: " + ", ".join(changed))
    log(f"{kernels.backend_info(device)}; device {device}, dtype {args.dtype}, {world} process(es)")
    log("flags: " + " ".join(f"{k}={v}" for k, v in vars(args).items() if k != "given"))
    raw_model = model
    model = torch.compile(model) if args.compile else model
    if ddp:
        model = DDP(model, device_ids=[int(os.environ["LOCAL_RANK"])] if device_type == "cuda" else None)
    tokens_per_step = args.batch_size * args.block_size * args.grad_accum * world

    history = []  # per step {step, loss} and per evaluation {step, train_loss, val_loss}, for tests and notebooks
    bar = tqdm(initial=step, total=args.max_iters, disable=not master, desc="train")  # shows the loop, not drives it
    start, last_eval, t_eval = step, step, time.time()
    saved = start if ckpt else None  # the step of the checkpoint on disk
    ctrl_c = CtrlC()
    try:
        for step in range(start, args.max_iters):
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, args)
            loss = train_step(model, optimizer, scaler, sampler, args, ctx, ddp, step)
            history.append({"step": step, "loss": loss})
            bar.update()
            tokens_per_s = tokens_per_step * (step + 1 - last_eval) / (time.time() - t_eval)  # since the evaluation
            bar.set_postfix({"loss": f"{loss:.4f}", data.unit: f"{loss / math.log(2):.3f}",
                             "tokens/s": f"{tokens_per_s:,.0f}"})
            if (step + 1) % args.eval_interval == 0 or step + 1 == args.max_iters:
                losses = evaluate(model, data, args, device, ctx)
                history.append({"step": step, **{f"{k}_loss": v for k, v in losses.items()}})
                bits = {k: v / math.log(2) for k, v in losses.items()}
                if master:  # tqdm.write prints even for a disabled bar
                    bar.write(f"step {step + 1}: train {bits['train']:.4f} {data.unit}, val {bits['val']:.4f} "
                              f"{data.unit}, {tokens_per_s:,.0f} tokens/s")
                if not losses["val"] < math.log(data.vocab_size) + 1:  # NaN fails this too
                    raise Diverged(f"training diverged by step {step + 1}: validation loss {losses['val']:.3g} "
                                   f"nats is worse than guessing uniformly, so {ckpt_path} was not overwritten; "
                                   f"lower --lr")
                state = checkpoint_state(raw_model, optimizer, scaler, sampler, step + 1, args, config, data,
                                         losses["val"], device_type, ddp)
                if master:
                    save_checkpoint(ckpt_path, state)
                saved = step + 1  # on disk (rank 0 wrote it): what a Ctrl-C from here on reports
                if master:
                    record = dict(step=step + 1, tokens=(step + 1) * tokens_per_step, train_bits=bits["train"],
                                  val_bits=bits["val"], lr=lr_at(step, args), tokens_per_s=tokens_per_s,
                                  time=time.time())
                    append_metrics(os.path.join(args.out_dir, "metrics.jsonl"), record, first=last_eval == start,
                                   resumed_at=start if ckpt else None)
                last_eval, t_eval = step + 1, time.time()
            if ctrl_c.requested:
                raise KeyboardInterrupt
    except KeyboardInterrupt:
        bar.close()
        reached = history[-1]["step"] + 1 if history else start
        kept = (f"the last checkpoint, {ckpt_path}, is at step {saved} (--resume continues from there)"
                if saved is not None else f"no checkpoint was written (the first comes at step "
                                          f"{min(args.eval_interval, args.max_iters)})")
        raise Interrupted(f"stopped by Ctrl-C after step {reached} of {args.max_iters}; {kept}") from None
    finally:
        ctrl_c.restore()
    bar.close()
    if ddp:  # every rank done, and the DDP wrapper freed while all are alive: else gloo's teardown can hang
        dist.barrier()
        del model
        dist.destroy_process_group()
    return history


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError, Diverged) as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt as e:  # one line, no traceback, and the status shells give Ctrl-C (128 + SIGINT)
        print(str(e) or "stopped by Ctrl-C before training began", file=sys.stderr)
        sys.exit(130)
