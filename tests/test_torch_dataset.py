"""The map-style dataset (kdcache.student.dataset, no FFCV) against the FFCV replay: the same pixels for every
sample of two datasets and three seeds with RandAugment, erasing, mixup and cutmix, the cache's own targets,
the same batches as train-student's paired order, and the evaluation views of eval_loader."""

import runpy
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from conftest import dump_random_teacher
import kdcache
from kdcache.augment import ParamLayout, ViewRecipe, view_params
from kdcache.augment.loader import ReplayLoader, eval_loader
from kdcache.augment.mixing import MODE_CUTMIX, MODE_MIXUP
from kdcache.cache.schema import TeacherCache
from kdcache.cache.slabs import read_slab
from kdcache.errors import KdcacheError
from kdcache.student.dataset import (CentreCropDataset, PairBatchSampler, ReplayDataset, collate_views,
                                     paired_order)

A2_FLAGS = ["--aa", "rand-m7-mstd0.5", "--mixup", 0.2, "--cutmix", 1.0, "--reprob", 0.25, "--remode", "pixel",
            "--recount", 2, "--mix-block", 16]
SEEDS = (0, 1, 2)


def random_teacher_weights(num_classes: int, folder) -> str:
    import safetensors.torch
    from kdcache.models import ModelSpec, build_model
    model, _ = build_model(ModelSpec(name="resnet10t", random_init=True, seed=3), num_classes)
    safetensors.torch.save_file(model.state_dict(), str(folder / "teacher.safetensors"))
    return folder / "teacher.safetensors"


@pytest.fixture(scope="module", params=["fmnist_small", "folder_ds"])
def a2(request, tmp_path_factory):
    """(prepared dataset, A2 cache of seeds 0:3 with top-2 targets) for each of the two datasets."""
    ds = request.getfixturevalue(request.param)
    folder = tmp_path_factory.mktemp("torchds")
    cache = dump_random_teacher(ds.root, folder / "cache", random_teacher_weights(ds.num_classes, folder), "0:3",
                                "--topk", 2, *A2_FLAGS)
    return ds, cache


_LOADERS = {}


def replay_loader(split, layout, size):
    """One FFCV replay loader per (split, layout, size) in this module: a new FFCV pipeline compiles for seconds."""
    key = (str(split.beton_path), layout, size)
    if key not in _LOADERS:
        _LOADERS[key] = ReplayLoader(split.beton_path, split.num_samples, size, batch_size=32, workers=2,
                                     drop_last=False, layout=layout)
    return _LOADERS[key]


def ffcv_views(loader, params) -> dict:
    loader.set_views(params)
    out = {}
    for images, _, idx in loader:
        for image, i in zip(images.numpy(), idx.tolist()):
            out[i] = image.copy()
    return out


def dataset_batches(dataset, batch_size=32, workers=0, **kw):
    sampler = PairBatchSampler(dataset, batch_size, seed=5, sync_dataset=False)
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_views, num_workers=workers, **kw)


