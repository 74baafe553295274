"""
Data sets as uint8 token tensors, and a resumable batch sampler.

Every data set becomes a `Data` whose splits are uint8 tensors of one of two shapes:
- a 1-D stream (text): training windows are cut anywhere in it;
- 2-D rows [N, L] (images, audio clips, copy-task sequences): a window never crosses a row, and a start token
  `bos` (= 256, so vocab_size 257) stands in front of each row so that every real token, the first included,
  is predicted and counted in bits per dim.

`load` (at the end) turns a --data value of train.py into a Data: enwik8, cifar10, audio (the .wav files under
data/audio/), copy, or a file of your own (text:PATH, wav:DIR, images:PATH); docs/training.md tables them with
their splits. Downloads go to a git-ignored cache (`data/` beside this file, or $NANOLONG_DATA).
"""
import bz2
import codecs
import contextlib
import functools
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

    @functools.cached_property
    def record(self):
        """What a checkpoint keeps of its data: the name of what was actually loaded (a stand-in's own name, a
        resolved path) and an md5 of every split's tokens, so that other data is noticed when it is loaded again."""
        h = hashlib.md5()
        for split, tokens in sorted(self.splits.items()):
            h.update(f"{split} {tuple(tokens.shape)};".encode())
            h.update(tokens.contiguous().numpy())
        return {"name": self.name, "md5": h.hexdigest()}


# ----------------------------------------------------------------------------------------------------------
# downloading, checking, and reading files that may be damaged

@contextlib.contextmanager
def reading(path, what, fix):
    """Turn any error raised while decoding `path` into one sentence naming the file and what to do. A damaged
    file fails in a dozen ways inside numpy, pickle, wave and the decompressors (fuzzing found EOFError, zlib.error,
    wave's bare RuntimeError, tokenize's TokenError, LookupError, OverflowError, MemoryError...), so it catches
    them all; it guards decoding calls only, so our own errors are raised outside it."""
    try:
        yield
    except Exception as e:
        name = type(e).__name__
        name = f"{type(e).__module__}.{name}" if name.lower() == "error" else name  # zlib.error, wave.Error
        raise ValueError(f"{path} is not a readable {what} ({f'{name}: {e}' if str(e) else name}); {fix}") from e


def mismatch(path, size=None, md5=None):
    """Why the file at path is not the expected one (size first: cheap, and it shows truncation), or None."""
    got = os.path.getsize(path)
    if size is not None and got != size:
        return f"is {got:,} bytes, expected {size:,}"
    if md5 is not None:
        h = hashlib.md5()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        if h.hexdigest() != md5:
            return f"({got:,} bytes) fails its md5 check ({md5})"
    return None


def fetch(url, path, size=None, md5=None, meanwhile=""):
    """path, downloaded from url with a progress bar if absent, and checked against size and md5 either way (a file
    put there by hand too). Offline, a FileNotFoundError says where to put the file, then `meanwhile`."""
    if os.path.exists(path):
        problem = mismatch(path, size, md5)
        if problem:
            raise ValueError(f"{path} {problem}: it is damaged or incomplete; delete it and retry")
        return path
    part = path + ".part"  # renamed to path once checked, so that a broken download is never taken for the file
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with urllib.request.urlopen(url, timeout=30) as r, open(part, "wb") as f:
            total = int(r.headers.get("Content-Length") or 0) or size
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"downloading {os.path.basename(path)}") as bar:
                for chunk in iter(lambda: r.read(1 << 20), b""):
                    f.write(chunk)
                    bar.update(len(chunk))
    except OSError as e:  # URLError, timeouts and refused connections are all OSErrors
        raise FileNotFoundError(f"could not download {url} ({e}); offline? Download it by hand and put it at "
                                f"{path}{meanwhile}") from e
    problem = mismatch(part, size, md5)
    if problem:
        os.remove(part)
        raise ValueError(f"the download of {url} {problem}: it is damaged; try again")
    os.replace(part, path)
    return path


