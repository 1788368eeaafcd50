"""label_reg.cache.CaseCache: hits skip the computation; settings or source changes recompute; no pickles."""
import os
import zipfile

import numpy as np
import pytest

from label_reg import cache as cache_mod
from label_reg.datasets import Pair


@pytest.fixture
def pair(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    paths = []
    for role in ("mi", "ml", "fi", "fl"):
        p = src / f"{role}.nii.gz"
        p.write_bytes(role.encode() * 10)
        paths.append(p)
    return Pair("obs000", *paths)


class Counter:
    def __init__(self):
        self.calls = 0

    def __call__(self, pair):
        self.calls += 1
        return {"image": np.arange(24, dtype=np.float32).reshape(2, 3, 4) * self.calls,
                "mask": np.ones((2, 3), bool),
                "geometry": {"size": [2, 3, 4], "spacing": (0.88, 0.88, 0.88), "name": pair.name},
                "k": 3}


def _npz_files(directory):
    return sorted(f for f in os.listdir(directory) if f.endswith(".npz")) if directory.exists() else []


def test_hit_does_not_recompute_and_round_trips(tmp_path, pair):
    fn = Counter()
    c = cache_mod.CaseCache(tmp_path / "cache", {"spacing": 0.88, "shape": [96, 96, 80]})
    first = c.get_or_compute(pair, fn)
    second = cache_mod.CaseCache(tmp_path / "cache", {"shape": [96, 96, 80], "spacing": 0.88}).get_or_compute(pair, fn)
    assert fn.calls == 1  # a new instance with the same settings (any key order) hits the same entry
    assert len(_npz_files(tmp_path / "cache")) == 1
    for result in (first, second):
        np.testing.assert_array_equal(result["image"], np.arange(24, dtype=np.float32).reshape(2, 3, 4))
        assert result["image"].dtype == np.float32 and result["mask"].dtype == bool
        assert result["geometry"] == {"size": [2, 3, 4], "spacing": [0.88, 0.88, 0.88], "name": "obs000"}
        assert result["k"] == 3
        assert set(result) == {"image", "mask", "geometry", "k"}
    # stored without pickles: loadable with allow_pickle=False, no object arrays
    (entry,) = _npz_files(tmp_path / "cache")
    with np.load(tmp_path / "cache" / entry, allow_pickle=False) as data:
        assert all(not data[n].dtype.hasobject for n in data.files)
    assert not [f for f in os.listdir(tmp_path / "cache") if f.startswith(".")]  # no temporaries left


def test_changed_settings_or_source_recomputes(tmp_path, pair):
    fn = Counter()
    c = cache_mod.CaseCache(tmp_path / "cache", {"spacing": 0.88})
    c.get_or_compute(pair, fn)
    assert fn.calls == 1
    cache_mod.CaseCache(tmp_path / "cache", {"spacing": 1.76}).get_or_compute(pair, fn)
    assert fn.calls == 2
    # same content, new mtime: content-keyed, still a hit
    os.utime(pair.fixed_label, (1, 1))
    c.get_or_compute(pair, fn)
    assert fn.calls == 2
    # changed content of any one source file: recompute, and the result is the new one
    for k, path in enumerate((pair.moving_image, pair.moving_label, pair.fixed_image, pair.fixed_label)):
        path.write_bytes(path.read_bytes() + b"changed")
        out = c.get_or_compute(pair, fn)
        assert fn.calls == 3 + k
        assert out["image"][0, 0, 1] == fn.calls
    assert len(_npz_files(tmp_path / "cache")) == 6


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty", "foreign_npz"])
def test_corrupt_entry_is_recomputed(tmp_path, pair, damage):
    fn = Counter()
    c = cache_mod.CaseCache(tmp_path / "cache", {"a": 1})
    c.get_or_compute(pair, fn)
    path = c.path_for(c.key(pair))
    assert path.exists()
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:100])
    elif damage == "garbage":
        path.write_bytes(b"\x00garbage" * 100)
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        with open(path, "wb") as f:
            np.savez(f, image=np.zeros(3))
    out = c.get_or_compute(pair, fn)
    assert fn.calls == 2
    np.testing.assert_array_equal(out["image"], np.arange(24, dtype=np.float32).reshape(2, 3, 4) * 2)
    assert zipfile.is_zipfile(path)
    c.get_or_compute(pair, fn)
    assert fn.calls == 2  # the rewritten entry is good again


def test_failed_compute_leaves_no_entry(tmp_path, pair):
    c = cache_mod.CaseCache(tmp_path / "cache", {"a": 1})

    def boom(p):
        raise RuntimeError("resampling failed")

    with pytest.raises(RuntimeError):
        c.get_or_compute(pair, boom)
    assert _npz_files(tmp_path / "cache") == []
    with pytest.raises(TypeError):
        c.get_or_compute(pair, lambda p: {"bad": np.array([object()], dtype=object)})
    assert _npz_files(tmp_path / "cache") == []


def test_settings_must_be_json():
    with pytest.raises(TypeError):
        cache_mod.CaseCache("unused", {"fn": print})
    assert cache_mod.canonical_json({"b": 1, "a": (1, 2)}) == cache_mod.canonical_json({"a": [1, 2], "b": 1})