def test_pixels_and_targets_equal_the_ffcv_replay_and_the_cache(a2):
    ds, cache_path = a2
    split = ds.split("train")
    cache = TeacherCache.open(cache_path)
    batched = ReplayDataset(ds.root, cache_path)
    per_item = ReplayDataset(ds.root, kdcache.open_cache(cache_path), mix="item")   # the public handle works too
    layout = batched.layout
    assert layout.ra_layers and layout.erase_boxes and layout.mixing and batched.seeds == list(SEEDS)
    loader = replay_loader(split, layout, batched.size)
    modes = set()
    for epoch, seed in enumerate(SEEDS):
        batched.set_epoch(epoch)
        assert batched.view_seed == seed
        slab = read_slab(cache, seed)
        replay = ffcv_views(loader, slab.params)
        seen = set()
        for batch in dataset_batches(batched):
            rows = batch.indices.numpy()
            seen.update(rows.tolist())
            images = batch.images.numpy()
            bad = [int(i) for b, i in enumerate(rows) if not np.array_equal(images[b], replay[i])]
            assert not bad, f"seed {seed}: the dataset's views differ from the FFCV replay's for samples {bad[:10]}"
            assert torch.equal(batch.targets.indices, torch.from_numpy(slab.indices[rows].astype(np.int64)))
            assert torch.equal(batch.targets.logp, torch.from_numpy(slab.logp[rows]))
            assert torch.equal(batch.targets.log_tail, torch.from_numpy(slab.log_tail[rows]))
            o = layout.mix_offset
            assert np.array_equal(batch.partner.numpy(), rows + slab.params[rows, o + 1].astype(np.int64))
            assert np.array_equal(batch.lam.numpy(), slab.params[rows, o + 2])
            assert np.array_equal(batch.partner_labels.numpy(), split.labels[batch.partner.numpy()])
        assert seen == set(range(split.num_samples))
        per_item.set_view_seed(seed)   # mix="item": the partner rendered in __getitem__, any order
        for i in range(0, split.num_samples, 7):
            assert np.array_equal(per_item[i].image.numpy(), replay[i]), f"seed {seed}, sample {i} (mix='item')"
        modes |= set(slab.params[:, layout.mix_offset].astype(int).tolist())
    assert {MODE_MIXUP, MODE_CUTMIX} <= modes   # both kinds of mixed views were compared


def test_recipe_views_without_a_cache_equal_the_replay(a2):
    """No cache: the rows come from the recipe and the global seed, and set_epoch cycles the given seeds."""
    ds, cache_path = a2
    split = ds.split("train")
    recipe = ViewRecipe.from_dict(TeacherCache.open(cache_path).spec.recipe)
    dataset = ReplayDataset(ds.root, recipe=recipe, view_global_seed=11, view_seeds=[4, 9])
    dataset.set_epoch(3)
    n = split.num_samples
    params = view_params(recipe, 11, 9, np.arange(n), split.sizes[:, 0], split.sizes[:, 1], n)
    assert dataset.view_seed == 9 and np.array_equal(dataset.partners(),
                                                     np.arange(n) + params[:, dataset.layout.mix_offset + 1])
    loader = replay_loader(split, dataset.layout, recipe.size)
    replay = ffcv_views(loader, params)
    for batch in dataset_batches(dataset, batch_size=64):
        for image, i in zip(batch.images.numpy(), batch.indices.tolist()):
            assert np.array_equal(image, replay[i]), f"sample {i}"
    # another output size (progressive resizing): the erasing and cutmix boxes scaled as the replay scales them
    smaller = ReplayDataset(ds.root, recipe=recipe, view_global_seed=11, size=recipe.size * 3 // 4)
    smaller.set_view_seed(9)
    loader.set_size(smaller.size)
    try:
        replay = ffcv_views(loader, params)
    finally:
        loader.set_size(recipe.size)
    for batch in dataset_batches(smaller, batch_size=64):
        for image, i in zip(batch.images.numpy(), batch.indices.tolist()):
            assert np.array_equal(image, replay[i]), f"sample {i} at {smaller.size} px"


def test_workers_follow_the_epochs_seed(folder_ds, tmp_path):
    """Persistent DataLoader workers see set_epoch through shared memory: epoch 1's batches are seed 1's views."""
    recipe = ViewRecipe(size=48, aa="rand-m9-mstd0.5", mixup=1.0, mix_block=8)
    dataset = ReplayDataset(folder_ds.root, recipe=recipe)
    sampler = PairBatchSampler(dataset, 6, seed=1)
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=ReplayDataset.collate, num_workers=2,
                        persistent_workers=True)
    reference = ReplayDataset(folder_ds.root, recipe=recipe, mix="item")
    for epoch in (0, 1):
        sampler.set_epoch(epoch)   # moves the dataset's views on too (sync_dataset)
        reference.set_view_seed(epoch)
        for batch in loader:
            for image, i in zip(batch.images.numpy(), batch.indices.tolist()):
                assert np.array_equal(image, reference[i].image.numpy()), f"epoch {epoch}, sample {i}"


