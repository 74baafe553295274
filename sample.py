"""
Use a trained checkpoint: generate from it (text to the terminal, images to a PNG grid, audio to WAV files, and
for the copy task the fraction of tokens recalled), or score it on a whole split (--evaluate). The model and the
data it was trained on come from out_dir/ckpt.pt (other data is refused).

    python sample.py --out_dir out --prompt "The history of"      # text: 3 continuations
    python sample.py --out_dir out_cifar --num_samples 4            # images: out_cifar/samples.png
    python sample.py --out_dir out_audio --seconds 5                # audio: out_audio/sample_1.wav ...
    python sample.py --out_dir out --evaluate test                  # bits per byte over the whole test split
    python sample.py --out_dir out --show_attention                 # out/attention.png: what outputs read
"""
import argparse
import json
import math
import os
import struct
import sys
import wave
import zlib

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import data
import train


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--out_dir", default="out", help="the run whose ckpt.pt to sample from")
    p.add_argument("--prompt", default=None, help="text prompt (default: a random 64-byte validation excerpt)")
    p.add_argument("--num_samples", type=int, default=3, help="text continuations / images / audio clips")
    p.add_argument("--max_new_tokens", type=int, default=500, help="text: tokens to generate per sample")
    p.add_argument("--completions", type=int, default=3, help="images: completions of each half image")
    p.add_argument("--seconds", type=float, default=5.0, help="audio: seconds to generate")
    p.add_argument("--unconditional", action="store_true", help="images/audio: start from the start token alone")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top_k", type=int, default=None, help="sample among the k most likely tokens only")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--evaluate", choices=["val", "test"], default=None,
                   help="instead of generating, score the checkpoint on the whole split in consecutive windows")
    p.add_argument("--batch_size", type=int, default=16, help="--evaluate: windows per forward")
    p.add_argument("--show_attention", action="store_true",
                   help="instead of generating, draw what each output depends on (out_dir/attention.png)")
    args = p.parse_args(argv)
    for flag in ("num_samples", "max_new_tokens", "completions", "top_k", "batch_size", "seconds", "temperature"):
        value = getattr(args, flag)
        if value is not None and not (math.isfinite(value) and value > 0):
            p.error(f"--{flag} {value}: must be positive")
    if args.prompt == "":
        p.error("--prompt is empty; give some text, or leave the flag out for a validation excerpt")
    problem = train.check_device(args.device)
    if problem:
        p.error(problem)
    return args


# ----------------------------------------------------------------------------------------------------------
# Loading a checkpoint, scoring it on a whole split, drawing what its outputs depend on

def load_model(path, device):
    """The checkpoint at path and its model, in eval mode on device."""
    ckpt = train.load_checkpoint(path, purpose="reading a trained model")
    model = train.build_model(ckpt["args"]["model"], ckpt["model_config"])
    model.load_state_dict(ckpt["model"])
    return ckpt, model.to(device).eval()


def load_trained(out_dir, device, use="sampling from it"):
    """The checkpoint in out_dir, its model (in eval mode, on device) and the data it was trained on, held to the
    checkpoint's record of it (data.load_recorded)."""
    path = os.path.join(out_dir, "ckpt.pt")
    ckpt, model = load_model(path, device)
    return ckpt, model, data.load_recorded(ckpt, path, f"{use} on other data is refused: restore the data it was "
                                                       f"trained on")


def split_windows(dataset, split, block_size):
    """The rows of a split (1-D stream or [N, L] rows with the start token in front) and T, the window length."""
    tokens = dataset.splits[split]
    rows = [tokens] if tokens.dim() == 1 else [torch.cat([torch.tensor([dataset.bos]), r.long()]) for r in tokens]
    return rows, min(block_size, len(rows[0]) - 1)


