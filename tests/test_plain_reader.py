"""docs/views.md and docs/cache-format.md are enough to rebuild a cache's views and its random teacher.

Two readers written from the docs alone, run as separate programs that never import kdcache:
- VIEW_READER (numpy + zarr): rebuilds every parameter row of the stored seeds (crop on its 2^-13 grid,
  flip, RandAugment on its 2^-12 grid, erasing boxes and noise seeds, pairs, mixing draws, λ and cutmix
  boxes) and the random-erasing fill of views ("pixel" and "rand" noise), boxes in order;
- TEACHER_READER (torch + timm, as "Random teacher weights" says a reader must): rebuilds a random teacher
  and hashes it with the numpy recipe of "Teacher weights hash".
The test makes the caches with kdcache and compares: stored rows, and the renderer's pixels, bit for bit.
The last test checks `kdcache preview`'s picture against the layout docs/views.md gives.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr
from PIL import Image

from conftest import kdcache
from kdcache.augment import ParamLayout, ViewRecipe
from kdcache.augment.preview import teacher_side_views
from kdcache.augment.render import decode_jpeg, render_views
from kdcache.augment.params import view_params
from kdcache.cache.schema import TeacherCache
from kdcache.models import ModelSpec, build_model

TESTS = Path(__file__).parent

VIEW_READER = r'''
"""Rebuild view parameters and erasing fills from docs/views.md; numpy + zarr only."""
import json, math, pathlib, re, sys
import numpy as np, zarr

U64 = np.uint64
def H(x):                                   # splitmix64 finaliser of x + gamma, modulo 2^64
    with np.errstate(over="ignore"):
        z = np.asarray(x, U64) + U64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> U64(30))) * U64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> U64(27))) * U64(0x94D049BB133111EB)
        return z ^ (z >> U64(31))
def key(g, s, i):
    return H(H(H(U64(g)) ^ U64(s)) ^ np.asarray(i, U64))
def bits(k, stream):
    return H(k ^ H(U64(stream)))
def u(k, stream):
    return (bits(k, stream) >> U64(11)).astype(np.float64) * 2.0 ** -53

def crop(k, H_, W_, scale, ratio, grid):
    n = len(k); top, left, h, w = (np.zeros(n) for _ in range(4)); done = np.zeros(n, bool)
    lo, hi = np.log(ratio[0]), np.log(ratio[1])
    for t in range(10):
        A = H_ * W_ * (scale[0] + u(k, 4 * t) * (scale[1] - scale[0]))
        r = np.exp(lo + u(k, 4 * t + 1) * (hi - lo))
        cw, ch = np.round(np.sqrt(A * r)), np.round(np.sqrt(A / r))
        ok = ~done & (cw > 0) & (cw <= W_) & (ch > 0) & (ch <= H_)
        h[ok], w[ok] = ch[ok], cw[ok]
        top[ok] = np.floor(u(k, 4 * t + 2) * (H_ - ch + 1))[ok]
        left[ok] = np.floor(u(k, 4 * t + 3) * (W_ - cw + 1))[ok]
        done |= ok
    f = ~done                                # the central fallback
    cw, ch = W_.copy(), H_.copy()
    narrow, wide = W_ / H_ < min(ratio), W_ / H_ > max(ratio)
    ch[narrow] = np.round(cw[narrow] / min(ratio)); cw[wide] = np.round(ch[wide] * max(ratio))
    h[f], w[f], top[f], left[f] = ch[f], cw[f], ((H_ - ch) // 2)[f], ((W_ - cw) // 2)[f]
    fr = [top / H_, left / W_, h / H_, w / W_]
    return [np.round(x * grid) / grid for x in fr] if grid else fr

def parse_aa(text):
    spec = dict(m=10, n=2, mstd=0.0, mmax=10, inc=0, p=0.5)
    for sec in text.split("-")[1:]:
        name, val = re.fullmatch(r"([a-z]+)([0-9.]+)", sec).groups()
        spec[name] = float(val)
    if spec["mstd"] > 100: spec["mstd"] = math.inf
    spec["mmax"] = spec["mmax"] or 10
    return spec

def rand_augment(k, spec):
    cols = []
    for l in range(int(spec["n"])):
        st = 128 + 8 * l
        op = np.minimum(np.floor(15 * u(k, st)), 14)
        applied = (spec["p"] >= 1) | (u(k, st + 1) <= spec["p"])
        M = float(spec["m"])
        if math.isinf(spec["mstd"]):
            mag = M * u(k, st + 2)
        elif spec["mstd"] > 0:
            mag = M + spec["mstd"] * (np.cos(2 * np.pi * u(k, st + 3)) * np.sqrt(-2.0 * np.log(1.0 - u(k, st + 2))))
        else:
            mag = np.full(len(k), M)
        lvl = np.maximum(0.0, np.minimum(mag, spec["mmax"])) / 10.0
        sign = np.where(u(k, st + 4) > 0.5, -1.0, 1.0)
        inc = spec["inc"] == 1
        enhance = np.maximum(0.1, 1.0 + sign * (lvl * 0.9)) if inc else lvl * 1.8 + 0.1
        post = np.clip(4 - np.trunc(lvl * 4) if inc else np.trunc(lvl * 4), 0, 8)
        sol = np.minimum(256, np.trunc(lvl * 256))
        by_op = {3: sign * (lvl * 30), 4: post, 5: 256 - sol if inc else sol, 6: np.minimum(128, np.trunc(lvl * 110)),
                 7: enhance, 8: enhance, 9: enhance, 10: enhance, 11: sign * (lvl * 0.3), 12: sign * (lvl * 0.3),
                 13: sign * (lvl * 0.45), 14: sign * (lvl * 0.45)}
        arg = np.zeros(len(k))
        for o, v in by_op.items():
            arg = np.where(op == o, v, arg)
        arg = np.round(arg * 4096) / 4096
        cols += [np.where(applied, op, -1), np.where(applied, arg, 0.0)]
    return cols

def erasing(k, reprob, recount, S):
    n = len(k)
    count = np.where(u(k, 300) < reprob, 1 + np.floor(u(k, 301) * recount), 0)
    cols = [count, (bits(k, 302) >> U64(40)).astype(np.float64)]
    for b in range(recount):
        box = np.zeros((n, 4)); todo = count > b
        for t in range(10):
            st = 320 + 40 * b + 4 * t
            A = ((0.02 + u(k, st) * (1.0 / 3.0 - 0.02)) * float(S * S)) / np.maximum(count, 1)
            r = np.exp(np.log(0.3) + u(k, st + 1) * (np.log(1.0 / 0.3) - np.log(0.3)))
            h, w = np.round(np.sqrt(A * r)), np.round(np.sqrt(A / r))
            ok = todo & (w < S) & (h < S)
            box[ok] = np.stack([np.floor(u(k, st + 2) * (S - h + 1)), np.floor(u(k, st + 3) * (S - w + 1)), h, w], 1)[ok]
            todo &= ~ok
        cols += list(box.T)
    return cols

def mixing(g, s, N, M, S, rc):
    idx = np.arange(N); partner = idx.copy()
    for b0 in range(0, N, M):
        blk = idx[b0:min(b0 + M, N)]
        order = blk[np.argsort(u(key(g, s, blk), 200), kind="stable")]
        m = len(order) // 2 * 2
        partner[order[0:m:2]], partner[order[1:m:2]] = order[1:m:2], order[0:m:2]
    K = key(g, s, np.minimum(idx, partner))
    paired = partner != idx
    mixed = paired & (u(K, 201) < rc["mixup_prob"])
    cut = (u(K, 202) < rc["mixup_switch_prob"]) if rc["mixup"] > 0 and rc["cutmix"] > 0 else np.full(N, rc["cutmix"] > 0)
    alpha = np.where(cut, rc["cutmix"], rc["mixup"])
    assert np.all(alpha[mixed] == 1.0), "this reader knows betaincinv(1, 1, u) = u only"
    lam = np.round(u(K, 203) * 65536) / 65536
    out = np.zeros((N, 7)); out[:, 1] = partner - idx; out[:, 2] = 1.0
    mix_up, cut_mix = mixed & ~cut, mixed & cut
    out[mix_up, 0], out[mix_up, 2] = 1, lam[mix_up]
    side = np.floor(S * np.sqrt(1.0 - lam))
    cy, cx = np.floor(u(K, 204) * S), np.floor(u(K, 205) * S)
    y0, y1 = np.clip(cy - side // 2, 0, S), np.clip(cy + side // 2, 0, S)
    x0, x1 = np.clip(cx - side // 2, 0, S), np.clip(cx + side // 2, 0, S)
    box = np.stack([y0, x0, y1 - y0, x1 - x0], 1)
    out[cut_mix, 0], out[cut_mix, 3:] = 2, box[cut_mix]
    out[cut_mix, 2] = 1.0 - ((y1 - y0) * (x1 - x0))[cut_mix] / float(S * S)
    return out

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
def z(seed, b, p, c):                        # p, c: uint64 arrays (broadcast)
    base = H(U64(seed) ^ (U64(b) << U64(32)))
    k = H(base ^ (p * U64(4) + c))
    u1 = ((k >> U64(11)).astype(np.float64) + 1.0) * 2.0 ** -53
    u2 = (H(k) >> U64(11)).astype(np.float64) * 2.0 ** -53
    return np.sqrt(-2.0 * np.log(u1)) * np.cos((2.0 * np.pi) * u2)
def value(zz, c):
    return np.minimum(np.maximum(np.floor(255.0 * (MEAN[c] + STD[c] * zz) + 0.5), 0), 255)

def fill(row, mode, S):
    """-1 where no box erased, else the pixel the boxes leave (in order: a later box overwrites)."""
    canvas = np.full((S, S, 3), -1, np.int16)
    seed = int(row[1])
    for b in range(int(row[0])):
        top, left, h, w = (int(v) for v in row[2 + 4 * b:6 + 4 * b])
        if h <= 0 or w <= 0:
            continue
        for c in range(3):
            if mode == "const":
                canvas[top:top + h, left:left + w, c] = value(0.0, c)
            elif mode == "rand":
                canvas[top:top + h, left:left + w, c] = value(z(seed, b, U64(0), U64(c)), c)
            else:
                p = np.arange(h * w, dtype=U64).reshape(h, w)
                canvas[top:top + h, left:left + w, c] = value(z(seed, b, p, U64(c)), c)
    return canvas

path, out = sys.argv[1], sys.argv[2]
root = zarr.open_group(path, mode="r")
spec = root.attrs["spec"]
rc, g, N = spec["recipe"], spec["global_seed"], spec["dataset"]["num_samples"]
S = rc["size"]
sizes = np.load(pathlib.Path(spec["dataset"]["path"], spec["dataset"]["split"], "sizes.npy")).astype(np.float64)
aa = rc["aa"] if rc["aa"] not in (None, "", "none") else None
strong = bool(aa or rc["reprob"] > 0 or rc["mixup"] > 0 or rc["cutmix"] > 0)
names = root.attrs["renderer"]["param_columns"]
result = {}
for s in sorted(int(x) for x in root["seeds"].group_keys()):
    k = key(g, s, np.arange(N))
    cols = crop(k, sizes[:, 0], sizes[:, 1], rc["scale"], rc["ratio"], 8192 if strong else None)
    cols.append((u(k, 64) < rc["hflip"]).astype(np.float64))
    if aa:
        cols += rand_augment(k, parse_aa(aa))
    if rc["reprob"] > 0:
        cols += erasing(k, rc["reprob"], rc["recount"], S)
    rows = np.stack(cols, 1)
    if rc["mixup"] > 0 or rc["cutmix"] > 0:
        rows = np.concatenate([rows, mixing(g, s, N, rc["mix_block"], S, rc)], 1)
    rows = rows.astype(np.float32)
    stored = root[f"seeds/{s:06d}/params"][:]
    assert rows.shape == stored.shape == (N, len(names))
    result[f"params_{s}"] = rows
    if rc["reprob"] > 0:
        e = names.index("erase_count")
        result[f"fill_{s}"] = np.stack([fill(r[e:], rc["remode"], S) for r in stored])
np.savez(out, **result)
print(json.dumps({"kdcache_imported": any(m.split(".")[0] == "kdcache" for m in sys.modules)}))
'''

TEACHER_READER = r'''
"""Rebuild a random teacher as docs/cache-format.md says, and hash it with its numpy recipe (no kdcache)."""
import hashlib, importlib, json, sys
import numpy as np, torch, timm
teacher, C = json.loads(sys.argv[1]), int(sys.argv[2])
assert teacher["random_init"]
torch.manual_seed(teacher["init_seed"])
if teacher.get("module"):
    mod, _, fn = teacher["module"].partition(":")
    model = getattr(importlib.import_module(mod), fn)(num_classes=C)
else:
    model = timm.create_model(teacher["name"], pretrained=False, num_classes=C)
a = {k: v.numpy() for k, v in model.state_dict().items()}
h = hashlib.sha256()
for name in sorted(a):
    x = a[name]
    h.update(f"{name}|torch.{x.dtype.name}|{tuple(x.shape)}\n".encode())
    h.update(x.astype(x.dtype.newbyteorder("<")).tobytes(order="C"))
print(json.dumps({"sha256": h.hexdigest(), "kdcache_imported": any(m.split(".")[0] == "kdcache" for m in sys.modules)}))
'''

# two recipes between them: both erasing noise modes, RandAugment with gaussian (inc1) and uniform magnitude
# noise, mixup and cutmix, several erasing boxes per view (overlaps), views without erasing
RECIPES = {
    "pixel": ["--aa", "rand-m9-n3-mstd0.5-inc1", "--reprob", 0.7, "--remode", "pixel", "--recount", 3,
              "--mixup", 1.0, "--cutmix", 1.0, "--mix-block", 16],
    "rand": ["--aa", "rand-m7-n2-mstd101-p0.8", "--reprob", 1.0, "--remode", "rand", "--recount", 2,
             "--cutmix", 1.0, "--mixup-prob", 0.8, "--mix-block", 16],
}


def _run(script: Path, *args, env=None):
    proc = subprocess.run([sys.executable, str(script), *map(str, args)], capture_output=True, text=True,
                          cwd=script.parent, env=env)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.splitlines()[-1])


@pytest.fixture(scope="module")
def strong_caches(fmnist_small, tmp_path_factory):
    root = tmp_path_factory.mktemp("plain-reader")
    out = {}
    for mode, flags in RECIPES.items():
        out[mode] = root / mode
        kdcache("dump-teacher", "--data", fmnist_small.root, "--out", out[mode], "--seeds", "3:5", "--view-global-seed", 11,
                "--teacher", "resnet10t", "--random-teacher", "--topk", 3, "--unit-size", 128, "--no-progress",
                *flags)
    return out


@pytest.mark.parametrize("mode", sorted(RECIPES))
def test_plain_reader_rebuilds_every_parameter_and_the_erasing_fill(strong_caches, fmnist_small, tmp_path, mode):
    """Every stored row, and the erased pixels of every view, from the docs: numpy only, bit for bit."""
    script = tmp_path / "views.py"
    script.write_text(VIEW_READER)
    assert not _run(script, strong_caches[mode], tmp_path / "rebuilt.npz")["kdcache_imported"]
    rebuilt = np.load(tmp_path / "rebuilt.npz")
    cache = TeacherCache.open(strong_caches[mode])
    recipe = ViewRecipe.from_dict(cache.spec.recipe)
    layout = ParamLayout.of(recipe)
    split = fmnist_small.split("train")
    reader = split.jpeg_reader()
    e = layout.erase_offset
    erased = varied = 0
    for s in (3, 4):
        stored = zarr.open_group(str(strong_caches[mode]), mode="r")[f"seeds/{s:06d}/params"][:]
        # the rows, column by column (a difference names the column)
        differ = [name for c, name in enumerate(layout.columns())
                  if not np.array_equal(rebuilt[f"params_{s}"][:, c], stored[:, c])]
        assert not differ, f"seed {s}: the docs rebuild other values of {differ}"
        # (and kdcache's own draws agree: the cache holds what view_params makes)
        assert np.array_equal(stored, view_params(recipe, 11, s, np.arange(split.num_samples), split.sizes[:, 0],
                                                  split.sizes[:, 1], split.num_samples))
        modes = stored[:, layout.mix_offset]                 # the rows hold what the rules are about
        assert (modes == 2).any() and ((modes == 1).any() or mode == "rand") and (stored[:, 5] >= 0).any()
        fills = rebuilt[f"fill_{s}"]
        counts = stored[:, e]
        assert (counts == 0).any() or mode == "rand"
        assert (counts >= 2).any()
        # the renderer's view (unmixed) = the view without erasing, with the reader's fill where boxes are
        for i in np.flatnonzero(counts > 0)[:60]:
            image = decode_jpeg(reader[i], *split.sizes[i])
            view = render_views(image, stored[i], recipe.size, layout)[0]
            bare_row = stored[i].copy()
            bare_row[e] = 0
            bare = render_views(image, bare_row, recipe.size, layout)[0]
            fill = fills[i]
            expected = np.where(fill >= 0, fill, bare).astype(np.uint8)
            assert np.array_equal(view, expected), f"view ({i}, {s}): erased pixels differ from the docs' rule"
            erased += int((fill[..., 0] >= 0).sum())
            varied += len(np.unique(fill[fill[..., 0] >= 0].reshape(-1, 3), axis=0))
    assert erased > 3000
    # pixel: (nearly) every erased pixel its own colour; rand: one colour per box
    assert varied > erased / 2 if mode == "pixel" else varied < erased / 20


def test_plain_reader_rebuilds_the_random_teacher(strong_caches, tmp_path):
    """--random-teacher's weights from torch.manual_seed + timm.create_model (or the factory), as
    docs/cache-format.md says; the hash of docs/cache-format.md, computed without kdcache, is the cache's."""
    script = tmp_path / "teacher.py"
    script.write_text(TEACHER_READER)
    teacher = TeacherCache.open(strong_caches["pixel"]).spec.teacher
    assert teacher["random_init"] and teacher["init_seed"] == 11
    got = _run(script, json.dumps(teacher), 10)
    assert not got["kdcache_imported"] and got["sha256"] == teacher["sha256"]
    assert teacher["sha256"] == build_model(ModelSpec(name="resnet10t", random_init=True, seed=11), 10)[1]["sha256"]
    # a factory model (a module timm does not have), as dump-teacher --teacher-module ... --random-teacher builds it
    info = build_model(ModelSpec(module="tiny_models:tiny_cnn", random_init=True, seed=5), 7)[1]
    env = dict(os.environ, PYTHONPATH=str(TESTS))
    got = _run(script, json.dumps(info), 7, env=env)
    assert got["sha256"] == info["sha256"] and not got["kdcache_imported"]