def split_stream(tokens, fractions=(0.90, 0.05, 0.05)):
    """1-D stream -> train/val/test by position (enwik8: exactly 90M / 5M / 5M of 100M bytes)."""
    n = len(tokens)
    a, b = int(n * fractions[0]), int(n * (fractions[0] + fractions[1]))
    return {"train": tokens[:a], "val": tokens[a:b], "test": tokens[b:]}


# ----------------------------------------------------------------------------------------------------------
# text

def load_enwik8(url=ENWIK8_URL, zip_size=ENWIK8_ZIP_SIZE, md5=ENWIK8_MD5, root=None):
    """enwik8: the 100M-byte member of enwik8.zip (downloaded once and kept), read from the zip and md5-checked at
    every load (0.7 s), so a damaged or hand-made copy is never used as is; split 90/5/5."""
    zpath = fetch(url, os.path.join(root or os.path.join(DATA_DIR, "enwik8"), "enwik8.zip"), size=zip_size)
    with reading(zpath, "zip archive holding enwik8", f"delete it and retry, or put the real one from {url} there"), \
            zipfile.ZipFile(zpath) as z:
        raw = bytearray(z.read("enwik8"))  # checks the member's CRC
    if hashlib.md5(raw).hexdigest() != md5:
        raise ValueError(f"the enwik8 in {zpath} fails its md5 check ({md5}): delete {zpath} and retry")
    tokens = torch.frombuffer(raw, dtype=torch.uint8)
    return Data("enwik8", "text", split_stream(tokens), note=f"{zpath}, {len(tokens):,} bytes")


def load_text(path):
    """Any file of bytes as a 1-D stream; .bz2 / .gz are decompressed. Split 90/5/5."""
    if os.path.isdir(path):
        raise ValueError(f"{path} is a folder; text:PATH takes one file of bytes (wav:DIR takes a folder of .wav)")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"text file {path} does not exist")
    compressed = {".bz2": (bz2.open, "bzip2 file"), ".gz": (gzip.open, "gzip file")}
    opener, what = compressed.get(os.path.splitext(path)[1], (open, "file"))
    fix = "check that it can be read" if opener is open else "download it again, or decompress it and pass the result"
    with reading(path, what, fix), opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 1000:
        raise ValueError(f"{path} holds only {len(raw)} bytes; a text data set needs at least 1000: give a larger file")
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

# The globals that rebuild a pickled numpy array (numpy 1 and 2 name the modules differently; protocol 5 pickles
# arrays with _frombuffer, protocol 2 pickles bytes with _codecs.encode).
PICKLED_ARRAY_GLOBALS = {
    ("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype, ("_codecs", "encode"): codecs.encode,
    **{(f"{core}.multiarray", "_reconstruct"): np.zeros(1).__reduce__()[0] for core in ("numpy.core", "numpy._core")},
    **{(f"{core}.numeric", "_frombuffer"): np.zeros(1).__reduce_ex__(5)[0] for core in ("numpy.core", "numpy._core")}}


class CifarUnpickler(pickle.Unpickler):
    """Reads CIFAR-10's python batches (dicts of bytes, lists, ints and one numpy array) and nothing else: loading a
    pickle can run any code it names, so every global but the few that rebuild a numpy array is refused."""

    def find_class(self, module, name):
        if (module, name) not in PICKLED_ARRAY_GLOBALS:
            raise pickle.UnpicklingError(f"it refers to {module}.{name}, which a CIFAR-10 batch never does")
        return PICKLED_ARRAY_GLOBALS[module, name]


def cifar_rows(batch, where):
    """A CIFAR-10 batch (a dict with b"data", or the array itself) checked to be uint8 [N, 3072] planar rows (1024
    red, 1024 green, 1024 blue), returned in raster order, RGB per pixel."""
    planar = batch.get(b"data") if isinstance(batch, dict) else batch
    if not (isinstance(planar, np.ndarray) and planar.dtype == np.uint8 and planar.shape[1:] == (3072,)
            and len(planar)):
        got = f"{planar.dtype} {planar.shape}" if isinstance(planar, np.ndarray) else type(planar).__name__
        raise ValueError(f"{where} holds {got} as its data; expected uint8 [N >= 1, 3072] (CIFAR-10's planar rows)")
    return planar.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).reshape(-1, 3072)  # (N, 32, 32, 3) flattened