@torch.no_grad()
def evaluate_split(model, dataset, split, block_size, batch_size, device, ctx):
    """Bits per token over a whole split in consecutive windows of block_size. Each window scores the targets
    of its last `k` positions (all of them for most models, the latents for Perceiver AR) and the next window
    starts k positions later, so every scored token is predicted once; within a row (images, audio) the first
    window starts at the start token. Returns (bits, tokens scored, tokens in the split, bits by position): the
    last as position_buckets' rows, position p being the p-th target of a window (predicted from p inputs)."""
    model.eval()
    rows, T = split_windows(dataset, split, block_size)
    with ctx:
        k = model(rows[0][None, :T].long().to(device))[0].size(1)  # positions the model scores per window
    windows = [(r, s) for r in range(len(rows)) for s in range(0, len(rows[r]) - T, k) if s + T + 1 <= len(rows[r])]
    nats = torch.zeros(k, dtype=torch.float64)  # summed over windows, per scored position T - k + 1 .. T
    for i in tqdm(range(0, len(windows), batch_size), desc=f"evaluate {split}", unit="batch"):
        seq = torch.stack([rows[r][s:s + T + 1] for r, s in windows[i:i + batch_size]]).long().to(device)
        with ctx:
            logits = model(seq[:, :-1])[0]  # (b, k, V): the last k positions
        targets = seq[:, -k:]
        loss = F.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none")  # (b, k)
        nats += loss.sum(0).double().cpu()
    count = len(windows) * k
    bits = nats.sum().item() / count / math.log(2)
    return bits, count, sum(len(r) - 1 for r in rows), position_buckets(nats / len(windows) / math.log(2), T)


def position_buckets(bits, T):
    """Mean bits per position (k,) of the last k positions of T -> [(first, last, mean bits)] over buckets of
    positions 1-16, 17-64, 65-256, ... (each 4x the last: a curve over many scales in a few rows), cut at T
    and covering only the scored positions."""
    first_scored = T - len(bits) + 1
    rows, lo = [], 1
    while lo <= T:
        hi = min(T, 16 if lo == 1 else 4 * (lo - 1))
        if hi >= first_scored:
            start = max(lo, first_scored)
            rows.append((start, hi, bits[start - first_scored:hi - first_scored + 1].mean().item()))
        lo = hi + 1
    return rows


@torch.no_grad()
def evaluate_prefixes(model, dataset, split, block_size, device, ctx, n_windows=8, n_positions=16):
    """Bits of a model fed only each scored position's prefix, as generation feeds it, beside the bits its
    ordinary forward gives on the same positions: n_positions positions spread over each of n_windows windows
    spread over the split. For an exactly causal model the two agree to rounding; for the Reformer's LSH sort
    (a later token moves the chunk boundaries) they need not, and the prefix figure is the honest one."""
    model.eval()
    rows, T = split_windows(dataset, split, block_size)
    starts = [(r, s) for r in range(len(rows)) for s in range(0, len(rows[r]) - T, T)]
    picked = [starts[i] for i in torch.linspace(0, len(starts) - 1, min(n_windows, len(starts))).long().tolist()]
    seq = torch.stack([rows[r][s:s + T + 1] for r, s in picked]).long().to(device)  # (b, T + 1)
    positions = torch.linspace(0, T - 1, min(n_positions, T)).long().tolist()
    with ctx:
        window = model(seq[:, :-1])[0]  # (b, T, V)
        prefix = torch.stack([model(seq[:, :t + 1])[0][:, -1] for t in positions], dim=1)  # (b, P, V)
    targets = seq[:, 1:][:, positions].reshape(-1)
    bits = [F.cross_entropy(lg.float().reshape(-1, lg.size(-1)), targets).item() / math.log(2)
            for lg in (prefix, window[:, positions])]
    return bits[0], bits[1], targets.numel()


