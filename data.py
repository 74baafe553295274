"""
Data sets as uint8 token tensors, and a resumable batch sampler.

Every data set becomes a `Data` whose splits are uint8 tensors of one of two shapes:
- a 1-D stream (text): training windows are cut anywhere in it;
- 2-D rows [N, L] (images, audio clips, copy-task sequences): a window never crosses a row, and a start token
  `bos` (= 256, so vocab_size 257) stands in front of each row so that every real token, the first included,
  is predicted and counted in bits per dim.

Named data sets (the `--data` flag of train.py):
  enwik8          the Hutter Prize bytes (download, md5 check, cache), split 90M / 5M / 5M
  cifar10         CIFAR-10, 3072 tokens per image in raster order with RGB interleaved per pixel
  audio           the .wav files under data/audio/ (mono, 12 kHz, 8-bit mu-law, rows of 65,536 samples)
  copy            synthetic long-range recall: each row's second half repeats its first half
  text:PATH       any file of bytes (.bz2 and .gz are decompressed)
  wav:DIR         any folder of .wav files
  images:PATH     a .npy of uint8 [N, 32, 32, 3]
Downloads go to a git-ignored cache (`data/` beside this file, or $NANOLONG_DATA).
"""
import bz2
import gzip
import hashlib
import math
import os
import pickle
import tarfile
import urllib.request
import wave
import zipfile
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm import tqdm

DATA_DIR = os.environ.get("NANOLONG_DATA", os.path.join(os.path.dirname(os.path.abspath(__file__)), "data"))
ENWIK8_URL = "http://mattmahoney.net/dc/enwik8.zip"
ENWIK8_ZIP_SIZE = 36_445_475
ENWIK8_MD5 = "a1fa5ffddb56f4953e226637dabbb36a"  # of the 100,000,000-byte member, not of the zip
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
AUDIO_RATE = 12_000
AUDIO_SEQ_LEN = 65_536
MU = 255
BOS = 256


@dataclass
class Data:
    name: str
    kind: str  # "text", "image", "audio" or "copy": decides the unit (bits per byte / per dim)
    splits: dict = field(default_factory=dict)  # "train"/"val"/"test" -> uint8 tensor, 1-D stream or [N, L] rows
    vocab_size: int = 256
    bos: int = None  # start token in front of every row (2-D splits only)
    note: str = ""  # where the data came from, printed by train.py

    @property
    def unit(self):
        return {"image": "bits/dim", "text": "bits/byte", "audio": "bits/byte"}.get(self.kind, "bits/token")

    def describe(self):
        sizes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in self.splits.items()) or "generated on the fly"
        return f"data: {self.name} ({self.kind}; {sizes}){' - ' + self.note if self.note else ''}"


# ----------------------------------------------------------------------------------------------------------
# downloading and checking

def md5_of(path):
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download(url, path, size=None, md5=None):
    """Fetch url to path with a progress bar; written to path + '.part' first so a broken fetch leaves nothing."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".part"
    with urllib.request.urlopen(url, timeout=30) as r, open(tmp, "wb") as f:
        total = int(r.headers.get("Content-Length") or 0) or size
        with tqdm(total=total, unit="B", unit_scale=True, desc=f"downloading {os.path.basename(path)}") as bar:
            for chunk in iter(lambda: r.read(1 << 20), b""):
                f.write(chunk)
                bar.update(len(chunk))
    got = os.path.getsize(tmp)
    if size is not None and got != size:
        os.remove(tmp)
        raise ValueError(f"download of {url} is {got} bytes, expected {size}: the file is damaged; try again")
    if md5 is not None and md5_of(tmp) != md5:
        os.remove(tmp)
        raise ValueError(f"download of {url} failed its md5 check (expected {md5}): the file is damaged; try again")
    os.replace(tmp, path)


def fetch(url, path, size=None, md5=None):
    """Return path, downloading it if absent (a file put there by hand is checked too); raise
    FileNotFoundError saying what to do when offline."""
    if not os.path.exists(path):
        try:
            download(url, path, size, md5)
        except OSError as e:  # URLError, timeouts and refused connections are all OSErrors
            raise FileNotFoundError(
                f"could not download {url} ({e}); offline? Download it by hand and put it at {path}") from e
    elif md5 is not None and md5_of(path) != md5:
        raise ValueError(f"{path} fails its md5 check ({md5}): the file is damaged; delete it and retry")
    return path


def split_stream(tokens, fractions=(0.90, 0.05, 0.05)):
    """1-D stream -> train/val/test by position (enwik8: exactly 90M / 5M / 5M of 100M bytes)."""
    n = len(tokens)
    a, b = int(n * fractions[0]), int(n * (fractions[0] + fractions[1]))
    return {"train": tokens[:a], "val": tokens[a:b], "test": tokens[b:]}


# ----------------------------------------------------------------------------------------------------------
# text

def load_enwik8(url=ENWIK8_URL, zip_size=ENWIK8_ZIP_SIZE, md5=ENWIK8_MD5, root=None):
    """enwik8: the 100M-byte member of enwik8.zip, checked by md5, cached, split 90/5/5."""
    root = root or os.path.join(DATA_DIR, "enwik8")
    member = os.path.join(root, "enwik8")
    if not os.path.exists(member):
        zpath = fetch(url, os.path.join(root, "enwik8.zip"), size=zip_size)
        with zipfile.ZipFile(zpath) as z:
            z.extract("enwik8", root)
        if md5_of(member) != md5:
            os.remove(member)
            raise ValueError(f"{member} unpacked from {zpath} fails its md5 check ({md5}): delete {zpath} and retry")
    tokens = torch.from_numpy(np.fromfile(member, dtype=np.uint8))
    return Data("enwik8", "text", split_stream(tokens), note=f"{member}, {len(tokens):,} bytes")


def load_text(path):
    """Any file of bytes as a 1-D stream; .bz2 / .gz are decompressed. Split 90/5/5."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"text file {path} does not exist")
    opener = {".bz2": bz2.open, ".gz": gzip.open}.get(os.path.splitext(path)[1], open)
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 1000:
        raise ValueError(f"{path} holds only {len(raw)} bytes; a text data set needs at least 1000")
    tokens = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    return Data(f"text:{path}", "text", split_stream(tokens), note=f"{len(raw):,} bytes")


