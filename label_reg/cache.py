"""A disk cache of pre-processed cases, so training does not repeat SimpleITK work every epoch.

One ``.npz`` file per case, named by a SHA-256 key over the canonical JSON of the pre-processing
``settings`` and the content hashes of the pair's four source files: changing a setting or a source file
gives a new key, so stale entries are never read. Files are written atomically and loaded with
``allow_pickle=False``; a corrupt or unreadable entry is recomputed, never fatal.

``compute_fn(pair)`` returns a dict whose values are numpy arrays (numeric or bool; no object arrays) or
plain-JSON metadata (dict, list, str, int, float, bool, None). Metadata is stored as a JSON string in a 0-d
unicode array under ``"__json__<key>"`` and comes back as the same JSON value (tuples come back as lists).
Hits and misses return identical dicts.
"""
from __future__ import annotations

import hashlib
import json
import logging
import pathlib
import zipfile
from typing import Callable

import numpy as np

from label_reg.io import atomic_path

__all__ = ["CaseCache", "canonical_json", "file_sha256"]

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
_JSON_PREFIX = "__json__"
_META_KEY = "__cache__"


def canonical_json(value) -> str:
    """Deterministic JSON: sorted keys, no whitespace, no NaN. Paths become strings and numpy scalars and
    arrays become numbers and lists; anything else that JSON cannot hold raises TypeError."""

    def default(obj):
        if isinstance(obj, pathlib.PurePath):
            return str(obj)
        if isinstance(obj, np.generic):
            return obj.item()
        if isinstance(obj, np.ndarray):
            return obj.tolist()
        raise TypeError(f"cache settings hold a value JSON cannot represent: {obj!r}")

    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False,
                      default=default)


def file_sha256(path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


class CaseCache:
    """``CaseCache(cache_dir, settings).get_or_compute(pair, compute_fn)``."""

    def __init__(self, cache_dir, settings: dict):
        self.cache_dir = pathlib.Path(cache_dir)
        self.settings = settings
        self._settings_json = canonical_json(settings)  # fails early on settings JSON cannot hold

    # -- keys ------------------------------------------------------------------------------------------------
    def key(self, pair) -> str:
        """SHA-256 hex over the settings and the content of the pair's source files."""
        files = {role: (None if path is None else file_sha256(path)) for role, path in _pair_files(pair).items()}
        payload = canonical_json({"format": FORMAT_VERSION, "settings": json.loads(self._settings_json),
                                  "files": files})
        return hashlib.sha256(payload.encode("ascii")).hexdigest()

    def path_for(self, key: str) -> pathlib.Path:
        return self.cache_dir / f"{key}.npz"

    # -- main entry ------------------------------------------------------------------------------------------
    def get_or_compute(self, pair, compute_fn: Callable) -> dict:
        key = self.key(pair)
        path = self.path_for(key)
        if path.exists():
            try:
                return _load(path, key)
            except Exception as err:  # corrupt, truncated, foreign or stale file: recompute it
                log.warning("cache entry %s for case %s is unreadable (%s); recomputing", path,
                            getattr(pair, "name", "?"), err)
        result = compute_fn(pair)
        arrays = _encode(result)
        arrays[_META_KEY] = np.array(canonical_json({"format": FORMAT_VERSION, "key": key,
                                                     "case": getattr(pair, "name", None)}))
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)
        return _decode(arrays)


def _pair_files(pair) -> dict:
    if hasattr(pair, "files"):
        return pair.files()
    return {role: getattr(pair, role) for role in ("moving_image", "moving_label", "fixed_image", "fixed_label")}


def _encode(result) -> dict:
    if not isinstance(result, dict):
        raise TypeError(f"compute_fn must return a dict, got {type(result).__name__}")
    arrays = {}
    for name, value in result.items():
        if not isinstance(name, str) or not name or name.startswith("__"):
            raise ValueError(f"cache entry names must be non-empty strings not starting with '__', got {name!r}")
        if isinstance(value, (np.ndarray, np.generic)):
            arr = np.asarray(value)
            if arr.dtype.hasobject:
                raise TypeError(f"cache entry '{name}' is an object array; only plain numeric arrays are stored")
            arrays[name] = arr
        else:
            arrays[_JSON_PREFIX + name] = np.array(canonical_json(value))
    return arrays


def _decode(arrays: dict) -> dict:
    out = {}
    for name, arr in arrays.items():
        if name == _META_KEY:
            continue
        if name.startswith(_JSON_PREFIX):
            out[name[len(_JSON_PREFIX):]] = json.loads(str(arr[()]))
        else:
            out[name] = arr
    return out


def _load(path: pathlib.Path, key: str) -> dict:
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {name: data[name] for name in data.files}
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, KeyError) as err:
        raise ValueError(f"cannot load: {err}") from None
    if _META_KEY not in arrays:
        raise ValueError("no cache metadata")
    meta = json.loads(str(arrays[_META_KEY][()]))
    if meta.get("format") != FORMAT_VERSION or meta.get("key") != key:
        raise ValueError("cache metadata does not match the key")
    return _decode(arrays)