def evaluate_checkpoint(args):
    """--evaluate: the whole split's bits, overall and by position in the window, printed and kept beside the
    checkpoint in evaluate_SPLIT.json, its record (the code, machine and command that made them)."""
    import bench  # here: bench imports this file
    device = train.default_device(args)
    ckpt, model, dataset = load_trained(args.out_dir, device, use="scoring it")
    if not dataset.splits:
        raise ValueError(f"{dataset.name} is generated on the fly and has no fixed split; sample.py reports recall")
    _, _, ctx = train.autocast_for(args, device)
    block_size = ckpt["model_config"]["block_size"]
    bits, count, total, by_position = evaluate_split(model, dataset, args.evaluate, block_size, args.batch_size,
                                                     device, ctx)
    print(f"{ckpt['args']['model']} (step {ckpt['step']}) on {dataset.name} {args.evaluate}: {bits:.4f} "
          f"{dataset.unit} over {count:,} of {total:,} tokens, windows of {block_size}")
    print(f"by position in the window ({dataset.unit}): "
          + ", ".join(f"{first}-{last} {b:.4f}" for first, last, b in by_position))
    figures = dict(model=ckpt["args"]["model"], step=ckpt["step"], data=dataset.name, split=args.evaluate, bits=bits,
                   unit=dataset.unit, tokens=count, of_tokens=total, block_size=block_size, by_position=by_position)
    if not getattr(model, "exactly_causal", True):
        prefix, window, n = evaluate_prefixes(model, dataset, args.evaluate, block_size, device, ctx)
        print(f"its forward is not exactly causal, so on {n} positions fed their prefix alone (as generation does): "
              f"{prefix:.4f} {dataset.unit}, against {window:.4f} from the whole windows")
        figures.update(prefix_bits=prefix, prefix_window_bits=window, prefix_positions=n)
    path = os.path.join(args.out_dir, f"evaluate_{args.evaluate}.json")
    with open(path, "w") as f:  # the record: code, machine, versions, command and seed beside the figures
        json.dump(dict(bench.device_record(torch.device(device), args, seeds=[ckpt["args"].get("seed")]),
                       results=figures), f, indent=1)
    print(f"wrote {path}")
    return bits


def show_attention(args, device):
    """--show_attention: out_dir/attention.png, what each output of the trained model depends on over its first (up
    to 256) tokens, drawn as bench.py draws docs/attention."""
    import bench  # here: bench imports this file
    ckpt, model = load_model(os.path.join(args.out_dir, "ckpt.pt"), device)
    T = min(ckpt["model_config"]["block_size"], 256)
    bench.draw_attention(model, T, os.path.join(args.out_dir, "attention.png"), args.seed)


# ----------------------------------------------------------------------------------------------------------
# Generation: text, images, copy recall, audio (PNG and WAV written with the standard library alone)

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
    pcm = np.clip(data.mu_law_decode(np.asarray(tokens)) * 32767, -32767, 32767).astype("<i2")
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
    """model.generate in up to 20 pieces so that a progress bar can follow (each piece re-primes the cache).
    The loop counts the tokens itself: the bar only displays (it does nothing when tqdm is disabled)."""
    piece = max(1, math.ceil(n / 20))
    with tqdm(total=n, desc=desc, unit="tok") as bar:
        for done in range(0, n, piece):
            k = min(piece, n - done)
            idx = model.generate(idx, k, temperature=args.temperature, top_k=args.top_k, generator=gen)
            bar.update(k)
    return idx