def load_offline_text():
    """Text that exists on every Python install: the standard library's own help topics (pydoc_data)."""
    from pydoc_data.topics import topics
    raw = "\n".join(topics[k] for k in sorted(topics)).encode()
    tokens = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    return Data("pydoc_data", "text", split_stream(tokens),
                note=f"offline fallback: Python's help topics (pydoc_data), {len(raw):,} bytes")


# ----------------------------------------------------------------------------------------------------------
# images

def planar_to_raster(rows):
    """CIFAR's stored rows [N, 3072] (1024 red, 1024 green, 1024 blue) -> raster order, RGB per pixel."""
    return rows.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).reshape(-1, 3072)  # (N, 32, 32, 3) flattened


def load_cifar10(url=CIFAR10_URL, md5=CIFAR10_MD5, root=None):
    """CIFAR-10 python archive, md5-checked before anything is unpickled; 50k train, 10k test (also val)."""
    root = root or os.path.join(DATA_DIR, "cifar10")
    cache = os.path.join(root, "cifar10_raster.npz")
    if not os.path.exists(cache):
        archive = fetch(url, os.path.join(root, "cifar-10-python.tar.gz"), md5=md5)
        batches = {}
        with tarfile.open(archive, "r:gz") as tar:
            for m in tar.getmembers():
                name = os.path.basename(m.name)
                if name.startswith("data_batch_") or name == "test_batch":
                    batches[name] = pickle.load(tar.extractfile(m), encoding="bytes")[b"data"]
        if len(batches) != 6:
            raise ValueError(f"{archive} lacks some of data_batch_1..5 / test_batch (found {sorted(batches)})")
        train = np.concatenate([batches[f"data_batch_{i}"] for i in range(1, 6)])
        np.savez(cache + ".tmp.npz", train=planar_to_raster(train), test=planar_to_raster(batches["test_batch"]))
        os.replace(cache + ".tmp.npz", cache)
    with np.load(cache) as f:
        train, test = torch.from_numpy(f["train"]), torch.from_numpy(f["test"])
    # The papers report bits/dim on the test set and tune nothing on it here, so it doubles as validation.
    return Data("cifar10", "image", {"train": train, "val": test, "test": test}, vocab_size=257, bos=BOS,
                note="validation = the official test batch")