def test_preview_layout_is_the_documented_one(fmnist_small, tmp_path):
    """docs/views.md "kdcache preview": canvas size, tile places, white gaps, no red frame when identical."""
    out = tmp_path / "p.png"
    proc = kdcache("preview", fmnist_small.root, "--samples", 3, "--num-seeds", 2, "--reprob", 1.0, "--out", out)
    assert "6/6 views identical" in proc.stdout
    img = np.asarray(Image.open(out).convert("RGB"))
    N, S, m = fmnist_small.split("train").num_samples, 32, 2
    indices = sorted(set(np.round(np.linspace(0, N - 1, 3)).astype(int).tolist()))
    z = max(1, 96 // S)
    c = S * z
    P = 2 * c + 4
    assert img.shape == (28 + len(indices) * (c + 4) + 4, m * (P + 12) + 4, 3)
    split = fmnist_small.split("train")
    recipe = ViewRecipe(size=S, reprob=1.0)
    params = {s: view_params(recipe, 0, s, np.arange(N), split.sizes[:, 0], split.sizes[:, 1], N) for s in range(m)}
    views = teacher_side_views(split, indices, params, recipe)
    white = np.ones_like(img[..., 0], bool)
    white[:28] = False                                        # the header's text (the font's own glyphs)
    for s in range(m):
        x0 = 4 + s * (P + 12)
        for r, i in enumerate(indices):
            y0 = 28 + r * (c + 4)
            big = np.repeat(np.repeat(views[(i, s)], z, 0), z, 1)
            for col in (0, 1):
                x = x0 + col * (c + 4)
                assert np.array_equal(img[y0:y0 + c, x:x + c], big), f"tile ({i}, {s}) side {col}"
                white[y0:y0 + c, x:x + c] = False
    assert (img[white] == 255).all()                        # gaps white, no red frame


SEAL_READER = r'''
"""Check a cache's seals from docs/cache-format.md: the root's identity_sha256 and every marker's checksum."""
import hashlib, json, pathlib, sys
import google_crc32c

def canonical(doc):
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()

cache = pathlib.Path(sys.argv[1])
attrs = json.loads((cache / "zarr.json").read_text())["attributes"]
identity = attrs["identity_sha256"]
root_ok = hashlib.sha256(canonical({k: v for k, v in attrs.items() if k != "identity_sha256"})).hexdigest() == identity
bad = []
for path in sorted(cache.glob("units/*/*.json")):
    try:
        m = json.loads(path.read_text())
        body = {k: v for k, v in m.items() if k != "checksum"}
        ok = (f"{google_crc32c.value(canonical(body)):08x}" == m["checksum"] and m["identity"] == identity
              and all(name in m["objects"] for name in ("logp", "indices", "log_tail", "params")))
    except (ValueError, KeyError, TypeError):
        ok = False
    if not ok:
        bad.append(str(path.relative_to(cache)))
print(json.dumps({"root_ok": root_ok, "markers": len(list(cache.glob("units/*/*.json"))), "bad": bad,
                  "kdcache_imported": "kdcache" in sys.modules}))
'''


def test_plain_reader_checks_the_seals(strong_caches, tmp_path):
    """The root identity's hash and each marker's checksum, computed as docs/cache-format.md defines them,
    are the ones kdcache wrote; one flipped marker byte is found the same way."""
    import shutil
    script = tmp_path / "seals.py"
    script.write_text(SEAL_READER)
    cache = tmp_path / "cache"
    shutil.copytree(strong_caches["rand"], cache)
    got = _run(script, cache)
    assert got == {"root_ok": True, "markers": 8, "bad": [], "kdcache_imported": False}
    marker = cache / "units/000004/000002.json"
    marker.write_text(marker.read_text().replace('"views": 128', '"views": 129'))
    assert _run(script, cache)["bad"] == ["units/000004/000002.json"]


SAMPLED_READER = r'''
"""Every teacher's target of a view from docs/cache-format.md ("Targets", "More teachers over the same views"):
top-k, sampled or sampled-cv rows, at any temperature; numpy + zarr only."""
import json, pathlib, sys
import numpy as np, zarr

def target(group, s, i, T):
    a = group.attrs
    spec, enc = a["spec"], a["logp_encoding"]
    C, k = spec["dataset"]["num_classes"], spec["topk"]
    g = group[f"seeds/{s:06d}"]
    lp, ix, lt = g["logp"][i], g["indices"][i], g["log_tail"][i].astype(np.float64)
    lp = -lp.astype(np.float64) / enc["scale"] if enc["dtype"] == "uint16" else lp.astype(np.float64)
    if a["tail_rule"] == "uniform-tail-v2":
        z = np.full(C, lt - np.log(C - k)); z[ix] = lp
        q = np.exp((z - z.max()) / T)
        return q / q.sum()
    m, Td = spec["samples"], spec["sample_temperature"]
    assert len(lp) == k + m
    if a["tail_rule"] == "median-control-variate-v1":
        log_s, log_beta, log_a = lt
        b = np.exp(log_beta * Td / T)
        d = lp[k:]
        if T == Td:
            corr = np.sign(d / Td - log_beta) * np.exp(log_a) / m
            tail = np.exp(log_s)
        else:
            corr = (np.exp(d / T) - b) * np.exp(log_a) / (m * np.abs(np.exp(d / Td) - np.exp(log_beta)))
            tail = max((C - k) * b + corr.sum(), 0.0)
        q = np.full(C, b); q[ix[:k]] = np.exp(lp[:k] / T); np.add.at(q, ix[k:], corr)
        return q / (np.exp(lp[:k] / T).sum() + tail)
    assert a["tail_rule"] == "importance-tail-v1"
    slots = np.concatenate([lp[:k] / T, lt - np.log(m) + (1 / T - 1 / Td) * lp[k:]])
    w = np.exp(slots - slots.max()); w /= w.sum()
    q = np.zeros(C); np.add.at(q, ix, w)
    return q

path, s = sys.argv[1], int(sys.argv[2])
rows, temps = json.loads(sys.argv[3]), json.loads(sys.argv[4])
root = zarr.open_group(path, mode="r")
assert root.attrs["format_version"] == 4
groups = {root.attrs["spec"]["teacher"]["name"]: root}
for d in sorted(pathlib.Path(path, "teachers").iterdir()):
    t = zarr.open_group(str(d), mode="r")
    assert t.attrs["views_of"] == root.attrs["identity_sha256"] and t.attrs["teacher_label"] == d.name
    assert "params" not in t[f"seeds/{s:06d}"]      # its views are the main cache's
    groups[d.name] = t
out = {}
for label, g in groups.items():
    Td = g.attrs["spec"]["sample_temperature"]
    for T in temps + [Td]:
        out[f"{label}@{T}"] = [target(g, s, i, T).tolist() for i in rows]
print(json.dumps({"targets": out, "kdcache_imported": "kdcache" in sys.modules}))
'''


def test_plain_reader_rebuilds_sampled_targets_of_every_teacher(fmnist_small, tmp_path):
    """A sampled cache (Td = 1) with a sampled teacher added at Td = 2, a top-k one and a sampled-cv one at
    Td = 4: the documented target of each at T = Td and at T = 3, from zarr + numpy, is kdcache's
    SparseTargets.probs(T)."""
    from kdcache.cache.slabs import read_slab
    from kdcache.cache.targets import SparseTargets
    import torch
    cache = tmp_path / "cache"
    common = ["--data", fmnist_small.root, "--seeds", "2:3", "--unit-size", 128, "--no-progress", "--out", cache]
    kdcache("dump-teacher", *common, "--teacher", "resnet10t", "--random-teacher", "--topk", 3, "--targets",
            "sampled", "--samples", 5)
    kdcache("dump-teacher", *common, "--teacher", "resnet10t", "--random-teacher", "--teacher-init-seed", 9,
            "--topk", 2, "--targets", "sampled", "--samples", 4, "--sample-temperature", 2.0, "--add-teacher",
            "--teacher-label", "r10-td2")
    kdcache("dump-teacher", *common, "--teacher", "resnet10t", "--random-teacher", "--teacher-init-seed", 8,
            "--topk", 4, "--add-teacher", "--teacher-label", "r10-top4")
    kdcache("dump-teacher", *common, "--teacher", "resnet10t", "--random-teacher", "--teacher-init-seed", 7,
            "--topk", 1, "--targets", "sampled-cv", "--samples", 2, "--sample-temperature", 4.0, "--add-teacher",
            "--teacher-label", "r10-cv")
    script = tmp_path / "sampled.py"
    script.write_text(SAMPLED_READER)
    rows = [0, 17, 255, 399]
    got = _run(script, cache, 2, json.dumps(rows), json.dumps([3.0]))
    assert not got["kdcache_imported"]
    teachers = TeacherCache.open(cache).teachers()
    assert sorted(teachers) == ["r10-cv", "r10-td2", "r10-top4", "resnet10t"]
    checked = 0
    for label, teacher in teachers.items():
        slab = read_slab(teacher, 2)
        t = SparseTargets(torch.from_numpy(slab.indices[rows]).long(), torch.from_numpy(slab.logp[rows]),
                          torch.from_numpy(slab.log_tail[rows]), 10, **teacher.spec.target_rule())
        for T in (3.0, teacher.spec.sample_temperature):
            ours = t.probs(T).double().numpy()
            docs = np.array(got["targets"][f"{label}@{T}"])
            # kdcache works in float32: slots of magnitude < 40 rounded to 2^-24 relative, then a softmax
            np.testing.assert_allclose(ours, docs, rtol=2e-5, atol=1e-7, err_msg=f"{label} at T = {T}")
            checked += 1
    assert checked == 8
