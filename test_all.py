"""
nanolong's tests: `pytest test_all.py`. CPU only; the Triton kernels run under Triton's interpreter.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first import of triton (via kernels)

import hashlib
import io
import math
import pickle
import subprocess
import sys
import tarfile
import wave
import zipfile

import numpy as np
import pytest
import torch

import data as datasets
import train
from sparse_transformer import Config, SparseTransformer

HERE = os.path.dirname(os.path.abspath(__file__))
SHARED_DATA = os.path.join(HERE, "..", "shared", "data")
TINY = ["--n_layer", "2", "--n_head", "2", "--n_embd", "32", "--block_size", "32", "--batch_size", "4",
        "--eval_iters", "2", "--warmup", "5", "--device", "cpu"]


def md5(b):
    return hashlib.md5(b).hexdigest()


@pytest.fixture
def text_file(tmp_path):
    """Real text (Python's own help topics) written to a file, as a user's --data text:PATH would be."""
    path = tmp_path / "corpus.txt"
    path.write_bytes(bytes(datasets.load_offline_text().splits["train"][:60_000].numpy()))
    return str(path)


# ----------------------------------------------------------------------------------------------------------
# data: download, verify, cache, split, order

def test_enwik8_download_verify_cache_and_split(tmp_path):
    payload = np.random.default_rng(0).integers(0, 256, 20_000, dtype=np.uint8).tobytes()
    zpath = tmp_path / "served.zip"
    with zipfile.ZipFile(zpath, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("enwik8", payload)
    url, size, root = zpath.as_uri(), zpath.stat().st_size, str(tmp_path / "cache")
    d = datasets.load_enwik8(url=url, zip_size=size, md5=md5(payload), root=root)
    assert [len(d.splits[s]) for s in ("train", "val", "test")] == [18_000, 1_000, 1_000]
    assert bytes(torch.cat([d.splits[s] for s in ("train", "val", "test")]).numpy()) == payload
    zpath.unlink()  # the second load must come from the cache, not the network
    again = datasets.load_enwik8(url=url, zip_size=size, md5=md5(payload), root=root)
    assert torch.equal(again.splits["val"], d.splits["val"])


def test_corrupt_enwik8_download_is_rejected_and_not_kept(tmp_path):
    zpath = tmp_path / "served.zip"
    with zipfile.ZipFile(zpath, "w") as z:
        z.writestr("enwik8", b"x" * 5000)
    root = tmp_path / "cache"
    with pytest.raises(ValueError, match="expected"):
        datasets.load_enwik8(url=zpath.as_uri(), zip_size=zpath.stat().st_size + 1, md5="0" * 32, root=str(root))
    assert not any(root.iterdir())  # no half-written or unverified file left behind
    with pytest.raises(ValueError, match="md5"):
        datasets.load_enwik8(url=zpath.as_uri(), zip_size=zpath.stat().st_size, md5="0" * 32, root=str(root))


def test_offline_download_says_which_url_failed_and_where_to_put_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="by hand") as e:
        datasets.load_enwik8(url=(tmp_path / "absent.zip").as_uri(), root=str(tmp_path / "c"))
    assert "absent.zip" in str(e.value) and str(tmp_path / "c") in str(e.value)


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


def test_cifar10_download_verify_decode_in_raster_order(tmp_path):
    archive = tmp_path / "cifar.tar.gz"
    batches = make_cifar_archive(archive)
    d = datasets.load_cifar10(url=archive.as_uri(), md5=md5(archive.read_bytes()), root=str(tmp_path / "c"))
    assert d.splits["train"].shape == (20, 3072) and d.splits["test"].shape == (4, 3072)
    planar_train = np.concatenate([batches[f"data_batch_{i}"] for i in range(1, 6)])
    assert_raster_order(planar_train, d.splits["train"].numpy())
    assert_raster_order(batches["test_batch"], d.splits["test"].numpy())


def test_corrupt_cifar10_archive_is_rejected_before_unpickling(tmp_path):
    archive = tmp_path / "cifar.tar.gz"
    make_cifar_archive(archive)
    with pytest.raises(ValueError, match="md5"):
        datasets.load_cifar10(url=archive.as_uri(), md5="0" * 32, root=str(tmp_path / "c"))


@pytest.mark.skipif(not os.path.exists(os.path.join(SHARED_DATA, "cifar10_test_0_19.npz")),
                    reason="the real CIFAR-10 sample lives in ../shared/data, absent from this checkout")
def test_real_cifar10_images_decode_in_raster_order():
    planar = np.load(os.path.join(SHARED_DATA, "cifar10_test_0_19.npz"))["data"]
    assert_raster_order(planar, datasets.planar_to_raster(planar))


def write_wav(path, signal, rate, channels=1, width=2):
    pcm = (np.clip(signal, -1, 1) * (2 ** (8 * width - 1) - 1)).astype({2: np.int16, 4: np.int32}[width])
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(width)
        w.setframerate(rate)
        w.writeframes(np.repeat(pcm, channels).tobytes())


def test_wav_folder_is_mixed_resampled_mu_law_encoded_and_cut(tmp_path):
    rate, seconds = 22_050, 3.0
    t = np.arange(int(rate * seconds)) / rate
    write_wav(tmp_path / "a.wav", 0.5 * np.sin(2 * np.pi * 440 * t), rate, channels=2)
    write_wav(tmp_path / "b.wav", 0.3 * np.sin(2 * np.pi * 220 * t), rate, width=4)
    d = datasets.load_wav_dir(str(tmp_path), rate=8000, seq_len=1000)
    # each file 3 s at 8 kHz = 24,000 samples, split 90/5/5 in time, cut into rows of 1000
    assert [tuple(d.splits[s].shape) for s in ("train", "val", "test")] == [(42, 1000), (2, 1000), (2, 1000)]
    decoded = datasets.mu_law_decode(d.splits["train"][0].numpy())
    t8 = np.arange(1000) / 8000
    assert np.abs(decoded - 0.5 * np.sin(2 * np.pi * 440 * t8)).max() < 0.02  # resampled, not just truncated


def test_mu_law_is_the_continuous_companding_formula():
    x = np.random.default_rng(1).uniform(-1, 1, 1000)
    y = np.sign(x) * np.log(1 + 255 * np.abs(x)) / np.log(256)
    np.testing.assert_array_equal(datasets.mu_law_encode(x), np.round((y + 1) * 127.5).astype(np.uint8))
    err = np.abs(datasets.mu_law_decode(datasets.mu_law_encode(x)) - x)
    assert (err <= 0.03 * np.abs(x) + 1e-3).all()  # relative error of 8-bit mu-law


def test_sampler_windows_are_shifted_by_one_and_rows_start_with_bos():
    rows = torch.randint(0, 256, (5, 40), dtype=torch.uint8)
    d = datasets.Data("rows", "image", {"train": rows}, vocab_size=257, bos=256)
    x, y = datasets.BatchSampler(d, "train", 40, 8, seed=0).next_batch()
    assert (x[:, 0] == 256).all() and torch.equal(x[:, 1:], y[:, :-1])
    assert all(any(torch.equal(r.long(), yy) for r in rows) for yy in y)  # whole rows, first token predicted


def test_sampler_resumes_exactly_from_its_state():
    d = datasets.load_offline_text()
    a = datasets.BatchSampler(d, "train", 64, 4, seed=3)
    a.next_batch()
    b = datasets.BatchSampler(d, "train", 64, 4, seed=99)
    b.load_state_dict(a.state_dict())
    assert all(torch.equal(p, q) for p, q in zip(a.next_batch(), b.next_batch()))


def test_copy_task_rows_repeat_their_first_half():
    x, y = datasets.BatchSampler(datasets.load("copy"), "train", 64, 3, seed=0).next_batch()
    assert torch.equal(y[:, 32:], y[:, :32]) and (x[:, 0] == 256).all()


# ----------------------------------------------------------------------------------------------------------
# the dense baseline and the training loop

def test_future_tokens_do_not_change_past_logits():
    torch.manual_seed(0)
    model = SparseTransformer(Config(block_size=32, n_layer=2, n_head=2, n_embd=32)).eval()
    idx = torch.randint(0, 256, (2, 32))
    changed = idx.clone()
    changed[:, 20:] = torch.randint(0, 256, (2, 12))
    a, b = model(idx)[0], model(changed)[0]
    torch.testing.assert_close(a[:, :20], b[:, :20])
    assert not torch.allclose(a[:, 20:], b[:, 20:])


def test_loss_falls_within_a_few_dozen_steps(text_file, tmp_path):
    hist = train.main(["--data", f"text:{text_file}", "--max_iters", "40", "--eval_interval", "40",
                       "--out_dir", str(tmp_path), "--lr", "3e-3"] + TINY)
    losses = [h["loss"] for h in hist if "loss" in h]
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 1.0  # nats: from ~5.5 (uniform) well down
    assert hist[-1]["val_loss"] < math.log(256) - 1.0


def test_killed_run_resumes_with_the_same_losses(text_file, tmp_path):
    common = ["--data", f"text:{text_file}", "--lr_decay_iters", "16", "--eval_interval", "8",
              "--dropout", "0.1"] + TINY
    whole = train.main(common + ["--max_iters", "16", "--out_dir", str(tmp_path / "a")])
    train.main(common + ["--max_iters", "8", "--out_dir", str(tmp_path / "b")])  # stops after step 8
    rest = train.main(common + ["--max_iters", "16", "--out_dir", str(tmp_path / "b"), "--resume"])
    assert [h for h in whole if h["step"] >= 8] == rest  # bit-exact on CPU, evaluations included


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

def test_unknown_model_lists_the_valid_names():
    with pytest.raises(ValueError, match="choose one of: transformer, sparse_strided"):
        train.parse_args(["--model", "gpt5"])


def test_unknown_flag_is_rejected(capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--model", "transformer", "--n_hashes", "4"])
    assert "unrecognized arguments: --n_hashes" in capsys.readouterr().err


def test_sequence_longer_than_block_size_is_rejected():
    model = SparseTransformer(Config(block_size=16, n_layer=1, n_head=2, n_embd=16))
    with pytest.raises(ValueError, match="block_size 16"):
        model(torch.randint(0, 256, (1, 17)))


def test_resume_with_a_larger_block_size_or_damaged_checkpoint_is_rejected(text_file, tmp_path):
    base = ["--data", f"text:{text_file}", "--out_dir", str(tmp_path)] + TINY
    with pytest.raises(FileNotFoundError, match="does not exist"):
        train.main(base + ["--resume"])
    train.main(base + ["--max_iters", "2", "--eval_interval", "2"])
    with pytest.raises(ValueError, match="larger than the checkpoint"):
        train.main(base + ["--resume", "--max_iters", "4", "--block_size", "64"])
    ckpt = tmp_path / "ckpt.pt"
    ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])  # a torn write from another tool
    with pytest.raises(ValueError, match="damaged"):
        train.main(base + ["--resume", "--max_iters", "4"])


def test_missing_data_and_unknown_data_names_are_explained(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        datasets.load(f"text:{tmp_path / 'nope.txt'}")
    with pytest.raises(FileNotFoundError, match="no .wav files"):
        datasets.load(f"wav:{tmp_path}")
    with pytest.raises(ValueError, match="unknown --data"):
        datasets.load("imagenet")
    bad = tmp_path / "bad.npy"
    np.save(bad, np.zeros((4, 28, 28), np.uint8))
    with pytest.raises(ValueError, match=r"expected uint8 \[N >= 3, 32, 32, 3\]"):
        datasets.load(f"images:{bad}")
