"""Everything a cache holds besides its shard bytes is read as untrusted input: unit markers, the root
identity, array metadata, names that become paths, symbolic links. Each case is named (path, what is
wrong, what to do) by verify, train-student, copy and ls, and nothing is written outside a destination."""

import json
import shutil
from pathlib import Path

import pytest

from conftest import dump_random_teacher, kdcache, reseal_markers

COMMON_TRAIN = ["--model", "resnet10t", "--batch-size", 64, "--lr", 0.05, "--no-progress", "--workers", 2]
MARKER = "units/000001/000001.json"


@pytest.fixture(scope="module")
def pristine(fmnist_small, random_teacher, tmp_path_factory):
    """A small sealed cache (seeds 0:2, k = 5, units of 128 samples): each test damages its own copy."""
    return dump_random_teacher(fmnist_small.root, tmp_path_factory.mktemp("pristine") / "cache", random_teacher[2],
                               "0:2", "--topk", 5)


@pytest.fixture
def cache(pristine, tmp_path):
    out = tmp_path / "cache"
    shutil.copytree(pristine, out)
    return out


def _train(data, cache, out, *extra):
    return kdcache("train-student", "--data", data, "--epochs", 1, "--out", out, "--cache", cache, *COMMON_TRAIN,
                   *extra, check=False)


def _all_commands_refuse(fmnist_small, cache, tmp_path, *expected):
    """verify, train-student, copy and ls each exit non-zero and name every expected fragment."""
    root = tmp_path / "root"
    root.mkdir()
    (root / "c").symlink_to(cache)
    results = {
        "verify": kdcache("verify", cache, check=False),
        "train": _train(fmnist_small.root, cache, tmp_path / "run"),
        "copy": kdcache("copy", cache, tmp_path / "copied", "--no-progress", check=False),
        "ls": kdcache("ls", root, check=False),
    }
    for name, r in results.items():
        text = r.stdout + r.stderr
        assert r.returncode != 0, f"{name} accepted it:\n{text}"
        for fragment in expected:
            assert fragment in text, f"{name} does not say {fragment!r}:\n{text}"
    return results


def test_a_marker_with_a_flipped_byte_is_named(fmnist_small, cache, tmp_path):
    path = cache / MARKER
    data = path.read_bytes()
    path.write_bytes(b"z" + data[1:])                    # '{' -> 'z': not JSON any more
    _all_commands_refuse(fmnist_small, cache, tmp_path, MARKER, "not valid JSON")


def test_a_marker_that_lost_its_checksums_is_named(fmnist_small, cache, tmp_path):
    """`objects` -> `objets`: the marker is valid JSON but would vouch for nothing; with 32 bytes of the logp
    shard behind it overwritten too, nothing may train on it."""
    path = cache / MARKER
    path.write_text(path.read_text().replace('"objects"', '"objets"'))
    shard = next(p for p in sorted((cache / "seeds/000001/logp").rglob("*")) if p.is_file() and p.name != "zarr.json")
    raw = bytearray(shard.read_bytes())
    raw[40:72] = bytes(32)
    shard.write_bytes(bytes(raw))
    _all_commands_refuse(fmnist_small, cache, tmp_path, MARKER, "does not match its own checksum")


def test_an_edited_marker_is_named_even_when_it_stays_valid_json(fmnist_small, cache, tmp_path):
    path = cache / MARKER
    marker = json.loads(path.read_text())
    marker["objects"]["logp"]["crc32c"] = "00000000"     # a forger who knows the format but not the seal
    path.write_text(json.dumps(marker))
    _all_commands_refuse(fmnist_small, cache, tmp_path, MARKER, "does not match its own checksum")


def test_a_marker_from_another_cache_is_named(fmnist_small, random_teacher, cache, tmp_path):
    other = dump_random_teacher(fmnist_small.root, tmp_path / "other", random_teacher[2], "1:2", "--topk", 4)
    shutil.copy(other / MARKER, cache / MARKER)
    _all_commands_refuse(fmnist_small, cache, tmp_path, MARKER, "belongs to another cache")


def test_an_edited_root_identity_is_named(fmnist_small, cache, tmp_path):
    root = json.loads((cache / "zarr.json").read_text())
    assert root["attributes"]["spec"]["topk"] == 5
    root["attributes"]["spec"]["topk"] = 7
    (cache / "zarr.json").write_text(json.dumps(root, indent=2))
    for r in _all_commands_refuse(fmnist_small, cache, tmp_path, "zarr.json", "identity_sha256").values():
        assert "edited or damaged" in r.stdout + r.stderr
    assert kdcache("info", cache, check=False).returncode == 2


def test_a_root_identity_that_disagrees_with_the_arrays_is_named_without_its_hash(fmnist_small, cache, tmp_path):
    """A cache made before roots carried a hash (or one whose hash was removed with the edit): the arrays'
    own shapes still contradict the edited k."""
    root = json.loads((cache / "zarr.json").read_text())
    del root["attributes"]["identity_sha256"]
    root["attributes"]["spec"]["topk"] = 7
    (cache / "zarr.json").write_text(json.dumps(root, indent=2))
    _all_commands_refuse(fmnist_small, cache, tmp_path, "seeds/000000/logp/zarr.json", "top-7",
                         "one of the two documents was changed")


@pytest.mark.parametrize("edit", [lambda t: t.replace('"uint16"', '"uint17"'), lambda t: t[:10] + "#" + t[11:]],
                         ids=["dtype", "syntax"])
