"""`kdcache prepare`: canonical order, same bytes in shards and beton, fingerprints, bad input, atomicity."""

import json
import shutil

import numpy as np
import pytest
import webdataset as wds
from ffcv.reader import Reader
from PIL import Image

from conftest import image_bytes, kdcache, make_imagefolder, random_photo, run_cli
from kdcache.data import sources
from kdcache.data.dataset import PreparedDataset
from kdcache.data.idx import read_idx
from kdcache.data.prepare import prepare
from kdcache.errors import KdcacheError


def beton_rows(path):
    """(jpeg bytes, label, index, (h, w)) per row, read with FFCV's own Reader."""
    r = Reader(str(path))
    img, label, index = (r.metadata[f"f{j}"] for j in range(3))
    sizes = dict(zip(r.alloc_table["ptr"].tolist(), r.alloc_table["size"].tolist()))
    raw = np.fromfile(path, dtype=np.uint8)
    rows = []
    for j in range(r.num_samples):
        ptr = int(img["data_ptr"][j])
        rows.append((raw[ptr:ptr + sizes[ptr]].tobytes(), int(label[j]), int(index[j]),
                     (int(img["height"][j]), int(img["width"][j])), int(img["mode"][j])))
    return rows


def shard_rows(split):
    rows = []
    for path in split.shard_paths:
        for sample in wds.WebDataset(str(path), shardshuffle=False, empty_check=False):
            rows.append((sample["__key__"], sample["jpg"], int(sample["cls"])))
    return rows


def test_fashion_mnist_small_is_canonical(fmnist_small):
    ds = fmnist_small
    assert ds.num_classes == 10 and ds.view_size == 32
    labels = read_idx(sources.FASHION_MNIST_DIR + "/train-labels-idx1-ubyte.gz")[:400]
    train = ds.split("train")
    assert train.num_samples == 400 and len(train.shard_paths) == 3
    assert train.info["shard_counts"] == [150, 150, 100]
    assert np.array_equal(train.labels, labels)
    shards = shard_rows(train)
    beton = beton_rows(train.beton_path)
    assert [k for k, _, _ in shards] == train.keys == [f"train_{j:06d}" for j in range(400)]
    for i, ((key, jpeg, cls), (bjpeg, blabel, bindex, size, mode)) in enumerate(zip(shards, beton)):
        assert jpeg == bjpeg, f"sample {i}: beton bytes differ from shard bytes"
        assert jpeg == train.jpeg_reader()[i]
        assert cls == blabel == labels[i] and bindex == i and size == (28, 28) and mode == 0
    # the dump reads ranges in one go per shard; ranges inside one shard, across both boundaries, and empty
    reader = train.jpeg_reader()
    for a, b in ((0, 1), (3, 149), (140, 160), (0, 400), (299, 301), (7, 7)):
        data, offsets, lengths = reader.read_range(a, b)
        assert [bytes(data[o:o + n]) for o, n in zip(offsets, lengths)] == [reader[i] for i in range(a, b)], (a, b)
    # the canonical image is the original pixels, replicated to RGB, up to JPEG loss
    first = np.asarray(Image.open(__import__("io").BytesIO(shards[0][1])))
    original = read_idx(sources.FASHION_MNIST_DIR + "/train-images-idx3-ubyte.gz")[0]
    assert first.shape == (28, 28, 3) and np.abs(first[..., 0].astype(int) - original).mean() < 6


def test_prepare_is_deterministic_and_idempotent(tmp_path, fmnist_small):
    again = prepare(sources.fashion_mnist(limit=400), tmp_path / "again", shard_size=150, workers=1)
    assert again.fingerprint == fmnist_small.fingerprint
    assert [p.read_bytes() for p in again.split("val").shard_paths] == \
           [p.read_bytes() for p in fmnist_small.split("val").shard_paths]
    mtime = (tmp_path / "again" / "manifest.json").stat().st_mtime_ns
    same = prepare(sources.fashion_mnist(limit=400), tmp_path / "again", shard_size=150, workers=1)
    assert (tmp_path / "again" / "manifest.json").stat().st_mtime_ns == mtime and same.fingerprint == again.fingerprint
    # A new default view size is a manifest setting, not a new dataset: same shards, same fingerprint.
    shard_mtime = again.split("train").shard_paths[0].stat().st_mtime_ns
    resized = prepare(sources.fashion_mnist(limit=400), tmp_path / "again", shard_size=150, workers=1, view_size=48)
    assert resized.view_size == 48 and PreparedDataset.open(tmp_path / "again").view_size == 48
    assert resized.fingerprint == again.fingerprint and resized.split("train").shard_paths[0].stat().st_mtime_ns == shard_mtime
    with pytest.raises(KdcacheError, match="--overwrite"):
        prepare(sources.fashion_mnist(limit=300), tmp_path / "again", shard_size=150, workers=1)
    other = prepare(sources.fashion_mnist(limit=300), tmp_path / "again", shard_size=150, workers=1, overwrite=True)
    assert other.split("train").num_samples == 300 and other.fingerprint != again.fingerprint
    assert not list(tmp_path.glob(".again.*"))


