"""Function matching from a cache: a dump with RandAugment, erasing and mixing verifies by replay; students
train from it with mixed hard labels; --mix-labels mixes cached distributions; baselines see the same views."""

import json

import numpy as np
import pytest
import torch

from conftest import dump_random_teacher, kdcache
from kdcache.augment import ParamLayout, ViewRecipe, view_params
from kdcache.cache.schema import TeacherCache
from kdcache.cache.slabs import read_slab
from kdcache.student.soft_labels import CachedTeacher, MixTargets, NoTeacher, mix_labels_recipe, repeat_subset

A2_FLAGS = ["--aa", "rand-m7-mstd0.5", "--mixup", 0.2, "--cutmix", 1.0, "--reprob", 0.25, "--mix-block", 32]
COMMON = ["--model", "test_resnet", "--batch-size", 64, "--no-progress", "--workers", 2]


@pytest.fixture(scope="module")
def a2_cache(fmnist_small, random_teacher, tmp_path_factory):
    return dump_random_teacher(fmnist_small.root, tmp_path_factory.mktemp("a2") / "cache", random_teacher[2], "0:2",
                               "--topk", 5, *A2_FLAGS)


def test_a2_dump_verifies_by_replay(a2_cache):
    """The issue's acceptance command: dump with A2 augmentation, then verify --replay 64 --json."""
    cache = TeacherCache.open(a2_cache)
    recipe = ViewRecipe.from_dict(cache.spec.recipe)
    assert recipe.aa == "rand-m7-mstd0.5" and recipe.mixing and recipe.reprob == 0.25
    assert cache.attrs["renderer"]["param_columns"] == ParamLayout.of(recipe).columns()
    report = json.loads(kdcache("verify", a2_cache, "--replay", 64, "--json").stdout)
    assert report["ok"] and report["replay"]["top1_agreement"] >= 0.999
    assert report["replay"]["replay_kl_mean"] <= 1e-4


def test_cached_params_are_the_recipes_views(a2_cache, fmnist_small):
    """The cache stores exactly view_params of its recipe, and the baselines' NoTeacher draws the same rows."""
    cache = TeacherCache.open(a2_cache)
    split = fmnist_small.split("train")
    recipe = ViewRecipe.from_dict(cache.spec.recipe)
    for s in (0, 1):
        stored = read_slab(cache, s).params
        n = split.num_samples
        assert np.array_equal(stored, view_params(recipe, cache.spec.global_seed, s, np.arange(n),
                                                  split.sizes[:, 0], split.sizes[:, 1], n))
        baseline = NoTeacher(recipe=recipe, global_seed=cache.spec.global_seed, view_seeds=[0, 1], sizes=split.sizes)
        assert np.array_equal(baseline.begin_pass(s, 0).params, stored)


def test_mixed_hard_target_is_timms_mixup_target(a2_cache, fmnist_small):
    from timm.data.mixup import mixup_target
    cache = TeacherCache.open(a2_cache)
    params = read_slab(cache, 0).params
    layout = ParamLayout.of(ViewRecipe.from_dict(cache.spec.recipe))
    mix = MixTargets(params, layout, torch.device("cpu"))
    labels = torch.from_numpy(fmnist_small.split("train").labels)
    o = layout.mix_offset
    rows = torch.from_numpy(np.flatnonzero(params[:, o] > 0)[:8])
    got = mix.hard_target(labels, rows, 10, smoothing=0.1)
    for r, i in enumerate(rows.tolist()):
        j = i + int(params[i, o + 1])
        pair = torch.tensor([labels[i], labels[j]])      # timm pairs sample b with sample B-1-b: (i, j) here
        want = mixup_target(pair, 10, lam=float(params[i, o + 2]), smoothing=0.1)[0]
        assert torch.allclose(got[r], want, atol=1e-6)
    assert not torch.allclose(got[0], torch.nn.functional.one_hot(labels[rows[0]], 10).float())