def load_cifar10(url=CIFAR10_URL, md5=CIFAR10_MD5, root=None):
    """CIFAR-10's python archive (downloaded once and kept), md5-checked before anything is unpickled and read at
    every load (2.5 s); 50k train, 10k test. The papers report bits/dim on the test set and nothing is tuned on it
    here, so it doubles as validation."""
    archive = fetch(url, os.path.join(root or os.path.join(DATA_DIR, "cifar10"), "cifar-10-python.tar.gz"), md5=md5,
                    meanwhile="; meanwhile --data images:PATH trains on real CIFAR-10 images from one of its python "
                              "batch files (data_batch_1, test_batch) or a .npz of `data` uint8 [N, 3072]")
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    with reading(archive, "CIFAR-10 archive", "delete it and retry"), tarfile.open(archive, "r:gz") as tar:
        batches = {os.path.basename(m.name): CifarUnpickler(tar.extractfile(m), encoding="bytes").load()
                   for m in tar.getmembers() if os.path.basename(m.name) in names}
    if len(batches) != 6:
        raise ValueError(f"{archive} lacks some of data_batch_1..5 / test_batch (found {sorted(batches)})")
    rows = {name: torch.from_numpy(cifar_rows(batch, f"{archive} member {name}")) for name, batch in batches.items()}
    train, test = torch.cat([rows[name] for name in names[:5]]), rows["test_batch"]
    return Data("cifar10", "image", {"train": train, "val": test, "test": test}, vocab_size=257, bos=BOS,
                note="validation = the official test batch")


IMAGE_FILES = ("a .npy of uint8 [N, 32, 32, 3], a .npz with `data` uint8 [N, 3072] (CIFAR-10's planar rows) or a "
               "CIFAR-10 python batch file (data_batch_1, test_batch)")


def load_images(path):
    """Images as rows of 3072 tokens; the last 5% + 5% of them (at least one each) are validation and test.
    Takes IMAGE_FILES, told apart by their first bytes (the official batch files have no extension)."""
    if os.path.isdir(path):
        raise ValueError(f"{path} is a folder; images:PATH takes one file: {IMAGE_FILES}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image file {path} does not exist")
    with reading(path, "image file", f"images:PATH takes {IMAGE_FILES}"), open(path, "rb") as f:
        magic = f.read(6)
        f.seek(0)
        if magic == b"\x93NUMPY":
            loaded = np.load(f)
        elif magic.startswith(b"PK"):  # a zip: .npz
            with np.load(f) as z:
                loaded = z["data"]
        elif magic.startswith(b"\x80"):  # a pickle: refused unless it is a plain CIFAR-10 batch
            loaded = CifarUnpickler(f, encoding="bytes").load()
        else:
            loaded = None
    if loaded is None:
        raise ValueError(f"{path} is none of the files images:PATH takes: {IMAGE_FILES}")
    if magic == b"\x93NUMPY":
        if loaded.dtype != np.uint8 or loaded.shape[1:] != (32, 32, 3):
            raise ValueError(f"{path} holds {loaded.dtype} {loaded.shape}; expected uint8 [N >= 3, 32, 32, 3] "
                             f"(values 0..255, channels last)")
        rows = loaded.reshape(len(loaded), 3072)  # raster order, RGB interleaved per pixel
    else:
        rows = cifar_rows(loaded, path)
    if len(rows) < 3:
        raise ValueError(f"{path} holds {len(rows)} image(s); training, validation and test need at least one each")
    rows = torch.from_numpy(np.ascontiguousarray(rows))
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


