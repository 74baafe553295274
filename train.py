"""
Train any nanolong model on any data set, on a CPU, one GPU, or many under torchrun (DDP).

    python train.py --model aft_local                    # enwik8, or offline a fallback text
    python train.py --model sparse_strided --data cifar10 --block_size 3072 --stride 96
    python train.py --resume                             # continue out/ckpt.pt where it stopped
    torchrun --standalone --nproc_per_node 8 train.py --model reformer --block_size 65536

Every field of the chosen model's Config is a flag too (`python train.py --model NAME --help`
lists them): a number, True or False, a word (--pattern strided) or a tuple in quotes
(--axial_shape "(64, 64)"). The file reads top to bottom: models and flags, optimizer and
schedule, evaluation, checkpoints, then the loop (main).
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

import data
import kernels

# To add a model, add a line here and a file like perceiver_ar.py (README, "Add a model": a Config
# dataclass whose fields all become flags, a model class with forward and generate).
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
RUN_FLAGS = ("out_dir", "resume", "device", "compile")  # where and how this process runs

# ------------------------------------------------------------------------------------------------
# Flags: parsed and checked in one place, so a value the code cannot take stops here in one sentence


class Help(argparse.RawDescriptionHelpFormatter):
    """--help: the module docstring as written, and each flag's default after its help."""

    def _get_help_string(self, action):
        shown = action.default not in (None, argparse.SUPPRESS) and not isinstance(action.default, bool)
        shown = shown and "default" not in action.help  # a Config field's help names its default itself
        return action.help + (" (default %(default)s)" if shown else "")


