"""kdcache.files: the one local writer (replace, exclusive create, nothing left behind on an error)."""

import pytest

from kdcache.files import atomic_file, atomic_write


def _names(folder):
    return sorted(p.name for p in folder.iterdir())


def test_atomic_write_replaces_the_whole_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "config.json"
    atomic_write(path, "first")
    atomic_write(path, b"second \xff")
    assert path.read_bytes() == b"second \xff" and _names(tmp_path) == ["config.json"]


def test_an_error_while_writing_keeps_the_old_file(tmp_path):
    path = tmp_path / "last.pt"
    atomic_write(path, "old")
    with pytest.raises(RuntimeError):
        with atomic_file(path) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed mid-write")
    assert path.read_text() == "old" and _names(tmp_path) == ["last.pt"]


def test_exclusive_create_fails_when_the_file_exists(tmp_path):
    path = tmp_path / "claim"
    atomic_write(path, "mine", exclusive=True)
    with pytest.raises(FileExistsError):
        atomic_write(path, "theirs", exclusive=True)
    assert path.read_text() == "mine" and _names(tmp_path) == ["claim"]


def test_location_create_is_exclusive_and_write_replaces(tmp_path):
    from kdcache.cache.location import Location
    loc = Location.of(tmp_path)
    assert loc.create("units/a.json", b"1") and not loc.create("units/a.json", b"2")
    assert loc.read("units/a.json") == b"1"
    loc.write("units/a.json", b"3")
    assert loc.read("units/a.json") == b"3" and loc.list() == ["units/a.json"]
    assert _names(tmp_path / "units") == ["a.json"]


def test_location_is_an_abstract_base():
    from kdcache.cache.location import FsspecLocation, LocalLocation, Location
    with pytest.raises(TypeError):
        Location()
    assert issubclass(LocalLocation, Location) and issubclass(FsspecLocation, Location)
    assert Location.of("memory://x/y").supports_exclusive_create is False
    assert Location.of("/tmp/x").supports_exclusive_create is True