WAV_FIX = "convert it to 16-bit PCM (e.g. ffmpeg -i IN -c:a pcm_s16le OUT.wav) or move it out of the folder"


def read_wav(path, rate=AUDIO_RATE):
    """A .wav (8/16/24/32-bit PCM) -> mono float64 in [-1, 1] resampled linearly to `rate`."""
    with reading(path, "PCM WAV file", WAV_FIX), wave.open(path, "rb") as w:
        n_ch, width, src_rate = w.getnchannels(), w.getsampwidth(), w.getframerate()
        raw = w.readframes(w.getnframes())
    if width not in (1, 2, 3, 4) or src_rate < 1:
        raise ValueError(f"{path} has {8 * width}-bit samples at {src_rate} Hz, which nanolong cannot read "
                         f"(it reads 8, 16, 24 or 32-bit PCM); {WAV_FIX}")
    raw = raw[:len(raw) // (n_ch * width) * n_ch * width]  # a truncated file: the whole frames it still holds
    if not raw:
        raise ValueError(f"{path} holds no audio; remove it or move it out of the folder")
    b = np.frombuffer(raw, np.uint8).reshape(-1, width).astype(np.int32)  # little-endian samples, a byte a column
    if width == 1:
        b ^= 0x80  # 8-bit WAV is unsigned: 128 is silence
    # each sample's bytes in the top of an int32, so that every width reads as a signed fraction of 2**31
    x = sum(b[:, i] << (32 - 8 * width + 8 * i) for i in range(width)) / 2**31
    x = x.reshape(-1, n_ch).mean(axis=1)  # mix to mono
    n_out = int(len(x) * rate / src_rate)
    return np.interp(np.arange(n_out) * (src_rate / rate), np.arange(len(x)), x)


def to_rows(x, seq_len):
    """mu-law encode a waveform and cut it into rows [N, seq_len] (the tail shorter than a row is dropped)."""
    q = mu_law_encode(x)
    n = len(q) // seq_len
    return torch.from_numpy(q[:n * seq_len].reshape(n, seq_len).copy())


def load_wav_dir(path, rate=AUDIO_RATE, seq_len=AUDIO_SEQ_LEN):
    """Every .wav under a folder (or one .wav file), cut into rows of seq_len samples, a row never spanning two
    files. With 10+ files, 5% + 5% of the files (sorted by name) are held out for validation and test; with fewer,
    the last rows of the recordings (in name order): 5% of all rows each, at least one."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist; wav:PATH takes a folder of .wav files or one .wav file")
    files = [path] if os.path.isfile(path) else \
        sorted(os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs if f.lower().endswith(".wav"))
    if not files:
        raise FileNotFoundError(f"no .wav files under {path}: put some there, or choose --data wav:DIR")
    waves = [read_wav(f, rate) for f in files]
    if len(waves) >= 10:
        k = max(1, len(waves) // 20)
        parts = {"train": waves[:-2 * k], "val": waves[-2 * k:-k], "test": waves[-k:]}
        for s, ws in parts.items():
            if sum(len(w) // seq_len for w in ws) == 0:
                raise audio_too_short(f"the {s} split of {path} ({len(ws)} files)", ws, rate, seq_len, need=1)
        splits = {s: torch.cat([to_rows(w, seq_len) for w in ws]) for s, ws in parts.items()}
    else:
        rows = torch.cat([to_rows(w, seq_len) for w in waves])
        if len(rows) < 3:
            raise audio_too_short(path, waves, rate, seq_len, need=3)
        k = max(1, len(rows) // 20)
        splits = {"train": rows[:-2 * k], "val": rows[-2 * k:-k], "test": rows[-k:]}
    seconds = sum(len(w) for w in waves) / rate
    return Data(f"wav:{path}", "audio", splits, vocab_size=257, bos=BOS,
                note=f"{len(files)} .wav file(s), {seconds:.0f} s at {rate} Hz, rows of {seq_len}")


def audio_too_short(what, waves, rate, seq_len, need):
    """The error for audio holding fewer than `need` rows of seq_len samples: what it holds and what would work."""
    halves = (seq_len >> i for i in range(1, seq_len.bit_length()))
    fits = [n for n in halves if sum(len(w) // n for w in waves) >= need]
    advice = f"choose --audio_seq_len {fits[0]} or less, or add audio" if fits else "add audio"
    return ValueError(f"{what} holds {sum(len(w) for w in waves) / rate:.1f} s of audio at {rate} Hz, fewer than "
                      f"{need} sequence(s) of --audio_seq_len {seq_len} samples (training, validation and test need "
                      f"one each, each within one file); {advice}")


def load_synthetic_audio(rate=AUDIO_RATE, seq_len=AUDIO_SEQ_LEN):
    """The labelled stand-in for `audio` without .wav files: quarter-second decaying tones on a scale, at least a
    minute of them, cut into rows and split."""
    rng = np.random.default_rng(0)
    t = np.arange(int(rate * 0.25)) / rate
    notes = [np.exp(-4 * t) * np.sin(2 * np.pi * 220 * 2 ** (rng.integers(0, 12) / 12) * t)
             for _ in range(4 * max(60, 25 * seq_len // rate))]
    splits = {s: to_rows(part, seq_len) for s, part in split_stream(0.5 * np.concatenate(notes)).items()}
    return Data("audio (synthetic)", "audio", splits, vocab_size=257, bos=BOS, note="generated tones, not music")


# ----------------------------------------------------------------------------------------------------------

def load(spec, audio_rate=AUDIO_RATE, audio_seq_len=AUDIO_SEQ_LEN):
    """Resolve a --data value to a Data. Offline, enwik8 falls back to text found on every machine, and audio
    without .wav files to a labelled synthetic signal, so that training still runs."""
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
        root = os.path.join(DATA_DIR, "audio")
        if any(f.lower().endswith(".wav") for _, _, files in os.walk(root) for f in files):
            return load_wav_dir(root, audio_rate, audio_seq_len)
        print(f"no .wav files under {root}: put a folder of recordings there (or pass --data wav:DIR); "
              f"using a SYNTHETIC signal of decaying tones instead")
        return load_synthetic_audio(audio_rate, audio_seq_len)
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
                     f"images:PATH")


def load_recorded(ckpt, path, refused):
    """The data checkpoint ckpt (read from path) was trained on, loaded again and held to its record (Data.record):
    the stand-ins that enwik8 and audio fall back to are rebuilt as they were, whatever data/ holds now; other
    data stops with one sentence ending in `refused`. A checkpoint from before data records gets a note instead."""
    args, record = ckpt["args"], ckpt.get("data")
    name = record and record["name"]
    if name == "pydoc_data":
        dataset = load_offline_text()
    elif name == "audio (synthetic)":
        dataset = load_synthetic_audio(args["audio_rate"], args["audio_seq_len"])
    else:
        dataset = load(args["data"], args["audio_rate"], args["audio_seq_len"])
    if record is None:
        print(f"note: {path} predates data records, so its data cannot be checked; using {dataset.name}, what "
              f"--data {args['data']} loads now")
    elif dataset.record != record:
        now = dataset.name if dataset.name != name else \
            f"{dataset.name} with other contents (md5 {dataset.record['md5']}, recorded {record['md5']})"
        raise ValueError(f"{path} was trained on {name}, but --data {args['data']} now loads {now}; {refused}")
    return dataset


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
        elif len(self.tokens) == 0:
            raise ValueError(f"the {split} split of {data.name} is empty; give the data set more data")
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