def test_damaged_array_metadata_is_named_not_a_missing_seed(fmnist_small, cache, tmp_path, edit):
    doc = cache / "seeds/000001/logp/zarr.json"
    doc.write_text(edit(doc.read_text()))
    results = _all_commands_refuse(fmnist_small, cache, tmp_path, "seeds/000001/logp/zarr.json",
                                   "array metadata cannot be read")
    assert all("is not in this cache" not in r.stderr for r in results.values())


def test_a_target_kind_from_a_newer_kdcache_is_named_as_such(fmnist_small, cache, tmp_path):
    """A cache whose targets are a kind added after this kdcache (sealed as its writer would seal it): every command
    refuses it as a newer writer's, naming the kind and the writer's version, not as a damaged document."""
    from kdcache.cache.marker import IDENTITY_HASH, identity_hash
    root = json.loads((cache / "zarr.json").read_text())
    root["attributes"]["spec"]["targets"] = "sampled-future"
    root["attributes"]["kdcache_version"] = "9.9.0"
    root["attributes"][IDENTITY_HASH] = identity_hash(root["attributes"])
    (cache / "zarr.json").write_text(json.dumps(root, indent=2))
    for r in _all_commands_refuse(fmnist_small, cache, tmp_path, "'sampled-future'", "made by kdcache 9.9.0").values():
        assert "restore it from a copy" not in r.stderr


def test_ls_names_a_cache_whose_root_document_is_unreadable(pristine, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(pristine, root / "good")
    shutil.copytree(pristine, root / "bad")
    (root / "bad/zarr.json").write_text("{ not json")
    r = kdcache("ls", root, check=False)
    assert r.returncode == 1
    assert "good" in r.stdout and "UNREADABLE" in r.stdout and str(root / "bad") in r.stderr
    listing = json.loads(kdcache("ls", root, "--json", check=False).stdout)
    assert [c["id"] for c in listing["caches"]] == ["good"] and [u["id"] for u in listing["unreadable"]] == ["bad"]


def test_an_intact_cache_passes_everything(fmnist_small, cache, tmp_path):
    """The other side of each test above: the same commands on the undamaged copy succeed."""
    assert kdcache("verify", cache).returncode == 0
    assert _train(fmnist_small.root, cache, tmp_path / "run").returncode == 0
    copied = kdcache("copy", cache, tmp_path / "copied", "--no-progress")
    assert copied.returncode == 0 and kdcache("verify", tmp_path / "copied").returncode == 0
    root = tmp_path / "root"
    root.mkdir()
    (root / "c").symlink_to(cache)
    assert kdcache("ls", root).returncode == 0


# ---- nothing is read or written outside where it belongs ------------------------------------------
@pytest.mark.parametrize("field,value", [("dataset.split", "/../../../../x"), ("teacher.name", "../../../x"),
                                         ("dataset.split", ".."), ("teacher.name", "")])
def test_copy_into_a_root_never_writes_outside_it(pristine, tmp_path, field, value):
    """A published cache whose identity names paths: its id is one plain directory name in the root."""
    src = tmp_path / "deep/er/src"
    shutil.copytree(pristine, src)
    root_doc = json.loads((src / "zarr.json").read_text())
    table, key = field.split(".")
    root_doc["attributes"]["spec"][table][key] = value
    from kdcache.cache.marker import IDENTITY_HASH, identity_hash
    root_doc["attributes"][IDENTITY_HASH] = identity_hash(root_doc["attributes"])   # published that way
    (src / "zarr.json").write_text(json.dumps(root_doc))
    reseal_markers(src)
    dest = tmp_path / "deep/er/dest"
    dest.mkdir()
    before = {p for p in tmp_path.rglob("*") if not str(p).startswith(str(dest))}
    r = kdcache("copy", src, dest, "--root", "--no-progress", check=False)
    assert r.returncode == 0, r.stderr
    after = {p for p in tmp_path.rglob("*") if not str(p).startswith(str(dest))}
    assert after == before, f"written outside {dest}: {sorted(after - before)[:5]}"
    (copied,) = dest.iterdir()
    assert ".." not in copied.name and "/" not in copied.name and not copied.name.startswith(".")


def test_copy_does_not_follow_a_symlink_out_of_the_source(pristine, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(pristine, src)
    secret = tmp_path / "secret.json"
    secret.write_text('{"zarr_format": 3, "node_type": "group", "attributes": {"secret": "outside the cache"}}')
    (src / "seeds/zarr.json").unlink()
    (src / "seeds/zarr.json").symlink_to(secret)
    r = kdcache("copy", src, tmp_path / "dst", "--no-progress", check=False)
    assert r.returncode != 0 and "symbolic link" in r.stderr and "seeds/zarr.json" in r.stderr
    published = [p for p in (tmp_path / "dst").rglob("*") if p.is_file() and "outside the cache" in p.read_text(errors="replace")]
    assert not published


def test_dump_into_a_dangling_symlink_is_one_clear_line(fmnist_small, random_teacher, tmp_path):
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "nowhere" / "cache")
    r = kdcache("dump-teacher", "--data", fmnist_small.root, "--out", link, "--seeds", "0:1", "--teacher", "resnet10t",
                "--teacher-checkpoint", random_teacher[2], "--no-progress", check=False)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert str(link) in r.stderr and "symbolic link" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_a_key_or_id_with_a_separator_is_refused():
    from kdcache.cache.location import Location
    from kdcache.errors import KdcacheError
    loc = Location.of("/tmp/somewhere")
    for bad in ("..", "a/b", "", ".", "a\\b"):
        with pytest.raises(KdcacheError, match="not a plain file name"):
            loc.child(bad)
    with pytest.raises(KdcacheError, match="not a plain file name"):
        loc.read("units/../../etc/passwd")
