"""Same pixels: the FFCV replay of view (i, s) is the teacher-side render of (i, s), bit for bit."""

import numpy as np
import pytest
from PIL import Image

from conftest import kdcache
from kdcache.augment import ParamLayout, ViewRecipe, view_params
from kdcache.augment.preview import teacher_side_views
from kdcache.augment.render import decode_jpeg, render_views
from kdcache.augment.loader import ReplayLoader


def _params(split, recipe, seed, global_seed=0):
    return view_params(recipe, global_seed, seed, np.arange(split.num_samples), split.sizes[:, 0], split.sizes[:, 1])


def _epoch_views(loader):
    views, seen = {}, []
    for images, labels, idx in loader:
        assert images.dtype.__str__() == "torch.uint8" and images.shape[1] == 3
        for image, i in zip(images.permute(0, 2, 3, 1).numpy(), idx.tolist()):
            views[i] = image.copy()
        seen.append(idx.numpy().copy())
    return views, np.concatenate(seen)


def _teacher_views(split, params, size, layout=None):
    reader = split.jpeg_reader()
    return {i: render_views(decode_jpeg(reader[i], *split.sizes[i]), params[i], size, layout)[0]
            for i in range(split.num_samples)}


# renderer 1 stays: caches made with it replay with it (folder_ds has crops that shrink, grow and both)
@pytest.mark.parametrize("which,renderer", [("fmnist_small", 2), ("folder_ds", 2), ("folder_ds", 1)])
def test_replay_equals_teacher_side_for_every_sample_and_seed(which, renderer, request):
    ds = request.getfixturevalue(which)
    split = ds.split("train")
    recipe = ViewRecipe(size=ds.view_size, scale=(0.08, 1.0), renderer=renderer)
    layout = ParamLayout.of(recipe)
    loader = ReplayLoader(split.beton_path, split.num_samples, recipe.size, batch_size=64, workers=2,
                          order="random", seed=3, drop_last=False, layout=layout)
    previous = None
    for seed in (0, 1, 5):  # one loader, the table refilled in place: no recompilation between epochs
        params = _params(split, recipe, seed)
        loader.set_views(params)
        student, order = _epoch_views(loader)
        assert sorted(order.tolist()) == list(range(split.num_samples))
        teacher = _teacher_views(split, params, recipe.size, layout)
        mismatched = [i for i in teacher if not np.array_equal(teacher[i], student[i])]
        assert not mismatched, f"seed {seed}: FFCV replay differs from the teacher-side render for samples {mismatched[:10]}"
        if previous is not None:  # a new seed really gives new views
            changed = np.mean([not np.array_equal(previous[i], student[i]) for i in student])
            assert changed > 0.9
        previous = student


def test_loaders_alive_together_each_replay_their_own_table(fmnist_small):
    """Compiled replay decoders find their view table through a process-wide slot (so that loaders built one
    after another share compiled code): two loaders alive at once hold two slots, and each renders the views of
    its own table, before and after the other ran; a third, built after the first is gone, takes its slot."""
    import gc
    from kdcache.augment.ffcv_ops import TABLE_SLOTS
    split = fmnist_small.split("train")
    recipe = ViewRecipe(size=32, scale=(0.08, 1.0))
    loaders, params = [], []
    for seed in (0, 1):
        loader = ReplayLoader(split.beton_path, split.num_samples, 32, batch_size=64, workers=1,
                              order="sequential", drop_last=False)
        params.append(_params(split, recipe, seed))
        loader.set_views(params[-1])
        loaders.append(loader)
    assert loaders[0].decoder.table_slot != loaders[1].decoder.table_slot
    for which in (0, 1, 0):
        views, _ = _epoch_views(loaders[which])
        teacher = _teacher_views(split, params[which], 32)
        assert all(np.array_equal(teacher[i], views[i]) for i in teacher), f"loader {which}"
    first, second = loaders
    freed = first.decoder.table_slot
    del loaders, loader, first
    gc.collect()
    assert freed in TABLE_SLOTS._free and not TABLE_SLOTS.array[freed].any()   # given back with its table
    third = ReplayLoader(split.beton_path, split.num_samples, 32, batch_size=64, workers=1, order="sequential",
                         drop_last=False)
    slot = third.decoder.table_slot
    assert slot != second.decoder.table_slot and slot == min(TABLE_SLOTS._free + [slot])
    assert TABLE_SLOTS.array[slot, 0] == third.decoder.table.ctypes.data
    third.set_views(params[0])
    views, _ = _epoch_views(third)
    teacher = _teacher_views(split, params[0], 32)
    assert all(np.array_equal(teacher[i], views[i]) for i in teacher)


def test_labels_and_indices_travel_with_the_views(fmnist_small):
    split = fmnist_small.split("train")
    loader = ReplayLoader(split.beton_path, split.num_samples, 32, batch_size=50, workers=2, order="random", seed=1)
    loader.set_views(_params(split, ViewRecipe(size=32), 0))
    for images, labels, idx in loader:
        assert np.array_equal(labels.numpy(), split.labels[idx.numpy()])


def test_views_do_not_depend_on_worker_count_or_order(fmnist_small):
    split = fmnist_small.split("train")
    params = _params(split, ViewRecipe(size=32), 2)
    results = []
    for workers, order, seed in ((1, "sequential", 0), (2, "random", 99)):
        loader = ReplayLoader(split.beton_path, split.num_samples, 32, batch_size=33, workers=workers,
                              order=order, seed=seed, drop_last=False)
        loader.set_views(params)
        results.append(_epoch_views(loader)[0])
    assert all(np.array_equal(results[0][i], results[1][i]) for i in range(split.num_samples))


