"""Many writers, one cache: concurrent dumps (separate launches and ranks of one launch), a writer that
stops while holding claims, a student reading while a writer extends, a full disk."""

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from conftest import kdcache
from test_dump import assert_close_caches, read_all

ENV = dict(os.environ, OMP_NUM_THREADS="1")  # one summation order in every process
# a tiny teacher over the 400-sample Fashion-MNIST: 4 units per seed; what is tested is who writes what
DUMP = ["--teacher", "test_resnet", "--random-teacher", "--topk", "5", "--unit-size", "128", "--no-progress"]


def dump_cmd(data, out, seeds, *extra):
    return [sys.executable, "-m", "kdcache", "dump-teacher", "--data", str(data), "--out", str(out),
            "--seeds", seeds, *DUMP, *map(str, extra)]


def _start(cmd, log: Path):
    with log.open("w") as err:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=ENV)


def _units_computed(out: Path) -> Counter:
    """(seed, block) -> how many runs computed and wrote it, from every process's dump log."""
    count = Counter()
    for log in (out / "logs").glob("*.json"):
        for u in json.loads(log.read_text())["units"]:
            for s in u["seeds"]:
                count[(s, u["block"])] += 1
    return count


@pytest.fixture(scope="module")
def clean6(fmnist_small, tmp_path_factory):
    out = tmp_path_factory.mktemp("clean6") / "cache"
    kdcache(*dump_cmd(fmnist_small.root, out, "0:6")[3:])  # in this process: other thread counts stay within
    return read_all(out)                                   # assert_close_caches's tolerance


def test_concurrent_writers_lose_nothing_and_compute_no_unit_twice(fmnist_small, clean6, tmp_path):
    """Reproduced defect: dumps of seeds 0:3 and 3:6 started together both exited 0, but the root attributes
    listed only seeds 0-2; identical dumps started together exited 1 instead of helping. Here: four
    processes, two separate launches with overlapping seed ranges and the two ranks of a torchrun over all
    seeds, all at once, into a cache none of them has created yet."""
    out = tmp_path / "shared"
    cmds = [dump_cmd(fmnist_small.root, out, "0:4"), dump_cmd(fmnist_small.root, out, "2:6"),
            [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", "-m",
             "kdcache", *dump_cmd(fmnist_small.root, out, "1:5")[3:]]]
    procs = [_start(c, tmp_path / f"p{i}.log") for i, c in enumerate(cmds)]
    for i, p in enumerate(procs):
        p.wait(timeout=600)
        assert p.returncode == 0, (tmp_path / f"p{i}.log").read_text()[-3000:]
    computed = _units_computed(out)
    assert sorted(computed) == [(s, b) for s in range(6) for b in range(4)]
    assert set(computed.values()) == {1}, {u: n for u, n in computed.items() if n > 1}
    listed = json.loads(kdcache("ls", tmp_path, "--json").stdout)["caches"]
    assert [c["seeds_complete"] for c in listed] == [[0, 1, 2, 3, 4, 5]]
    assert_close_caches(clean6, read_all(out))
    assert json.loads(kdcache("verify", out, "--json").stdout)["ok"]


def _all_threads_stopped(pid: int) -> bool:
    states = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            states.append((task / "stat").read_text().rsplit(")", 1)[1].split()[0])
        except FileNotFoundError:
            continue  # a thread that ended meanwhile
    return all(state in "tT" for state in states)


def test_a_stopped_writer_is_taken_over_once_its_heartbeat_stops(fmnist_small, clean6, tmp_path):
    out = tmp_path / "cache"
    cmd = dump_cmd(fmnist_small.root, out, "0:6", "--claim-ttl", 2, "--batch-size", 16)
    first = _start(cmd, tmp_path / "first.log")
    deadline = time.time() + 300
    while not (out / "claims").is_dir() or not any((out / "claims").rglob("*.json")):
        assert first.poll() is None and time.time() < deadline, (tmp_path / "first.log").read_text()[-3000:]
        time.sleep(0.005)
    first.send_signal(signal.SIGSTOP)   # alive (its pid exists) but silent: only the heartbeat can tell
    try:
        # kill(2) returns before a thread running on the other core has stopped: wait until every thread
        # is in state T, or a claim created meanwhile escapes the snapshot below (seen once in CI)
        while not _all_threads_stopped(first.pid):
            time.sleep(0.001)
        # what the stopped writer holds unfinished: its claims on units without a marker (claims and
        # markers are created whole, and nothing else writes while it is stopped)
        claims = {(int(p.parent.parent.name), int(p.parent.name)): json.loads(p.read_text())
                  for p in (out / "claims").rglob("*.json")}
        held = {u for u in claims if not (out / "units" / f"{u[0]:06d}" / f"{u[1]:06d}.json").exists()}
        assert held, "the first writer was stopped holding no unfinished unit"
        [first_run] = {claims[u]["run"] for u in held}
        second = _start(cmd, tmp_path / "second.log")
        second.wait(timeout=600)
        assert second.returncode == 0, (tmp_path / "second.log").read_text()[-3000:]
    finally:
        first.send_signal(signal.SIGCONT)
    first.wait(timeout=300)
    assert first.returncode == 0, (tmp_path / "first.log").read_text()[-3000:]
    wrote = {(int(p.parent.name), int(p.stem)): json.loads(p.read_text())["run"]  # who finished each unit
             for p in (out / "units").glob("*/*.json")}
    [second_run] = {json.loads(p.read_text())["run"] for p in (out / "logs").glob("*.json")} - {first_run}
    assert set(wrote) == {(s, b) for s in range(6) for b in range(4)}
    assert {u: wrote[u] for u in held} == {u: second_run for u in held}, \
        "the second writer took over what the first held"
    [first_log] = [log for log in map(json.loads, map(Path.read_text, (out / "logs").glob("*.json")))
                   if log["run"] == first_run]
    lost = {(u["seed"], u["block"]) for u in first_log["lost"]}
    rendered = {(s, u["block"]) for u in first_log["units"] for s in u["seeds"]}  # a pass's units, lost ones too
    assert lost <= held and not (rendered - lost) & held, "resumed, the first writer wrote none of what it lost"
    assert_close_caches(clean6, read_all(out))
    assert json.loads(kdcache("verify", out, "--json").stdout)["ok"]
    assert not any((out / "claims").rglob("*.json")), "no claim is left behind"