def load_images(path):
    """A .npy of uint8 [N, 32, 32, 3] images; the last 5% + 5% of them are validation and test."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image file {path} does not exist")
    imgs = np.load(path)
    if imgs.dtype != np.uint8 or imgs.ndim != 4 or imgs.shape[1:] != (32, 32, 3) or len(imgs) < 3:
        raise ValueError(f"{path} holds {imgs.dtype} {imgs.shape}; expected uint8 [N >= 3, 32, 32, 3]")
    rows = torch.from_numpy(imgs.reshape(len(imgs), 3072).copy())  # raster order, RGB interleaved per pixel
    n_hold = max(1, len(rows) // 20)
    splits = {"train": rows[:-2 * n_hold], "val": rows[-2 * n_hold:-n_hold], "test": rows[-n_hold:]}
    return Data(f"images:{path}", "image", splits, vocab_size=257, bos=BOS, note=f"{len(rows)} images")


# ----------------------------------------------------------------------------------------------------------
# audio

def mu_law_encode(x, mu=MU):
    """Continuous mu-law companding of x in [-1, 1], quantised to 0..255 (not the G.711 telephone table)."""
    y = np.sign(x) * np.log1p(mu * np.abs(x)) / math.log1p(mu)
    return np.clip(np.round((y + 1) / 2 * mu), 0, mu).astype(np.uint8)


def mu_law_decode(q, mu=MU):
    y = q.astype(np.float64) / mu * 2 - 1
    return np.sign(y) * np.expm1(np.abs(y) * math.log1p(mu)) / mu


def read_wav(path, rate=AUDIO_RATE):
    """A .wav (8/16/24/32-bit PCM) -> mono float64 in [-1, 1] resampled linearly to `rate`."""
    with wave.open(path, "rb") as w:
        n_ch, width, src_rate, n = w.getnchannels(), w.getsampwidth(), w.getframerate(), w.getnframes()
        raw = w.readframes(n)
    if width == 1:
        x = np.frombuffer(raw, np.uint8).astype(np.float64) / 128 - 1
    elif width == 3:  # little-endian 24-bit: widen to 32 bits by putting the 3 bytes in the top of each int32
        b = np.frombuffer(raw, np.uint8).reshape(-1, 3)
        x = (b[:, 0].astype(np.int32) << 8 | b[:, 1].astype(np.int32) << 16 | b[:, 2].astype(np.int32) << 24) / 2**31
    else:
        x = np.frombuffer(raw, {2: np.int16, 4: np.int32}[width]).astype(np.float64) / 2 ** (8 * width - 1)
    x = x.reshape(-1, n_ch).mean(axis=1)  # mix to mono
    n_out = int(len(x) * rate / src_rate)
    return np.interp(np.arange(n_out) * (src_rate / rate), np.arange(len(x)), x)


def synthetic_audio(rate=AUDIO_RATE, seconds=60, seed=0):
    """A generated signal (decaying tones on a scale), used only when no .wav file is at hand."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(rate * 0.25)) / rate
    notes = [np.exp(-4 * t) * np.sin(2 * np.pi * 220 * 2 ** (rng.integers(0, 12) / 12) * t)
             for _ in range(seconds * 4)]
    return 0.5 * np.concatenate(notes)


def to_rows(x, seq_len):
    """mu-law encode a waveform and cut it into rows [N, seq_len] (the tail shorter than a row is dropped)."""
    q = mu_law_encode(x)
    n = len(q) // seq_len
    return torch.from_numpy(q[:n * seq_len].reshape(n, seq_len).copy())


