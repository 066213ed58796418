"""Checkpoints and weights files: loaded without running code, refused in one clear line."""

import json
import random
from dataclasses import asdict

import numpy as np
import pytest
import torch

from conftest import kdcache
from kdcache.errors import KdcacheError
from kdcache.student import checkpoint as ckpt
from kdcache.student.train import TrainConfig


class RunsCodeWhenUnpickled:
    """What a hostile last.pt in a shared run directory could hold: unpickling it calls exec."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('code ran')",)


def _run_dir(tmp_path, data):
    run = tmp_path / "run"
    run.mkdir()
    cfg = TrainConfig(data=str(data), out=str(run), model="resnet10t", epochs=2, mode="none", batch_size=64,
                      workers=1, progress=False)
    (run / "config.json").write_text(json.dumps(asdict(cfg)))
    return run


def test_a_checkpoint_that_would_run_code_is_refused_and_nothing_runs(fmnist_small, tmp_path):
    marker = tmp_path / "marker"
    path = tmp_path / "hostile.pt"
    torch.save({"model": {}, "epoch": 1, "payload": RunsCodeWhenUnpickled(marker)}, path)
    with pytest.raises(KdcacheError, match=r"hostile\.pt: refused: loading it would call exec \("):
        ckpt.load_last(path)
    assert not marker.exists()
    # the same through `train-student --resume` on a run directory someone else can write to
    run = _run_dir(tmp_path, fmnist_small.root)
    torch.save({"model": {}, "epoch": 1, "payload": RunsCodeWhenUnpickled(marker)}, run / "last.pt")
    proc = kdcache("train-student", "--resume", run, check=False)
    assert proc.returncode == 2 and not marker.exists()
    assert proc.stderr.strip().splitlines() == [f"kdcache: error: {run / 'last.pt'}: refused: loading it would call "
                                                "exec (checkpoints are read as tensors, numbers, strings, lists "
                                                "and dicts only)"]
    # and through a teacher's weights file (dump-teacher, online KD, verify)
    torch.save({"state_dict": {"fc.weight": RunsCodeWhenUnpickled(marker)}}, tmp_path / "teacher.pth")
    proc = kdcache("dump-teacher", "--data", fmnist_small.root, "--out", tmp_path / "cache", "--seeds", "0:1",
                   "--teacher", "resnet10t", "--teacher-checkpoint", tmp_path / "teacher.pth", check=False)
    assert proc.returncode == 2 and not marker.exists() and not (tmp_path / "cache").exists()
    assert proc.stderr.strip().splitlines() == [f"kdcache: error: {tmp_path / 'teacher.pth'}: refused: loading it "
                                                "would call builtins.exec (checkpoints are read as tensors, numbers, "
                                                "strings, lists and dicts only)"]


def test_last_checkpoint_round_trip_restores_every_rng(tmp_path):
    path = tmp_path / "last.pt"
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    np.random.normal()  # a cached Gaussian is part of NumPy's state too
    ckpt.save_last(path, model={"w": torch.arange(3.0)}, epoch=np.int64(2), best_top1=np.float64(51.5),
                   history=[{"top1": np.float32(51.5), "seed": 0}])
    expected = (random.random(), np.random.normal(), np.random.random(), torch.rand(2))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    state = ckpt.load_last(path)           # weights_only: plain tensors, numbers, strings, lists, dicts
    assert torch.equal(state["model"]["w"], torch.arange(3.0))
    assert state["epoch"] == 2 and state["best_top1"] == 51.5 and state["history"] == [{"top1": 51.5, "seed": 0}]
    ckpt.set_rng_state(state["rng"])
    got = (random.random(), np.random.normal(), np.random.random(), torch.rand(2))
    assert got[:3] == expected[:3] and torch.equal(got[3], expected[3])


def test_a_last_checkpoint_from_before_plain_rng_states_still_resumes(tmp_path):
    """last.pt files written before this change hold NumPy's state as an ndarray: NumPy arrays (no code)
    are allowed, so a run interrupted across the upgrade resumes."""
    path = tmp_path / "last.pt"
    np.random.seed(5)
    torch.save({"epoch": 1, "rng": {"python": random.getstate(), "numpy": np.random.get_state(),
                                    "torch": torch.get_rng_state()}}, path)
    expected = np.random.random()
    np.random.seed(0)
    ckpt.set_rng_state(ckpt.load_last(path)["rng"])
    assert np.random.random() == expected


def _shape_report(checkpoint_sd, model_sd):
    """What the one-line message must count, computed here from the two state dicts."""
    differ = [k for k in model_sd if k in checkpoint_sd and checkpoint_sd[k].shape != model_sd[k].shape]
    missing = [k for k in model_sd if k not in checkpoint_sd]
    unexpected = sorted(k for k in checkpoint_sd if k not in model_sd)
    first = differ[0]
    return (f"{len(differ)} tensors differ in shape, first {first} (checkpoint {list(checkpoint_sd[first].shape)} vs "
            f"model {list(model_sd[first].shape)}); {len(missing)} missing (first {missing[0]}), "
            f"{len(unexpected)} unexpected (first {unexpected[0]})")


def _one_error_line(proc):
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


def test_weights_of_another_architecture_are_named_in_one_line(fmnist_small, random_teacher, tmp_path):
    import timm
    _, _, weights = random_teacher                       # resnet10t weights
    resnet18 = timm.create_model("resnet18", num_classes=10).state_dict()
    resnet10t = random_teacher[0].state_dict()
    expected = f"checkpoint {weights} is for another architecture than resnet18: {_shape_report(resnet10t, resnet18)}"
    # dump-teacher and online KD: --teacher-checkpoint
    proc = kdcache("dump-teacher", "--data", fmnist_small.root, "--out", tmp_path / "cache", "--seeds", "0:1",
                   "--teacher", "resnet18", "--teacher-checkpoint", weights, "--no-progress", check=False)
    assert _one_error_line(proc) == f"kdcache: error: {expected}" and not (tmp_path / "cache").exists()
    proc = kdcache("train-student", "--data", fmnist_small.root, "--out", tmp_path / "online", "--model", "resnet10t",
                   "--epochs", 1, "--kd", "online", "--teacher", "resnet18", "--teacher-checkpoint", weights,
                   "--no-progress", check=False)
    assert _one_error_line(proc) == f"kdcache: error: {expected}"
    # train-student --resume: last.pt of a resnet10t in a run directory configured for resnet18
    run = _run_dir(tmp_path, fmnist_small.root)
    cfg = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps(dict(cfg, model="resnet18")))
    ckpt.save_last(run / "last.pt", model=resnet10t, epoch=1, step=6, best_top1=None, history=[])
    proc = kdcache("train-student", "--resume", run, check=False)
    assert _one_error_line(proc) == (f"kdcache: error: checkpoint {run / 'last.pt'} is for another architecture than "
                                     f"resnet18: {_shape_report(resnet10t, resnet18)}")