def test_pair_sampler_is_the_replays_order_and_splits_ranks_by_pairs(fmnist_small):
    split = fmnist_small.split("train")
    recipe = ViewRecipe(size=32, mixup=0.8, mix_block=16)
    dataset = ReplayDataset(fmnist_small.root, recipe=recipe)
    layout = ParamLayout.of(recipe)
    loader = ReplayLoader(split.beton_path, split.num_samples, 32, batch_size=16, workers=1, seed=7, layout=layout)
    loader.set_views(view_params(recipe, 0, 0, np.arange(split.num_samples), split.sizes[:, 0], split.sizes[:, 1],
                                 split.num_samples))
    for epoch in (0, 3):
        ours = PairBatchSampler(dataset, 16, seed=7, sync_dataset=False)
        ours.set_epoch(epoch)
        assert np.array_equal(ours.order(), loader.order.sample_order(epoch))
    partners = dataset.partners()
    shares = [list(PairBatchSampler(dataset, 8, seed=2, rank=r, world_size=2)) for r in (0, 1)]
    flat = [np.concatenate(s) for s in shares]
    assert len(flat[0]) == len(flat[1]) and not set(flat[0]) & set(flat[1])
    for share in shares:
        for batch in share:
            assert set(partners[batch]) <= set(batch)   # every pair whole, in one batch
    with pytest.raises(KdcacheError, match="even"):
        PairBatchSampler(dataset, 7)
    assert np.array_equal(paired_order(np.arange(5), 0, 0, shuffle=False), np.arange(5))


def test_collate_refuses_a_batch_without_the_partner(fmnist_small):
    dataset = ReplayDataset(fmnist_small.root, recipe=ViewRecipe(size=32, cutmix=1.0, mix_block=16))
    i = int(np.flatnonzero(dataset.partners() != np.arange(len(dataset)))[0])
    with pytest.raises(KdcacheError, match="partner .* is not in its batch"):
        collate_views([dataset[i]])


def test_centre_crop_dataset_equals_eval_loader(folder_ds):
    """Evaluation views (varied image sizes, some above the output size and some below)."""
    split = folder_ds.split("val")
    evaluation = CentreCropDataset(folder_ds.root, size=40)
    for images, _, idx in eval_loader(split.beton_path, 40, 64, workers=2):
        for image, i in zip(images.numpy(), idx.tolist()):
            assert np.array_equal(evaluation[i][0].numpy(), image), f"val sample {i}"


def test_bad_settings_are_named(fmnist_small, exact_cache):
    ds, cache_path = fmnist_small, exact_cache
    with pytest.raises(KdcacheError, match="recipe given with cache"):
        ReplayDataset(ds.root, cache_path, recipe=ViewRecipe(size=32))
    with pytest.raises(KdcacheError, match=r"seeds \[5\] are not complete"):
        ReplayDataset(ds.root, cache_path, view_seeds=[0, 5])
    with pytest.raises(KdcacheError, match="mix must be"):
        ReplayDataset(ds.root, mix="pairs")


EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "dataloader_loop.py"


@pytest.mark.parametrize("a2", ["fmnist_small"], indirect=True)
def test_dataloader_example_trains_a_student_from_the_cache(a2, capsys):
    """examples/dataloader_loop.py: --help lists its inputs; two epochs of six steps from the A2 cache (its two
    first seeds, mixed views) give finite, positive KD losses that go down."""
    ds, cache_path = a2
    main = runpy.run_path(str(EXAMPLE), run_name="example")["main"]
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    usage = capsys.readouterr().out
    for flag in ("--data", "--cache", "--model", "--epochs", "--batch-size", "--workers", "--lr"):
        assert flag in usage
    losses = main(["--data", str(ds.root), "--cache", str(cache_path), "--model", "resnet10t", "--epochs", "2",
                   "--batch-size", "32", "--workers", "2", "--lr", "0.05", "--max-steps", "6", "--device", "cpu"])
    printed = capsys.readouterr().out
    assert len(losses) == 12 and all(np.isfinite(losses)) and min(losses) > 0
    assert "epoch 0 step 0 seed 0" in printed and "epoch 1 step 5 seed 1" in printed
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3]), losses