def sample_text(model, dataset, args, gen, device, block_size):
    """Continue --prompt, or by default a validation excerpt of 64 bytes (a quarter of the window in a smaller
    model): short, so that generation runs on the model's cache until the window is full."""
    k = args.num_samples
    if args.prompt is not None:
        prompt = torch.tensor(list(args.prompt.encode()), dtype=torch.long)[None].repeat(k, 1)
    else:
        n = max(1, min(64, block_size // 4))
        start = torch.randint(0, len(dataset.splits["val"]) - n, (1,),
                              generator=torch.Generator().manual_seed(args.seed)).item()
        prompt = dataset.splits["val"][start:start + n].long()[None].repeat(k, 1)
    out = generate(model, prompt.to(device), args.max_new_tokens, args, gen, "text")
    for i in range(k):
        print(f"\n--- sample {i + 1} ---\n{bytes(out[i].tolist()).decode('utf-8', errors='replace')}")


def sample_images(model, dataset, args, gen, device):
    """One PNG: per test image a row of prompt (top half) | completions | ground truth, then a row of
    unconditional samples (--unconditional: only that row). At most one row per test image."""
    k = args.num_samples if args.unconditional else min(args.num_samples, len(dataset.splits["test"]))
    bos = torch.full((k, 1), dataset.bos, device=device)
    rows = []
    if not args.unconditional:
        truth = dataset.splits["test"][:k].long().to(device)  # (k, 3072)
        prompt = torch.cat([bos, truth[:, :1536]], dim=1)
        completions = [generate(model, prompt, 1536, args, gen, f"completion {c + 1}")[:, 1:]
                       for c in range(args.completions)]
        top_half = torch.cat([truth[:, :1536], torch.full_like(truth[:, 1536:], 128)], dim=1)
        rows = [[top_half[i]] + [c[i] for c in completions] + [truth[i]] for i in range(k)]
    rows.append(list(generate(model, bos, 3072, args, gen, "unconditional")[:, 1:]))
    path = os.path.join(args.out_dir, "samples.png")
    write_png(path, image_grid(rows))
    print(f"wrote {path}: " + ("" if args.unconditional else "rows of prompt | completions | ground truth, then ")
          + "a row of unconditional samples")


def sample_copy(model, dataset, args, gen, device, block_size):
    """Show the first half, ask for the second: it should repeat the first."""
    k, half_len = args.num_samples, block_size // 2
    half = torch.randint(0, 256, (k, half_len), generator=torch.Generator().manual_seed(args.seed))
    prompt = torch.cat([torch.full((k, 1), dataset.bos), half], dim=1).to(device)
    out = generate(model, prompt, half_len, args, gen, "copy")[:, -half_len:].cpu()
    print(f"copy task: {(out == half).float().mean().item():.1%} of {k} x {half_len} tokens recalled across a "
          f"distance of {half_len}")


def sample_audio(model, dataset, args, gen, device, rate):
    """Continue up to one second of each validation clip (at most one sample per clip), or start from nothing, and
    write 16-bit WAVs."""
    k = args.num_samples if args.unconditional else min(args.num_samples, len(dataset.splits["val"]))
    bos = torch.full((k, 1), dataset.bos, device=device)
    prompt = bos if args.unconditional else torch.cat([bos, dataset.splits["val"][:k, :rate].long().to(device)], dim=1)
    out = generate(model, prompt, int(args.seconds * rate), args, gen, "audio")[:, 1:]
    for i in range(k):
        path = os.path.join(args.out_dir, f"sample_{i + 1}.wav")
        write_wav(path, out[i].clamp(max=255).cpu().numpy(), rate)
        print(f"wrote {path} ({out.shape[1] / rate:.1f} s at {rate} Hz)")


@torch.no_grad()
def main(argv=None):
    args = parse_args(argv)
    if args.evaluate:
        return evaluate_checkpoint(args)
    device = train.default_device(args)
    if args.show_attention:
        return show_attention(args, device)
    ckpt, model, dataset = load_trained(args.out_dir, device)
    config = ckpt["model_config"]
    print(f"sampling from {ckpt['args']['model']} (step {ckpt['step']}, {config}); {dataset.describe()}")
    gen = torch.Generator(device=device).manual_seed(args.seed)
    _, _, ctx = train.autocast_for(args, device)
    with ctx:
        if dataset.kind == "text":
            sample_text(model, dataset, args, gen, device, config["block_size"])
        elif dataset.kind == "image":
            sample_images(model, dataset, args, gen, device)
        elif dataset.kind == "copy":
            sample_copy(model, dataset, args, gen, device, config["block_size"])
        else:
            sample_audio(model, dataset, args, gen, device, ckpt["args"]["audio_rate"])


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