def test_mix_labels_target_is_the_lambda_mix_of_cached_distributions(exact_cache):
    cache = TeacherCache.open(exact_cache)
    recipe = mix_labels_recipe(ViewRecipe.from_dict(cache.spec.recipe), {"mixup": 0.8, "cutmix": 1.0, "mix_block": 16})
    src = CachedTeacher(cache, torch.device("cpu"), order_seed=0, epochs=1, mix_recipe=recipe)
    views = src.begin_pass(0, 0)
    layout = ParamLayout.of(recipe)
    slab = read_slab(cache, 0)
    assert np.array_equal(views.params[:, :5], slab.params)        # the cached views, plus mixing columns
    o = layout.mix_offset
    idx = np.flatnonzero(views.params[:, o] > 0)[:6]
    got = torch.softmax(src.logits(None, torch.from_numpy(idx)), 1)
    for r, i in enumerate(idx):
        j, lam = i + int(views.params[i, o + 1]), float(views.params[i, o + 2])
        p = np.zeros((2, 10))
        for q, k in enumerate((i, j)):
            p[q, slab.indices[k].astype(int)] = np.exp(slab.logp[k])
        want = lam * p[0] + (1 - lam) * p[1]
        assert np.allclose(got[r].numpy(), want, atol=1e-5)


def test_repeated_augmentation_passes(fmnist_small):
    split = fmnist_small.split("train")
    recipe = ViewRecipe(size=32, aug_repeats=3)
    src = NoTeacher(recipe=recipe, global_seed=0, view_seeds=list(range(30)), sizes=split.sizes, order_seed=1)
    passes = [src.begin_pass(2, r) for r in range(3)]
    assert [p.seeds for p in passes] == [6, 7, 8]                       # pass t = e·R + r
    assert all(np.array_equal(p.active, passes[0].active) for p in passes)
    n = split.num_samples
    assert n // 3 <= len(passes[0].active) < n // 3 + 2
    assert not np.array_equal(repeat_subset(n, 3, 1, 1, 2), repeat_subset(n, 3, 1, 1, 3))
    # three different views of every sample shown in the epoch
    a = passes[0].active
    assert all(not np.array_equal(passes[0].params[a], p.params[a]) for p in passes[1:])


def test_students_train_on_mixed_views(a2_cache, fmnist_small, tmp_path, random_teacher):
    data = fmnist_small.root
    kdcache("train-student", "--data", data, "--cache", a2_cache, "--epochs", 1, "--out", tmp_path / "fm",
            "--hard-loss", "bce", *COMMON)
    kdcache("train-student", "--data", data, "--kd", "online", "--teacher", "resnet10t", "--teacher-checkpoint",
            random_teacher[2], "--view-seeds", "0:2", "--epochs", 1, "--out", tmp_path / "online", *A2_FLAGS, *COMMON)
    for run in ("fm", "online"):
        summary = json.loads((tmp_path / run / "summary.json").read_text())
        assert summary["recipe"]["mixup"] == 0.2 and summary["steps"] == 6
        records = [json.loads(l) for l in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        assert all(np.isfinite(r["loss"]) for r in records if r["kind"] == "train")
    # a flag that contradicts the cache's recipe is refused by name; so is an odd batch with mixing
    proc = kdcache("train-student", "--data", data, "--cache", a2_cache, "--epochs", 1, "--out", tmp_path / "x",
                   "--cutmix", 0.5, *COMMON, check=False)
    assert proc.returncode == 2 and "--cutmix 0.5 contradicts the cache's recipe" in proc.stderr
    proc = kdcache("train-student", "--data", data, "--cache", a2_cache, "--epochs", 1, "--out", tmp_path / "y",
                   *COMMON[:2], "--batch-size", 63, check=False)
    assert proc.returncode == 2 and "even batch size" in proc.stderr


def test_verify_names_changed_render_libraries(a2_cache):
    from kdcache.augment.render import library_versions
    from kdcache.teacher.verify import render_report, renderer_comparison
    cache = TeacherCache.open(a2_cache)
    assert cache.attrs["renderer"]["libraries"] == library_versions()
    assert renderer_comparison(cache)["libraries_differ"] == {}

    class Older:
        attrs = {"renderer": {"version": 1, "libraries": dict(library_versions(), opencv="4.6.0")}}
    diff = renderer_comparison(Older())
    assert diff["libraries_differ"] == {"opencv": ["4.6.0", library_versions()["opencv"]]}
    report = {"cache": "c", "ok": True, "seeds": [0], "seeds_complete": [0], "problems": [],
              "replay": {"views": 1, "device": "cpu", "dump_precision": ["cpu/off"], "precision": "fp32",
                         "top1_agreement": 1.0, "replay_kl_mean": 0, "replay_kl_max": 0, "tail_mass_error_mean": 0,
                         "tail_mass_error_max": 0, "max_abs_logp_error": 0, "topk_kl_mean": 0, "topk_kl_max": 0,
                         "thresholds": {"min_agreement": 0.999, "max_kl": 1e-4, "max_tail_error": 1e-3},
                         "renderer": diff}}
    assert "opencv 4.6.0 -> " in render_report(report)