# dump-teacher with a handshake around its unit markers: after its first marker it writes a byte to fd
# WROTE; before its LAST-th marker it blocks reading fd GO (a byte, or EOF if the test is gone)
HELD_DUMP = """
import os, runpy, sys
from kdcache.cache.ledger import Ledger
wrote, go, last = map(int, sys.argv[1:4])
sys.argv = ["kdcache", *sys.argv[4:]]
real, marked = Ledger.mark_done, []
def mark_done(self, *args, **kw):
    if len(marked) == last - 1:
        os.read(go, 1)
    made = real(self, *args, **kw)
    marked.append(args)
    if len(marked) == 1:
        os.write(wrote, b"1")
    return made
Ledger.mark_done = mark_done
runpy.run_module("kdcache", run_name="__main__")
"""


def test_a_student_trains_while_a_writer_extends_the_cache(fmnist_small, clean6, tmp_path):
    """The two provably overlap: the student starts after the writer has marked a unit of the new seeds,
    and the writer marks its last unit only after the student has finished (pipes, not timing)."""
    out = tmp_path / "cache"
    kdcache(*dump_cmd(fmnist_small.root, out, "0:2")[3:])
    wrote_r, wrote_w = os.pipe()
    go_r, go_w = os.pipe()
    log = tmp_path / "writer.log"
    with log.open("w") as err:
        writer = subprocess.Popen([sys.executable, "-c", HELD_DUMP, str(wrote_w), str(go_r), str(4 * 4),
                                   *dump_cmd(fmnist_small.root, out, "2:6")[3:]], pass_fds=(wrote_w, go_r),
                                  stdout=subprocess.DEVNULL, stderr=err, env=ENV)
    os.close(wrote_w)
    os.close(go_r)
    try:
        first = os.read(wrote_r, 1)  # b"" (EOF): the writer ended before marking any unit
        assert first == b"1", f"exit {writer.wait(timeout=600)}: {log.read_text()[-3000:]}"
        kdcache("train-student", "--data", fmnist_small.root, "--model", "test_resnet", "--epochs", 2,
                "--batch-size", 64, "--workers", 2, "--no-progress", "--cache", out, "--view-seeds", "0:2",
                "--out", tmp_path / "student")
        assert writer.poll() is None and len(list((out / "units").glob("*/*.json"))) == 2 * 4 + 15, \
            "the writer is held before its last unit"
        os.write(go_w, b"1")
        assert writer.wait(timeout=600) == 0, log.read_text()[-3000:]
    finally:
        os.close(go_w)
        os.close(wrote_r)
        if writer.poll() is None:
            writer.kill()
            writer.wait()
    assert json.loads((tmp_path / "student" / "summary.json").read_text())["epochs"] == 2
    assert_close_caches(clean6, read_all(out))


def test_a_full_disk_is_one_clear_line_and_the_rerun_completes(fmnist_small, tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    try:
        mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=160k", "tmpfs", str(mnt)], capture_output=True,
                               text=True)
    except OSError as exc:  # no mount program at all
        pytest.skip(f"a small tmpfs is needed and `mount` could not be run: {exc}")
    if mount.returncode:
        why = (mount.stderr or mount.stdout).strip() or "no message"
        pytest.skip(f"a small tmpfs is needed (root and mount(2)); `mount -t tmpfs` exited {mount.returncode}: {why}")
    try:
        args = ["dump-teacher", "--data", fmnist_small.root, "--seeds", "0:6", "--teacher", "test_resnet",
                "--random-teacher", "--unit-size", 128, "--topk", 5, "--no-progress"]
        proc = kdcache(*args, "--out", mnt / "cache", check=False)
        assert proc.returncode == 2, proc.stderr
        [line] = proc.stderr.strip().splitlines()
        assert line.startswith(f"kdcache: error: {mnt / 'cache'}: no space left on the device") and "free space" in line
        assert not any((mnt / "cache" / "claims").rglob("*.json")), "the failed run's claims are released"
        subprocess.run(["mount", "-o", "remount,size=8m", str(mnt)], check=True)
        kdcache(*args, "--out", mnt / "cache")
        kdcache(*args, "--out", tmp_path / "clean")
        assert_close_caches(read_all(tmp_path / "clean"), read_all(mnt / "cache"))
        assert json.loads(kdcache("verify", mnt / "cache", "--json").stdout)["ok"]
    finally:
        subprocess.run(["umount", str(mnt)])