def test_views_are_not_the_stock_uncropped_image(folder_ds):
    """Guards against a replay that ignores its parameters: a full-image, unflipped view differs from a
    flipped or cropped one, and an explicit identity view equals a plain resize of the decoded image."""
    split = folder_ds.split("train")
    n = split.num_samples
    identity = np.tile(np.array([[0, 0, 1, 1, 0]], np.float32), (n, 1))
    flipped = identity.copy()
    flipped[:, 4] = 1
    loader = ReplayLoader(split.beton_path, n, 48, batch_size=n, workers=1, order="sequential", drop_last=False)
    loader.set_views(identity)
    plain, _ = _epoch_views(loader)
    loader.set_views(flipped)
    mirrored, _ = _epoch_views(loader)
    for i in range(n):
        assert np.array_equal(mirrored[i], plain[i][:, ::-1])
        assert not np.array_equal(mirrored[i], plain[i])


def test_preview_cli_writes_side_by_side_picture(fmnist_small, tmp_path):
    out = tmp_path / "views.png"
    proc = kdcache("preview", fmnist_small.root, "--samples", 8, "--num-seeds", 4, "--out", out)
    assert "32/32 views identical" in proc.stdout
    img = Image.open(out)
    assert img.size[0] > 4 * 2 * 32 and img.size[1] > 8 * 32
    # the picture holds the teacher-side views themselves (zoomed 3x), at the documented places
    split = fmnist_small.split("train")
    params = {0: _params(split, ViewRecipe(size=32), 0)}
    view = teacher_side_views(split, [0], params, ViewRecipe(size=32))[(0, 0)]
    tile = np.asarray(img)[28:28 + 96, 4:4 + 96][::3, ::3]
    assert np.array_equal(tile, view)


def test_an_ffcv_loader_leaves_numbas_shared_array_types_alone(fmnist_small):
    """FFCV 1.0.2's OSCacheManager sets `mutable = False` on numba's interned uint8[::1] type when a Loader is
    built. Every compiled signature holding that type then hashes differently, numba's overload table of a
    dispatcher compiled before raises KeyError at its next use, and a Loader whose thread dies that way hangs."""
    import numba
    bytes_type = numba.uint8[::1]
    decode = numba.njit(lambda a: a.shape[0])
    data = np.zeros(4, np.uint8)
    assert decode(data) == 4
    signature = list(decode.overloads)[0]
    split = fmnist_small.split("train")
    for _ in range(2):
        loader = ReplayLoader(split.beton_path, split.num_samples, 32, 50, workers=1, order="sequential")
        loader.set_views(_params(split, ViewRecipe(size=32), 0))
        next(iter(loader))
    assert bytes_type.mutable and numba.uint8[::1] is bytes_type
    assert signature in decode.overloads and decode(data) == 4


# in a fresh interpreter, Count.n is the number of functions numba compiled so far
COUNT_COMPILES = ("from numba.core import event\n"
                  "class Count(event.Listener):\n"
                  "    n = 0\n"
                  "    def on_start(self, e): Count.n += 1\n"
                  "    def on_end(self, e): pass\n"
                  "event.register('numba:compile', Count())\n")


def _run_python(code: str) -> list:
    import subprocess
    import sys
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()


def test_a_second_loader_of_the_same_pipeline_compiles_nothing(fmnist_small):
    """FFCV compiles every Loader's pipeline again (a new closure per operation); kdcache memoises its Compiler
    on what numba freezes (code, closure values, signature). A second eval loader with the same settings compiles
    nothing and gives the same pixels; one with another crop ratio (a closure value) compiles its own code and
    gives other pixels. In a fresh interpreter: this process's memo already holds other tests' pipelines."""
    code = COUNT_COMPILES + (
            "import numpy as np\n"
            "from kdcache.augment.loader import eval_loader\n"
            f"beton = {str(fmnist_small.split('val').beton_path)!r}\n"
            "def images(ratio):\n"
            "    before = Count.n\n"
            "    out = np.concatenate([b[0].numpy() for b in eval_loader(beton, 32, 100, workers=1, crop_ratio=ratio)])\n"
            "    return out, Count.n - before\n"
            "first, n1 = images(0.875)\n"
            "second, n2 = images(0.875)\n"
            "other, n3 = images(0.5)\n"
            "print(n1, n2, n3, int((first == second).all()), int((first == other).all()))\n")
    out = _run_python(code)
    n1, n2, n3, same, other_same = map(int, out)
    assert n1 > 0 and n2 == 0 and n3 > 0, out
    assert same == 1 and other_same == 0


def test_importing_kdcaches_ffcv_parts_compiles_nothing():
    """Every kdcache command that touches FFCV imports it: FFCV 1.0.2 builds a numba typed Dict at import,
    which compiles numba's dictionary code in every process. kdcache imports FFCV with a plain dict there."""
    code = COUNT_COMPILES + (
            "import kdcache.augment.loader, kdcache.data.beton, kdcache.teacher.verify\n"
            "import ffcv.fields.rgb_image as rgb\n"
            "print(Count.n, rgb.IMAGE_MODES['jpg'], rgb.IMAGE_MODES['raw'])\n")
    out = _run_python(code)
    assert out == ["0", "0", "1"]