def test_info_json_via_cli(fmnist_small):
    out = json.loads(kdcache("info", fmnist_small.root, "--json").stdout)
    assert out["kind"] == "dataset" and out["num_classes"] == 10
    assert out["fingerprint"] == fmnist_small.fingerprint
    assert out["splits"]["train"]["num_samples"] == 400 and out["splits"]["val"]["num_samples"] == 400
    text = kdcache("info", fmnist_small.root).stdout
    assert "400 samples" in text and fmnist_small.fingerprint in text


def test_full_fashion_mnist_real_files():
    """The whole real dataset (what the README's demo prepares): 60000 train / 10000 val, 10 balanced classes,
    read from Debian's files by the source prepare uses. Preparing all 70,000 images (the same code as the
    400-sample subsets above, without a limit) is tools/bench_prepare.py's, which checks these counts again."""
    source = sources.fashion_mnist()
    assert source.num_classes == 10
    for split, n in (("train", 60000), ("val", 10000)):
        labels = [s.label for s in source.splits[split]()]
        assert len(labels) == n and np.bincount(labels).tolist() == [n // 10] * 10


def test_imagefolder_sizes_modes_and_order(folder_ds):
    ds = folder_ds
    assert ds.num_classes == 3 and ds.manifest["class_names"] == ["cat", "dog", "fox"] and ds.view_size == 48
    train = ds.split("train")
    assert train.num_samples == 18 and train.info["shard_counts"] == [7, 7, 4]
    # canonical order: classes sorted, files sorted; labels follow the class folders
    assert train.keys[:2] == ["cat%2Ftrain_cat_000%2EJPEG", "cat%2Ftrain_cat_001%2EJPEG"] and train.labels.tolist() == [0] * 6 + [1] * 6 + [2] * 6
    assert train.sizes.max() == 500  # 701x333 and 90x610 were resized to a longest side of 500
    assert (701, 333) not in map(tuple, train.sizes.tolist()) and (500, 238) in map(tuple, train.sizes.tolist())
    for (key, jpeg, cls), (bjpeg, blabel, bindex, size, _), i in zip(shard_rows(train), beton_rows(train.beton_path), range(99)):
        assert jpeg == bjpeg and cls == blabel and bindex == i
        assert Image.open(__import__("io").BytesIO(jpeg)).size == (size[1], size[0]) == tuple(train.sizes[i][::-1])


def test_timm_info_file_lists_the_shards(folder_ds):
    info = json.loads((folder_ds.root / "_info.json").read_text())
    train = info["splits"]["train"]
    assert train["num_samples"] == 18 and train["shard_lengths"] == [7, 7, 4]
    assert all((folder_ds.root / f).is_file() for f in train["filenames"])


def _expect_error(make_source, out, match, **kw):
    with pytest.raises(KdcacheError, match=match):
        prepare(make_source(), out, workers=2, **kw)
    assert not out.exists(), "a failed prepare must not leave a dataset directory behind"
    assert not list(out.parent.glob(f".{out.name}.tmp-*"))


def test_bad_images_are_named_or_skipped(tmp_path):
    root = make_imagefolder(tmp_path / "src")
    bad = root / "train" / "dog" / "broken.JPEG"
    bad.write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    _expect_error(lambda: sources.imagefolder(str(root)), tmp_path / "ds", r"broken\.JPEG: sample 'dog%2Fbroken%2EJPEG'")
    ds = prepare(sources.imagefolder(str(root)), tmp_path / "ds", workers=2, skip_bad=True)
    skipped = ds.split("train").info["skipped"]
    assert [s["key"] for s in skipped] == ["dog%2Fbroken%2EJPEG"] and "cannot read image" in skipped[0]["reason"]
    assert ds.split("train").num_samples == 18 and "dog%2Fbroken%2EJPEG" not in ds.split("train").keys
    assert kdcache("info", tmp_path / "ds").stdout.count("1 skipped") == 1


def test_duplicate_keys_and_foreign_val_classes(tmp_path):
    # ImageFolder keys are paths (one per file); shards from elsewhere can repeat a key
    rng = np.random.default_rng(0)
    for shard in ("0000", "0001"):
        _write_shard(tmp_path / f"in-{shard}.tar", [{"__key__": "a0", "jpg": image_bytes(random_photo(rng, 9, 9), "JPEG"),
                                                     "cls": 0}])
    _expect_error(lambda: sources.wds(str(tmp_path / "in-*.tar")), tmp_path / "ds",
                  r"in-0001\.tar:a0: sample 'a0': duplicate key \(first seen at .*in-0000\.tar:a0\)")
    root = make_imagefolder(tmp_path / "src")
    (root / "val" / "wolf").mkdir()
    _expect_error(lambda: sources.imagefolder(str(root)), tmp_path / "ds", r"wolf: class folder not present")


def test_imagefolder_keys_tell_every_file_apart(tmp_path):
    """A key is the file's path below the split folder, class folder included, escaped (webdataset keys
    hold no dots): train/cat/0001.jpg and train/dog/0001.jpg, a.b.jpg and a_b.jpg, a.jpg and a.png are
    six samples with six keys (they collided: an error, or one silently dropped with --skip-bad)."""
    from urllib.parse import unquote
    rng = np.random.default_rng(0)
    names = ["cat/0001.jpg", "dog/0001.jpg", "cat/a.b.jpg", "cat/a_b.jpg", "cat/a.jpg", "cat/a.png"]
    for name in names:
        (tmp_path / "src" / "train" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "src" / "train" / name).write_bytes(image_bytes(random_photo(rng, 20, 30), "PNG"))
    for skip_bad in (False, True):
        ds = prepare(sources.imagefolder(str(tmp_path / "src")), tmp_path / f"ds-{skip_bad}", workers=2, skip_bad=skip_bad)
        train = ds.split("train")
        assert train.keys == ["cat%2F0001%2Ejpg", "cat%2Fa%2Eb%2Ejpg", "cat%2Fa%2Ejpg", "cat%2Fa%2Epng",
                              "cat%2Fa_b%2Ejpg", "dog%2F0001%2Ejpg"]
        assert sorted(unquote(k) for k in train.keys) == sorted(names)     # the escape is undone by unquote
        assert train.labels.tolist() == [0, 0, 0, 0, 0, 1] and train.info["skipped"] == []
        assert [k for k, _, _ in shard_rows(train)] == train.keys          # webdataset reads the same keys back


def test_empty_source_is_an_error(tmp_path):
    (tmp_path / "src" / "train" / "cat").mkdir(parents=True)
    _expect_error(lambda: sources.imagefolder(str(tmp_path / "src")), tmp_path / "ds", "no usable samples")
    with pytest.raises(KdcacheError, match="not a directory"):
        sources.imagefolder(str(tmp_path / "nothing"))


def _write_shard(path, samples):
    with wds.TarWriter(str(path)) as w:
        for s in samples:
            w.write(s)


def test_wds_source_sorted_shards_labels_and_errors(tmp_path):
    rng = np.random.default_rng(0)
    jpg = lambda h, w: image_bytes(random_photo(rng, h, w), "JPEG")
    src = tmp_path / "in"
    src.mkdir()
    _write_shard(src / "imagenet1k-train-0001.tar", [{"__key__": f"b{j}", "jpg": jpg(40, 60), "cls": 1} for j in range(3)])
    _write_shard(src / "imagenet1k-train-0000.tar", [{"__key__": f"a{j}", "jpg": jpg(50, 30), "cls": j} for j in range(4)])
    _write_shard(src / "imagenet1k-validation-0000.tar", [{"__key__": "v0", "jpg": jpg(20, 20), "cls": 2}])
    pattern = str(src / "imagenet1k-train-{0000..0001}.tar")
    ds = prepare(sources.wds(pattern, val_pattern=str(src / "imagenet1k-validation-*.tar")), tmp_path / "ds", workers=2)
    train = ds.split("train")
    assert train.keys == ["a0", "a1", "a2", "a3", "b0", "b1", "b2"]  # shards sorted by name, then tar order
    assert train.labels.tolist() == [0, 1, 2, 3, 1, 1, 1] and ds.num_classes == 4
    assert ds.split("val").num_samples == 1
    # the glob form finds the same shards
    same = sources.wds(str(src / "imagenet1k-train-*.tar"))
    assert same.description["train"] == ds.manifest["source"]["train"]
    # label out of range for the declared class count
    _expect_error(lambda: sources.wds(pattern, num_classes=3), tmp_path / "bad", r"imagenet1k-train-0000\.tar:a3: sample 'a3': label 3 out of range")
    # a sample without a label
    _write_shard(src / "imagenet1k-train-0002.tar", [{"__key__": "c0", "jpg": jpg(10, 10)}])
    _expect_error(lambda: sources.wds(str(src / "imagenet1k-train-*.tar")), tmp_path / "bad", r"sample 'c0': no valid 'cls' label")
    # a missing shard of a brace pattern
    with pytest.raises(KdcacheError, match="imagenet1k-train-0006.tar: shard not found"):
        sources.wds(str(src / "imagenet1k-train-{0006..0007}.tar"))


def _wds_input(tmp_path, bad_jpeg_key=None):
    """in-0000.tar: k0..k3 (k1's JPEG replaced by garbage if asked); in-0001.tar: m0, m1. Returns the
    pattern and the members of in-0000.tar (name, header offset, data offset, size)."""
    import tarfile
    rng = np.random.default_rng(0)
    jpg = lambda: image_bytes(random_photo(rng, 30, 40), "JPEG")
    src = tmp_path / "in"
    src.mkdir()
    _write_shard(src / "in-0000.tar", [{"__key__": f"k{j}", "cls": j, "jpg": b"\xff\xd8\xff\xe0 not a jpeg"
                                        if f"k{j}" == bad_jpeg_key else jpg()} for j in range(4)])
    _write_shard(src / "in-0001.tar", [{"__key__": f"m{j}", "cls": j, "jpg": jpg()} for j in range(2)])
    with tarfile.open(src / "in-0000.tar") as tf:
        members = [(m.name, m.offset, m.offset_data, m.size) for m in tf]
    return str(src / "in-*.tar"), src / "in-0000.tar", members


def test_wds_corrupt_jpeg_is_named_by_shard_and_key_or_skipped(tmp_path):
    pattern, shard, _ = _wds_input(tmp_path, bad_jpeg_key="k1")
    _expect_error(lambda: sources.wds(pattern), tmp_path / "ds", r"in-0000\.tar:k1: sample 'k1': cannot read image")
    ds = prepare(sources.wds(pattern), tmp_path / "ds", workers=2, skip_bad=True)
    train = ds.split("train")
    assert train.keys == ["k0", "k2", "k3", "m0", "m1"] and train.labels.tolist() == [0, 2, 3, 0, 1]
    (skipped,) = train.info["skipped"]
    assert skipped["key"] == "k1" and skipped["origin"] == f"{shard}:k1" and "cannot read image" in skipped["reason"]


@pytest.mark.parametrize("cut,damaged,kept", [
    ("inside k2's JPEG", "k2", ["k0", "k1"]),          # tarfile: "unexpected end of data"
    ("before k2's header", "k1", ["k0"]),             # read as a clean end of the tar: k2, k3 lost unnoticed
    ("inside k2's header", "k1", ["k0"]),             # the same
])
def test_wds_truncated_tar_is_named_by_shard_and_key_or_skipped(tmp_path, cut, damaged, kept):
    """A shard cut short (a copy that ran out of disk, an interrupted download). Cut at a member boundary or
    in a header, Python's tarfile (and webdataset) take it for the end of the tar and the rest of the shard
    was silently lost. Without its end-of-archive marker the last sample may be incomplete: it is the one named."""
    pattern, shard, members = _wds_input(tmp_path)
    header, data = {name: h for name, h, _, _ in members}, {name: d for name, _, d, _ in members}
    at = {"inside k2's JPEG": data["k2.jpg"] + 100, "before k2's header": header["k2.cls"],
          "inside k2's header": header["k2.cls"] + 200}[cut]
    shard.write_bytes(shard.read_bytes()[:at])
    _expect_error(lambda: sources.wds(pattern), tmp_path / "ds",
                  rf"in-0000\.tar:{damaged}: sample '{damaged}': truncated or damaged tar")
    ds = prepare(sources.wds(pattern), tmp_path / "ds", workers=2, skip_bad=True)
    train = ds.split("train")
    assert train.keys == kept + ["m0", "m1"]
    (skipped,) = train.info["skipped"]
    assert skipped["key"] == damaged and skipped["origin"] == f"{shard}:{damaged}"
    assert "the rest of the shard is lost" in skipped["reason"]


def test_cli_error_is_clear_and_exit_code_two(tmp_path):
    proc = run_cli("prepare", "imagefolder", tmp_path / "missing", "--out", tmp_path / "ds", check=False)  # the real exit code
    assert proc.returncode == 2 and "missing/train: not a directory" in proc.stderr
    proc = kdcache("info", tmp_path, check=False)
    assert proc.returncode == 2 and "neither a prepared dataset" in proc.stderr


def test_imagefolder_shuffle_seed_permutes_the_train_order(tmp_path):
    """Mixing pairs consecutive samples: --shuffle-seed gives ImageFolder a class-mixed canonical order."""
    from conftest import make_imagefolder
    from kdcache.data import sources
    root = make_imagefolder(tmp_path / "src", per_class=6)
    plain = [s.label for s in sources.imagefolder(str(root)).splits["train"]()]
    shuffled = [s.label for s in sources.imagefolder(str(root), shuffle_seed=1).splits["train"]()]
    again = [s.key for s in sources.imagefolder(str(root), shuffle_seed=1).splits["train"]()]
    assert plain == sorted(plain) and sorted(shuffled) == plain and shuffled != plain
    assert again == [s.key for s in sources.imagefolder(str(root), shuffle_seed=1).splits["train"]()]


@pytest.mark.parametrize("field,entry", [
    ("shards", "../../outside.tar"),       # relative, climbing out of DIR/train/
    ("beton", "ABSOLUTE"),                 # an absolute path
    ("split", "../outside"),               # a split name is a folder name too
])
def test_manifest_paths_cannot_point_outside_the_dataset(fmnist_small, tmp_path, field, entry):
    root = tmp_path / "ds"
    shutil.copytree(fmnist_small.root, root)
    outside = tmp_path / "outside.tar"
    outside.write_bytes(b"not yours")          # the files exist: only the check can refuse them
    shutil.copytree(root / "val", tmp_path / "outside")
    manifest = json.loads((root / "manifest.json").read_text())
    if field == "shards":
        manifest["splits"]["train"]["shards"][1] = entry
    elif field == "beton":
        entry = str(outside)
        manifest["splits"]["train"]["beton"] = entry
    else:
        manifest["splits"][entry] = manifest["splits"].pop("val")
        manifest["splits"][entry]["beton"] = "val/val.beton"
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(KdcacheError) as err:
        PreparedDataset.open(root)
    assert str(err.value) == f"{root / 'manifest.json'}: entry {entry!r} points outside the dataset directory {root}"


def _kill_prepare_while_writing_the_beton(out):
    """Start `kdcache prepare` (20000 samples, 2 workers) and kill -9 it while it writes the train beton:
    then its canonicalisation pool (2 workers), FFCV's 2 writers and the shared-memory tracker all run.
    Returns those child processes as they were just before the kill."""
    import signal
    import subprocess
    import sys
    import time
    import psutil
    proc = subprocess.Popen([sys.executable, "-m", "kdcache", "prepare", "fashion-mnist", "--limit", "20000",
                             "--shard-size", "5000", "--workers", "2", "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    parent = psutil.Process(proc.pid)
    children, deadline = [], time.time() + 240
    while proc.poll() is None and time.time() < deadline:
        children = parent.children(recursive=True)
        if len(children) >= 5 and list(out.parent.glob(f".{out.name}.tmp-*/train/train.beton")):
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert len(children) >= 5, "prepare ended before it was seen writing the beton"
    return children


def test_killed_prepare_leaves_no_worker_behind(tmp_path):
    """FFCV's writers inherit the pool's pipes, so neither saw its parent go: after a kill -9 they stayed,
    holding the beton's shared memory. Every worker now dies with prepare."""
    import contextlib
    import psutil
    children = _kill_prepare_while_writing_the_beton(tmp_path / "ds")
    try:
        _, alive = psutil.wait_procs(children, timeout=10)
        alive = [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        assert not alive, f"orphaned after kill -9 of prepare: {[(p.pid, p.cmdline()[-4:]) for p in alive]}"
    finally:
        for p in children:   # never leave this test's own orphans on the machine
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