def load_wav_dir(path, rate=AUDIO_RATE, seq_len=AUDIO_SEQ_LEN):
    """Every .wav under a folder. With 10+ files, 5% + 5% of the files (sorted by name) are held out for
    validation and test; with fewer, each file is split 90/5/5 in time. Splits are rows of seq_len samples."""
    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs if f.lower().endswith(".wav"))
    if not files:
        raise FileNotFoundError(f"no .wav files under {path}: put some there, or choose --data wav:DIR")
    waves = [read_wav(f, rate) for f in files]
    if len(waves) >= 10:
        k = max(1, len(waves) // 20)
        parts = {"train": waves[:-2 * k], "val": waves[-2 * k:-k], "test": waves[-k:]}
    else:
        cut = [split_stream(w) for w in waves]
        parts = {s: [c[s] for c in cut] for s in ("train", "val", "test")}
    splits = {}
    for s, ws in parts.items():
        rows = [to_rows(w, seq_len) for w in ws]
        splits[s] = torch.cat(rows) if rows else torch.zeros(0, seq_len, dtype=torch.uint8)
        if len(splits[s]) == 0:
            raise ValueError(f"the {s} split of {path} is shorter than one sequence of {seq_len} samples at "
                             f"{rate} Hz; add audio or choose a shorter --audio_seq_len")
    seconds = sum(len(w) for w in waves) / rate
    return Data(f"wav:{path}", "audio", splits, vocab_size=257, bos=BOS,
                note=f"{len(files)} files, {seconds:.0f} s at {rate} Hz, rows of {seq_len}")


def load_audio(rate=AUDIO_RATE, seq_len=AUDIO_SEQ_LEN):
    """The .wav files under data/audio/; without any, a labelled synthetic signal so training still runs."""
    root = os.path.join(DATA_DIR, "audio")
    if os.path.isdir(root) and any(f.lower().endswith(".wav") for _, _, fs in os.walk(root) for f in fs):
        return load_wav_dir(root, rate, seq_len)
    print(f"no .wav files under {root}: put a folder of recordings there (or pass --data wav:DIR); "
          f"using a SYNTHETIC signal of decaying tones instead")
    x = synthetic_audio(rate, seconds=max(60, 25 * seq_len // rate))
    splits = {s: to_rows(part, seq_len) for s, part in split_stream(x).items()}
    return Data("audio (synthetic)", "audio", splits, vocab_size=257, bos=BOS, note="generated tones, not music")


# ----------------------------------------------------------------------------------------------------------

def load(spec, audio_rate=AUDIO_RATE, audio_seq_len=AUDIO_SEQ_LEN):
    """Resolve a --data value to a Data. Offline enwik8 falls back to text found on every machine."""
    kind, _, arg = spec.partition(":")
    if kind == "enwik8":
        try:
            return load_enwik8()
        except FileNotFoundError as e:
            print(f"enwik8 unavailable: {e}")
            return load_offline_text()
    if kind == "cifar10":
        return load_cifar10()
    if kind == "audio":
        return load_audio(audio_rate, audio_seq_len)
    if kind == "copy":
        return Data("copy", "copy", vocab_size=257, bos=BOS,
                    note="random tokens whose second half repeats the first (recall across half a row)")
    if kind == "text" and arg:
        return load_text(arg)
    if kind == "images" and arg:
        return load_images(arg)
    if kind == "wav" and arg:
        return load_wav_dir(arg, audio_rate, audio_seq_len)
    raise ValueError(f"unknown --data {spec!r}; choose enwik8, cifar10, audio, copy, text:PATH, wav:DIR or "
                     f"images:PATH.npy")


class BatchSampler:
    """Random training windows (x, y) with y = x shifted by one; its state is one torch.Generator, saved in
    checkpoints so a resumed run draws exactly the batches the uninterrupted run would have drawn."""

    def __init__(self, data, split, block_size, batch_size, seed, device="cpu"):
        self.data, self.block_size, self.batch_size, self.device = data, block_size, batch_size, device
        self.tokens = data.splits.get(split)
        self.gen = torch.Generator().manual_seed(seed)
        if data.kind == "copy":
            if block_size % 2:
                raise ValueError(f"the copy task needs an even block_size, got {block_size}")
        elif self.tokens.dim() == 1 and len(self.tokens) <= block_size + 1:
            raise ValueError(f"the {split} split has {len(self.tokens)} tokens, too few for block_size "
                             f"{block_size}; choose a smaller --block_size")
        elif self.tokens.dim() == 2 and self.tokens.shape[1] < block_size:
            raise ValueError(f"{data.name} rows are {self.tokens.shape[1]} tokens long, shorter than block_size "
                             f"{block_size}; choose --block_size <= {self.tokens.shape[1]}")

    def next_batch(self):
        B, T = self.batch_size, self.block_size
        if self.data.kind == "copy":
            half = torch.randint(0, 256, (B, T // 2), generator=self.gen)
            seq = torch.cat([torch.full((B, 1), self.data.bos), half, half], dim=1)  # (B, T + 1)
        elif self.tokens.dim() == 1:
            starts = torch.randint(0, len(self.tokens) - T - 1, (B,), generator=self.gen)
            seq = torch.stack([self.tokens[s:s + T + 1] for s in starts.tolist()]).long()  # (B, T + 1)
        else:
            rows = torch.randint(0, len(self.tokens), (B,), generator=self.gen)
            L = self.tokens.shape[1]
            starts = torch.randint(0, L - T + 1, (B,), generator=self.gen)
            padded = torch.cat([torch.full((B, 1), self.data.bos), self.tokens[rows].long()], dim=1)  # (B, L + 1)
            seq = torch.stack([padded[i, s:s + T + 1] for i, s in enumerate(starts.tolist())])
        x, y = seq[:, :-1], seq[:, 1:]
        if self.device != "cpu":
            return x.pin_memory().to(self.device, non_blocking=True), y.pin_memory().to(self.device, non_blocking=True)
        return x, y

    def state_dict(self):
        return {"gen": self.gen.get_state()}

    def load_state_dict(self, state):
        self.gen.set_state(state["gen"])