def parse_args(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=Help, add_help=False,
                                allow_abbrev=False,
                                usage="python train.py [--model NAME] [flags]   (--help lists them)")
    add = p.add_argument
    add("--model", default="transformer", help=f"one of: {', '.join(MODELS)}")
    add("--data", default="enwik8", help="enwik8 (offline: Python's help text), cifar10, audio, "
                                         "copy, text:PATH, wav:DIR or images:PATH")
    add("--block_size", type=int, default=256, help="context length in tokens")
    add("--n_layer", type=int, default=4, help="layers")
    add("--n_head", type=int, default=4, help="heads per layer; n_embd / n_head each")
    add("--n_embd", type=int, default=256, help="width of every layer")
    add("--dropout", type=float, default=0.0, help="dropout rate in training")
    add("--batch_size", type=int, default=16, help="sequences per micro-step per process")
    add("--grad_accum", type=int, default=1, help="micro-steps per optimizer step")
    add("--lr", type=float, default=1e-3, help="AdamW's peak learning rate")
    add("--min_lr", type=float, default=None, help="end of the cosine (default lr / 10)")
    add("--warmup", type=int, default=100, help="linear warmup steps")
    add("--max_iters", type=int, default=2000, help="optimizer steps, in total when resuming")
    add("--lr_decay_iters", type=int, default=None,
        help="where the cosine ends (default max_iters; --resume keeps it)")
    add("--weight_decay", type=float, default=0.1, help="AdamW's, on matrices only")
    add("--grad_clip", type=float, default=1.0, help="clip the gradient norm to this; 0: off")
    add("--eval_interval", type=int, default=250, help="evaluate and checkpoint every N steps")
    add("--eval_iters", type=int, default=20, help="batches per evaluation")
    add("--audio_rate", type=int, default=data.AUDIO_RATE, help="audio: samples per second")
    add("--audio_seq_len", type=int, default=data.AUDIO_SEQ_LEN, help="audio: samples per row")
    add("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
        help="autocast dtype; auto: bfloat16 where GPUs have it, else float32")
    add("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    add("--compile", action="store_true", help="torch.compile the model")
    add("--seed", type=int, default=1337, help="seeds weights, batches and dropout")
    add("--out_dir", default="out", help="where ckpt.pt and metrics.jsonl go")
    add("--resume", action="store_true", help="continue from out_dir/ckpt.pt (its model and data)")
    args, _ = p.parse_known_args(argv)
    if args.model not in MODELS:
        p.error(f"--model {args.model!r} is not a model here; choose one of: {', '.join(MODELS)}")

    # The chosen model's own Config fields become flags, typed by their annotations
    module, _, variant = MODELS[args.model]
    Config = importlib.import_module(module).Config
    own = [f for f in dataclasses.fields(Config) if f.name not in SHARED_FIELDS + tuple(variant)]
    group = p.add_argument_group(f"{args.model}'s own flags (its Config fields)")
    add_config_flags(group, Config, own)
    add("-h", "--help", action="help", help="these flags; with --model NAME also the model's own")
    args, unknown = p.parse_known_args(argv)
    args.given = {a.split("=")[0][2:] for a in argv if a.startswith("--")}  # typed ones
    if unknown:
        hint = (" (a model's own flags are known with --model: add the checkpoint's --model NAME "
                "to resume with them)" if args.resume and "model" not in args.given else "")
        p.error(f"unrecognized arguments: {' '.join(unknown)}{hint}")
    typed_own = {f.name: vars(args).pop(f.name) for f in own}  # out of args, which checkpoints record
    args.model_overrides = {name: value for name, value in typed_own.items() if value is not None}
    problem = check_args(args)
    if problem:
        p.error(problem)
    args.lr_decay_iters = args.lr_decay_iters or args.max_iters  # the schedule's horizon
    return args


def add_config_flags(group, Config, fields):
    """Config's `fields` as flags of an argparse group, typed by their annotations, defaulting to
    None (not typed); each flag's help is the comment written beside its field, then its default."""
    lines = inspect.getsource(Config).splitlines()
    nodes = [n for n in ast.parse("\n".join(lines)).body[0].body if isinstance(n, ast.AnnAssign)]
    # the rest of a field's last line after its default value is blank or its comment
    helps = {n.target.id: lines[n.end_lineno - 1][n.end_col_offset:].strip().lstrip("#").strip()
             for n in nodes}
    for f in fields:  # argparse %-formats help texts, so a literal % is written %%
        group.add_argument(f"--{f.name}", type=flag_type(f.type), default=None,
                           help=f"{helps[f.name]} (default {f.default!r})".replace("%", "%%"))


def flag_type(annotation):
    """The argparse type of a Config field: int, float, bool (true/false), str, a tuple of ints."""
    def boolean(text):
        if text.lower() not in ("true", "false", "1", "0"):
            raise ValueError(text)
        return text.lower() in ("true", "1")

    def int_tuple(text):
        try:
            value = ast.literal_eval(text) if text.strip() else ()
        except (ValueError, SyntaxError) as e:  # argparse words only a ValueError
            raise ValueError(text) from e
        if not isinstance(value, (tuple, list)) or not all(isinstance(v, int) for v in value):
            raise ValueError(text)
        return tuple(value)

    boolean.__name__ = "true/false"  # the names argparse's messages give them
    int_tuple.__name__ = "tuple of ints, e.g. '(64, 64)',"
    return {bool: boolean, tuple: int_tuple}.get(annotation, annotation)


def check_args(args):
    """One sentence naming the first flag whose value the code cannot take, or None."""
    at_least = {"block_size": 1, "n_layer": 1, "n_head": 1, "n_embd": 1, "batch_size": 1,
                "grad_accum": 1, "max_iters": 1, "eval_interval": 1, "eval_iters": 1, "audio_rate": 1,
                "audio_seq_len": 2, "warmup": 0, "lr_decay_iters": 1, "min_lr": 0, "weight_decay": 0,
                "grad_clip": 0, "lr": 1e-12}
    for flag, low in at_least.items():  # the float flags must be finite too, and lr positive
        value = getattr(args, flag)
        if value is not None and not (math.isfinite(value) and value >= low):
            finite = "a finite number, " if type(value) is float else ""
            return f"--{flag} {value}: must be {finite}" + ("positive" if flag == "lr" else f"at least {low}")
    if not 0 <= args.dropout < 1:
        return f"--dropout {args.dropout}: must be a fraction in [0, 1)"
    for name, value in args.model_overrides.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and not value >= 0:
            return (f"--{name} {value}: must not be negative (0 means automatic or off where --help "
                    f"says so)")
    problem = check_device(args.device)
    if problem or args.resume:
        return problem  # a checkpoint brings its own model settings, checked when it was trained
    try:  # the model's own checks, on the meta device: no memory, no time
        with torch.device("meta"):
            build_model(args.model, model_config(args.model, args, 257, **args.model_overrides))
    except (ValueError, TypeError) as e:
        return f"{args.model}: {e}"
    return None


def check_device(name):
    """One sentence if --device names no device torch can use here, else None."""
    try:
        device = torch.device("cpu" if name == "auto" else name)
    except RuntimeError:
        return f"--device {name}: not a device; use auto, cpu, cuda or cuda:N"
    if device.type not in ("cpu", "cuda"):
        return f"--device {name}: nanolong runs on cpu or cuda"
    gpus = torch.cuda.device_count()
    if device.type == "cuda" and (device.index or 0) >= gpus:
        return f"--device {name}: " + (f"only {gpus} GPU(s) are visible" if gpus else
                                       "torch sees no CUDA GPU here; use --device cpu (or auto)")
    return None


def default_device(args):
    """--device, with auto meaning the GPU when there is one."""
    return args.device if args.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"


def autocast_for(args, device):
    """Resolve --dtype auto and return (device_type, dtype, autocast context)."""
    device_type = "cuda" if str(device).startswith("cuda") else "cpu"
    if args.dtype == "auto":
        bf16 = device_type == "cuda" and torch.cuda.is_bf16_supported()
        args.dtype = "bfloat16" if bf16 else "float32"
    dtype = getattr(torch, args.dtype)
    ctx = nullcontext() if dtype == torch.float32 else torch.autocast(device_type, dtype=dtype)
    return device_type, dtype, ctx


# ------------------------------------------------------------------------------------------------
# Model, optimizer, schedule, evaluation (sample.py --evaluate scores a whole split)

def build_model(name, config_dict):
    """Model `name` from Config values; the variant's own values (MODELS) are filled in."""
    module, cls, variant = MODELS[name]
    mod = importlib.import_module(module)
    return getattr(mod, cls)(mod.Config(**{**config_dict, **variant}))


def model_config(name, args, vocab_size, **overrides):
    """The Config values of model `name`: the shared flags, the variant's own values, overrides."""
    shared = {k: getattr(args, k) for k in SHARED_FIELDS if k != "vocab_size"}
    return {**shared, "vocab_size": vocab_size, **MODELS[name][2], **overrides}


def configure_optimizers(model, weight_decay, learning_rate, betas, device_type):
    """AdamW with weight decay on matrices only (not on biases, norms or other 1-D parameters)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=device_type == "cuda")


def lr_at(step, args):
    """Linear warmup, then cosine from lr down to min_lr at step lr_decay_iters, the schedule's
    horizon; past it (a run extended with --resume --max_iters) the rate stays at min_lr."""
    min_lr = args.lr / 10 if args.min_lr is None else args.min_lr
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    if step >= args.lr_decay_iters:
        return min_lr
    ratio = (step - args.warmup) / max(1, args.lr_decay_iters - args.warmup)
    return min_lr + 0.5 * (1 + math.cos(math.pi * ratio)) * (args.lr - min_lr)


@torch.no_grad()
def evaluate(model, dataset, args, device, ctx):
    """Mean loss in nats on eval_iters fixed batches of each split, the same at every evaluation
    (the splits draw different ones, which matters for the copy task's generated batches)."""
    model.eval()
    out = {}
    for split, seed in (("train", 12345), ("val", 54321)):
        sampler = data.BatchSampler(dataset, split, args.block_size, args.batch_size, seed, device)
        losses = []
        for _ in range(args.eval_iters):
            x, y = sampler.next_batch()
            with ctx:
                losses.append(model(x, y)[1].item())
        out[split] = sum(losses) / len(losses)
    model.train()
    return out


# ------------------------------------------------------------------------------------------------
# Checkpoints: data never code, the same run when resumed, on the same data, never a worse one saved

def load_checkpoint(path, purpose="--resume"):
    """The checkpoint at path, read as data only: torch.load(weights_only=True) rebuilds tensors and
    plain values and refuses any other object before anything in the file runs (unpickling an
    object can run code it names)."""
    if not os.path.exists(path):
        hint = ("drop --resume to start afresh" if purpose == "--resume" else "train one first "
                "(python train.py --out_dir DIR) or point --out_dir at the run's folder")
        raise FileNotFoundError(f"{purpose} needs a checkpoint, but {path} does not exist; {hint}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        missing = {"model", "optimizer", "step", "args", "model_config", "rng", "samplers"}
        missing -= set(ckpt)
    except Exception as e:  # truncated zip, bad pickle, wrong format: torch raises many types
        other = re.search(r"GLOBAL (\S+)", str(e))  # how torch names the object it refused
        if other:
            raise ValueError(f"checkpoint {path} was refused: it holds a {other[1]} object where "
                             f"train.py writes only tensors and plain values, and loading it could "
                             f"run code (none ran); use a checkpoint that train.py wrote") from e
        reason = str(e).split(". ")[0][:120]  # torch's own message runs to a paragraph
        raise ValueError(f"checkpoint {path} is damaged and cannot be read ({type(e).__name__}: "
                         f"{reason}); restore a copy or start afresh in another --out_dir") from e
    if missing:
        raise ValueError(f"checkpoint {path} lacks {sorted(missing)}; it was not written by this "
                         f"train.py")
    if "attn_block" in ckpt["model_config"]:  # the Sparse Transformer's tile, named so until 2026-12-04
        ckpt["model_config"]["tile"] = ckpt["model_config"].pop("attn_block")
    return ckpt


def same_run_settings(args, ckpt, path):
    """--resume continues the checkpoint's run: every setting not typed is the checkpoint's (but
    RUN_FLAGS). A typed model or data flag that differs is refused; a typed training flag (--lr
    after a divergence, say) overrides the checkpoint's. -> lines to print."""
    trained = {**ckpt["args"], **ckpt["model_config"]}
    for flag in sorted(args.given & (set(ckpt["model_config"]) | {"model", *DATA_FLAGS})):
        value = args.model_overrides.get(flag, getattr(args, flag, None))
        if value != trained[flag]:
            raise ValueError(f"--{flag} {value} differs from the checkpoint's {trained[flag]} ({path}); "
                             f"resuming keeps the checkpoint's, so drop the flag, or train afresh in "
                             f"another --out_dir")
    saved = dict(ckpt["args"])
    saved["lr_decay_iters"] = saved.get("lr_decay_iters") or saved["max_iters"]  # None: older ones
    typed = []
    for flag in saved:
        if flag in RUN_FLAGS or not hasattr(args, flag):  # not hasattr: a flag train.py dropped
            continue
        if flag not in args.given:
            setattr(args, flag, saved[flag])
        elif getattr(args, flag) != saved[flag]:
            typed.append(f"{flag}={getattr(args, flag)} (checkpoint: {saved[flag]})")
    if args.max_iters <= ckpt["step"]:
        raise ValueError(f"{path} is already at step {ckpt['step']}, so --max_iters {args.max_iters} "
                         f"leaves nothing to do; pass a larger --max_iters")
    lines = [f"resumed from {path} at step {ckpt['step']}"]
    if typed:
        lines.append("from the command line, overriding the checkpoint: " + ", ".join(typed))
    extended = args.max_iters > max(saved["max_iters"], args.lr_decay_iters)
    if extended and "lr_decay_iters" not in args.given:
        lines.append(f"the run keeps its schedule: the cosine ends at step {args.lr_decay_iters} "
                     f"and the steps after it run at min_lr (--lr_decay_iters N moves the end)")
    return lines


def checkpoint_state(parts, step, args, config, dataset, val_loss, device_type, ddp):
    """Everything to resume exactly, as tensors and plain values (what load_checkpoint reads): the
    state of parts (model, optimizer, loss scaler, sampler) and, under DDP, every rank's sampler and
    RNG."""
    model, optimizer, scaler, sampler = parts
    samplers = [sampler.state_dict()]
    rng = {"torch": [torch.get_rng_state()],
           "cuda": [torch.cuda.get_rng_state()] if device_type == "cuda" else []}
    if ddp:
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, (samplers[0], rng["torch"][0], rng["cuda"]))
        samplers = [g[0] for g in gathered]
        rng = {"torch": [g[1] for g in gathered], "cuda": [c for g in gathered for c in g[2]]}
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict(), "step": step, "model_config": config, "rng": rng,
            "args": {k: v for k, v in vars(args).items() if k != "given"}, "samplers": samplers,
            "data": dataset.record, "val_loss": val_loss}


def save_unless_diverged(path, state, write):
    """Write state to path, unless its validation loss is worse than guessing uniformly: a diverging
    run never overwrites a good checkpoint. A temporary file, then a rename: a run killed mid-write
    leaves the previous checkpoint whole. (Under DDP every rank checks; rank 0 writes.)"""
    if not state["val_loss"] < math.log(state["model_config"]["vocab_size"]) + 1:  # NaN fails too
        raise Diverged(f"training diverged by step {state['step']}: validation loss "
                       f"{state['val_loss']:.3g} nats is worse than guessing uniformly, so {path} "
                       f"was not overwritten; lower --lr")
    if write:
        torch.save(state, path + ".tmp")
        os.replace(path + ".tmp", path)


def report_evaluation(args, dataset, step, losses, tokens_per_step, tokens_per_s, start, first):
    """Print an evaluation and append it to out_dir/metrics.jsonl, once its checkpoint is written so
    that the two agree. A run's first report keeps the lines up to the step it started from: the
    file is one curve."""
    bits = {k: v / math.log(2) for k, v in losses.items()}
    tqdm.write(f"step {step}: train {bits['train']:.4f} {dataset.unit}, val {bits['val']:.4f} "
               f"{dataset.unit}, {tokens_per_s:,.0f} tokens/s")  # tqdm.write: below the bar
    record = dict(step=step, tokens=step * tokens_per_step, train_bits=bits["train"],
                  val_bits=bits["val"], lr=lr_at(step - 1, args), tokens_per_s=tokens_per_s,
                  time=time.time())
    path, kept = os.path.join(args.out_dir, "metrics.jsonl"), []
    if first and os.path.exists(path):
        with open(path) as f:
            kept = [line for line in f if json.loads(line)["step"] <= start]
    with open(path, "w" if first else "a") as f:
        f.writelines(kept + [json.dumps(record) + "\n"])


def check_out_dir(path):
    """out_dir must be a folder we can write to; say so before any work is done."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"--out_dir {path} is a file, not a folder; choose another --out_dir")
    try:
        os.makedirs(path, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
    except OSError as e:
        raise ValueError(f"--out_dir {path} cannot be written ({e.strerror}); choose another "
                         f"--out_dir") from e


class Diverged(RuntimeError):
    """Non-finite or worse-than-guessing numbers in training; the last good checkpoint is kept."""


class CtrlC:
    """Ctrl-C during training sets a flag that the loop reads between steps, where the checkpoint on
    disk and the step recorded as saved agree (a KeyboardInterrupt can land in a finaliser and be
    swallowed there); a second Ctrl-C interrupts at once."""

    def __init__(self):
        self.requested, self.previous = False, None
        if threading.current_thread() is threading.main_thread():  # only it may set handlers
            self.previous = signal.signal(signal.SIGINT, self.request)

    def request(self, signum, frame):
        self.requested = True
        signal.signal(signal.SIGINT, self.previous)  # the next Ctrl-C: Python's own, at once

    def restore(self):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


# ------------------------------------------------------------------------------------------------
# The loop

def setup_distributed(args):
    """(ddp, rank, world, device): under torchrun one process per GPU (or CPU processes, gloo)."""
    if "RANK" not in os.environ:
        return False, 0, 1, default_device(args)
    use_cuda = torch.cuda.is_available() and args.device != "cpu"
    dist.init_process_group("nccl" if use_cuda else "gloo")
    device = f"cuda:{int(os.environ['LOCAL_RANK'])}" if use_cuda else "cpu"
    if use_cuda:
        torch.cuda.set_device(device)
    return True, dist.get_rank(), dist.get_world_size(), device


def start_run(args, ckpt, path, ddp, rank, device, device_type, dtype):
    """(data, model config, the model to train, (model, optimizer, loss scaler, batch sampler),
    first step): new, or the checkpoint's restored exactly, each rank on its own sampler and RNG
    stream. The model to train is the model, compiled with --compile and wrapped by DDP."""
    torch.manual_seed(args.seed + rank)
    refused = ("resuming on other data is refused: restore the data it was trained on, or train "
               "afresh in another --out_dir")
    dataset = (data.load_recorded(ckpt, path, refused) if ckpt else
               data.load(args.data, args.audio_rate, args.audio_seq_len))
    config = ckpt["model_config"] if ckpt else model_config(args.model, args, dataset.vocab_size,
                                                            **args.model_overrides)
    model = build_model(args.model, config).to(device)
    optimizer = configure_optimizers(model, args.weight_decay, args.lr, (0.9, 0.95), device_type)
    scaler = torch.amp.GradScaler(device_type, enabled=dtype == torch.float16)
    sampler = data.BatchSampler(dataset, "train", args.block_size, args.batch_size,
                                args.seed + rank, device)
    parts = model, optimizer, scaler, sampler
    if ckpt:
        states = ckpt["model"], ckpt["optimizer"], ckpt["scaler"], ckpt["samplers"][rank]
        for part, state in zip(parts, states):
            part.load_state_dict(state)
        torch.set_rng_state(ckpt["rng"]["torch"][rank])
        if device_type == "cuda" and ckpt["rng"]["cuda"]:
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"][rank])
    trained = torch.compile(model) if args.compile else model
    if ddp:
        local = [int(os.environ["LOCAL_RANK"])] if device_type == "cuda" else None
        trained = DDP(trained, device_ids=local)
    return dataset, config, trained, parts, ckpt["step"] if ckpt else 0


def describe_run(args, dataset, config, model, notes, device, world):
    """What a run prints at its start: data, model, resume notes, backend, and every flag as
    used."""
    used = {k: v for k, v in vars(args).items() if k != "given"}
    if dataset.name != args.data:  # the data trained on: an offline stand-in's own name, say
        used["data"] = f"{dataset.name} (for --data {args.data})"
    n_params = sum(p.numel() for p in model.parameters()) / 1e6
    return "\n".join([dataset.describe(),
                      f"model: {args.model}, {n_params:.2f}M parameters, config {config}", *notes,
                      f"{kernels.backend_info(device)}; device {device}, dtype {args.dtype}, "
                      f"{world} process(es)", "flags: " + " ".join(f"{k}={v}" for k, v in used.items())])


def train_step(model, optimizer, scaler, sampler, args, ctx, ddp, step):
    """One optimizer step over grad_accum micro-batches -> mean loss. A non-finite gradient stops
    the run before the update, so the weights and the last checkpoint stay as they were (with fp16
    the loss scaler skips such steps itself, as it calibrates its scale)."""
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
        raise Diverged(f"training diverged at step {step + 1}: the gradient is not finite (loss "
                       f"{loss_sum:.3g}), so the update was not made and the last checkpoint was "
                       f"left as it was; lower --lr (now {args.lr:g}) or raise --warmup")
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum


def main(argv=None):
    args = parse_args(argv)
    check_out_dir(args.out_dir)
    ckpt_path = os.path.join(args.out_dir, "ckpt.pt")
    ckpt = load_checkpoint(ckpt_path) if args.resume else None
    notes = same_run_settings(args, ckpt, ckpt_path) if ckpt else []
    ddp, rank, world, device = setup_distributed(args)
    device_type, dtype, ctx = autocast_for(args, device)
    dataset, config, model, parts, start = start_run(args, ckpt, ckpt_path, ddp, rank, device,
                                                     device_type, dtype)
    _, optimizer, scaler, sampler = parts
    if rank == 0:
        print(describe_run(args, dataset, config, parts[0], notes, device, world))
    tokens_per_step = args.batch_size * args.block_size * args.grad_accum * world

    history = []  # per step {step, loss}, per evaluation {step, train_loss, val_loss}: for tests
    bar = tqdm(initial=start, total=args.max_iters, disable=rank != 0, desc="train")  # only shows
    last_eval, t_eval, saved = start, time.time(), start if ckpt else None  # saved: step on disk
    ctrl_c = CtrlC()
    try:
        for step in range(start, args.max_iters):
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, args)
            loss = train_step(model, optimizer, scaler, sampler, args, ctx, ddp, step)
            history.append({"step": step, "loss": loss})
            tokens_per_s = tokens_per_step * (step + 1 - last_eval) / (time.time() - t_eval)
            bar.update()
            bar.set_postfix({"loss": f"{loss:.4f}", dataset.unit: f"{loss / math.log(2):.3f}",
                             "tokens/s": f"{tokens_per_s:,.0f}"})
            if (step + 1) % args.eval_interval == 0 or step + 1 == args.max_iters:
                losses = evaluate(model, dataset, args, device, ctx)
                history.append({"step": step, **{f"{k}_loss": v for k, v in losses.items()}})
                state = checkpoint_state(parts, step + 1, args, config, dataset, losses["val"],
                                         device_type, ddp)
                save_unless_diverged(ckpt_path, state, rank == 0)
                saved = step + 1  # on disk (rank 0 wrote it): what a Ctrl-C from here on reports
                if rank == 0:
                    report_evaluation(args, dataset, step + 1, losses, tokens_per_step, tokens_per_s,
                                      start, first=last_eval == start)
                last_eval, t_eval = step + 1, time.time()
            if ctrl_c.requested:
                raise KeyboardInterrupt
    except KeyboardInterrupt:  # one line: the step reached and the last checkpoint's (bench.py stops too)
        kept = (f"the last checkpoint, {ckpt_path}, is at step {saved} (--resume continues from "
                f"there)" if saved is not None else "no checkpoint was written (the first comes at "
                f"step {min(args.eval_interval, args.max_iters)})")
        reached = history[-1]["step"] + 1 if history else start
        raise KeyboardInterrupt(f"stopped by Ctrl-C after step {reached} of {args.max_iters}; "
                                f"{kept}") from None
    finally:
        ctrl_c.restore()
        bar.close()
    if ddp:  # every rank done, and the DDP wrapper freed while all are alive: else gloo can hang
        dist.barrier()
        del model
        dist.destroy_process_group()
    return history


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError, Diverged) as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt as e:  # one line, no traceback, and the status of Ctrl-C in shells
        print(str(e) or "stopped by Ctrl-C before training began", file=sys.stderr)
        sys.exit(130)
