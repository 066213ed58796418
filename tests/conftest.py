"""Shared fixtures: small datasets made here, and the real Fashion-MNIST files from Debian."""

import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kdcache.data import sources
from kdcache.data.prepare import prepare

FASHION_MNIST = Path(sources.FASHION_MNIST_DIR)


def _require_fashion_mnist():
    if not (FASHION_MNIST / "train-images-idx3-ubyte.gz").exists():
        pytest.fail("Debian's dataset-fashion-mnist is not installed (tools/setup.sh installs it)")


@pytest.fixture(scope="session")
def fmnist_small(tmp_path_factory):
    """The first 400 train and 400 val samples of the real Fashion-MNIST, prepared in 3 shards per split."""
    _require_fashion_mnist()
    out = tmp_path_factory.mktemp("fmnist") / "fm"
    return prepare(sources.fashion_mnist(limit=400), out, shard_size=150, workers=2)


@pytest.fixture(scope="session")
def fm2000(tmp_path_factory):
    """The first 2000 train samples of the real Fashion-MNIST (8 work units of 256)."""
    _require_fashion_mnist()
    return prepare(sources.fashion_mnist(limit=2000), tmp_path_factory.mktemp("fm2000") / "ds", workers=2)


def random_photo(rng, height, width, mode="RGB") -> Image.Image:
    """A smooth random image (JPEG-friendly, with structure so crops differ)."""
    yy, xx = np.mgrid[0:height, 0:width]
    channels = []
    for _ in range(3):
        fy, fx, phase = rng.uniform(0.01, 0.1, 2).tolist() + [rng.uniform(0, 6.3)]
        channels.append(127 + 120 * np.sin(fy * yy + fx * xx + phase))
    arr = np.stack(channels, -1).clip(0, 255).astype(np.uint8)
    return Image.fromarray(arr).convert(mode)


def image_bytes(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def make_imagefolder(root: Path, classes=("cat", "dog", "fox"), per_class=6, seed=0) -> Path:
    """ROOT/train/<cls>/*.{jpg,png} and ROOT/val/<cls>/* with varied sizes and modes (some above 500 px)."""
    rng = np.random.default_rng(seed)
    sizes = [(37, 53), (120, 80), (64, 64), (701, 333), (90, 610), (31, 29)]
    modes = ["RGB", "L", "RGBA", "P", "RGB", "CMYK"]
    for split, n in (("train", per_class), ("val", 2)):
        for c, cls in enumerate(classes):
            d = root / split / cls
            d.mkdir(parents=True)
            for j in range(n):
                h, w = sizes[(j + c) % len(sizes)]
                mode = modes[(j + 2 * c) % len(modes)]
                img = random_photo(rng, h, w, mode)
                fmt = "PNG" if mode in ("RGBA", "P") else "JPEG"
                ext = ".png" if fmt == "PNG" else ".JPEG"
                (d / f"{split}_{cls}_{j:03d}{ext}").write_bytes(image_bytes(img, fmt))
    return root


@pytest.fixture(scope="session")
def folder_ds(tmp_path_factory):
    """A prepared ImageFolder dataset with varied image sizes (decode and downscale paths)."""
    root = make_imagefolder(tmp_path_factory.mktemp("folder") / "src")
    out = root.parent / "ds"
    return prepare(sources.imagefolder(str(root), view_size=48), out, shard_size=7, workers=2)


class CliResult:
    def __init__(self, returncode, stdout, stderr):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def kdcache(*args, check=True) -> CliResult:
    """Run the kdcache command in this process (no interpreter start-up, imports and JIT shared)."""
    import contextlib
    import io
    from kdcache.cli import run
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = run(*args, check=False)
    result = CliResult(code, out.getvalue(), err.getvalue())
    if check and code != 0:
        raise AssertionError(f"kdcache {' '.join(map(str, args))} failed ({code}):\n{result.stderr}")
    return result


def run_cli(*args, check=True, env=None):
    """Run the kdcache command in a fresh interpreter (exit codes, environment, the real entry point)."""
    import subprocess
    import sys
    env = env or dict(os.environ)
    proc = subprocess.run([sys.executable, "-m", "kdcache", *map(str, args)], capture_output=True, text=True, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"kdcache {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


def slabs(where):
    """{seed: its slab} of every complete seed of the cache at `where` (a path or URL)."""
    from kdcache.cache.schema import TeacherCache
    from kdcache.cache.slabs import read_slab
    cache = TeacherCache.open(where)
    return {s: read_slab(cache, s) for s in cache.complete_seeds()}


def assert_same_slabs(a, b):
    assert a.keys() == b.keys() and a
    for s in a:
        for x, y in zip(a[s], b[s]):
            np.testing.assert_array_equal(x, y)


@pytest.fixture(scope="session")
def random_teacher(tmp_path_factory):
    """A random-weight resnet10t for 10 classes, saved to a weights file: (model, info, path)."""
    import safetensors.torch
    from kdcache.models import ModelSpec, build_model
    model, info = build_model(ModelSpec(name="resnet10t", random_init=True, seed=3), 10)
    weights = tmp_path_factory.mktemp("teacher") / "teacher.safetensors"
    safetensors.torch.save_file(model.state_dict(), str(weights))
    return model, info, weights


def dump_random_teacher(data, out, weights, seeds, *extra):
    kdcache("dump-teacher", "--data", data, "--out", out, "--seeds", seeds, "--teacher", "resnet10t",
            "--teacher-checkpoint", weights, "--unit-size", 128, "--no-progress", *extra)
    return out


@pytest.fixture(scope="session")
def exact_cache(fmnist_small, random_teacher, tmp_path_factory):
    """random_teacher over seeds 0:3 of fmnist_small, float32 and k = C: a lossless cache."""
    return dump_random_teacher(fmnist_small.root, tmp_path_factory.mktemp("exact") / "cache", random_teacher[2], "0:3",
                               "--values-dtype", "float32", "--topk", 10)


def reseal_markers(cache_path) -> None:
    """Re-record every unit marker's object checksums after a test changed the arrays on purpose: stands for
    a writer that stored wrong values consistently (what verify's row and replay checks are for), as
    opposed to damage after the fact (which the checksums catch)."""
    import json
    from kdcache.cache.integrity import unit_records
    from kdcache.cache.marker import seal
    from kdcache.cache.schema import TeacherCache
    cache = TeacherCache.open(cache_path)
    for seed, blocks in cache.ledger.done_units().items():
        for block in blocks:
            key = Path(cache_path) / cache.ledger.marker_key(seed, block)
            marker = json.loads(key.read_text())
            marker["objects"] = unit_records(cache, seed, block)
            key.write_bytes(seal(marker, cache.identity_hash))


@pytest.fixture(scope="session")
def s3_root():
    """An S3-compatible server on loopback (moto's server mode, a test dependency) with one bucket; the
    standard AWS_* variables point this process and its children at it. Yields the bucket's URL."""
    import logging
    import socket
    from moto.server import ThreadedMotoServer
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import s3fs
    s3fs.S3FileSystem(skip_instance_cache=True).mkdir("kdcache-test")
    yield "s3://kdcache-test"
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
