"""Dataset discovery and splits.

Layout of a data directory (the same as the demo data and the synthetic phantoms)::

    root/moving_images/<name>.nii.gz   MR
    root/moving_labels/<name>.nii.gz   MR labels (channel 0 gland, 1.. landmarks)
    root/fixed_images/<name>.nii.gz    TRUS
    root/fixed_labels/<name>.nii.gz    TRUS labels

The same file name in all four folders is one MR-TRUS pair. Files may be ``.nii.gz`` or ``.nii``; hidden files
(e.g. temporary files of an interrupted atomic write) and other files are ignored.
"""
from __future__ import annotations

import dataclasses
import pathlib
from typing import Iterable, Optional, Sequence

import numpy as np
import pandas as pd

from label_reg.errors import InputError

__all__ = ["Pair", "FOLDERS", "discover_pairs", "kfold_split", "read_case_list", "select_split", "select_pairs",
           "case_name"]

MOVING_IMAGES, MOVING_LABELS, FIXED_IMAGES, FIXED_LABELS = "moving_images", "moving_labels", "fixed_images", "fixed_labels"
FOLDERS = (MOVING_IMAGES, MOVING_LABELS, FIXED_IMAGES, FIXED_LABELS)
_EXTENSIONS = (".nii.gz", ".nii")


@dataclasses.dataclass(frozen=True)
class Pair:
    """One MR-TRUS case. Label paths are None only when discovered with ``require_labels=False`` and the label
    folders are absent."""

    name: str
    moving_image: pathlib.Path
    moving_label: Optional[pathlib.Path]
    fixed_image: pathlib.Path
    fixed_label: Optional[pathlib.Path]

    def files(self) -> dict:
        """{field name: path or None} for the four source files."""
        return {"moving_image": self.moving_image, "moving_label": self.moving_label,
                "fixed_image": self.fixed_image, "fixed_label": self.fixed_label}


def case_name(filename: str) -> Optional[str]:
    """The case name of a NIfTI file name (``obs000.nii.gz`` -> ``obs000``), or None if not NIfTI."""
    low = filename.lower()
    for ext in _EXTENSIONS:
        if low.endswith(ext) and len(filename) > len(ext):
            return filename[:-len(ext)]
    return None


def _scan_folder(folder: pathlib.Path) -> dict:
    """{case name: path} of the NIfTI files in one folder."""
    found = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or not path.is_file():
            continue
        name = case_name(path.name)
        if name is None:
            continue
        if name in found:
            raise InputError(folder, f"two files for case '{name}': {found[name].name} and {path.name}")
        found[name] = path
    return found


def discover_pairs(root, require_labels: bool = True) -> list[Pair]:
    """All pairs under ``root``, sorted by name.

    Raises InputError when ``root`` or a folder is missing (label folders may be absent if
    ``require_labels`` is False), when there are no pairs, or when a file has no partner in another folder.
    """
    root = pathlib.Path(root)
    if not root.is_dir():
        raise InputError(root, "data directory not found")
    scanned = {}
    for folder in FOLDERS:
        path = root / folder
        if not path.is_dir():
            if folder in (MOVING_LABELS, FIXED_LABELS) and not require_labels:
                continue
            raise InputError(path, f"folder not found (a data directory holds {', '.join(f + '/' for f in FOLDERS)})")
        scanned[folder] = _scan_folder(path)

    all_names = sorted(set().union(*(set(files) for files in scanned.values())))
    if not all_names:
        raise InputError(root, f"no NIfTI files ({' or '.join(_EXTENSIONS)}) found in {', '.join(scanned)}")
    unpaired = []
    for name in all_names:
        missing = [folder for folder in scanned if name not in scanned[folder]]
        if missing:
            present = next(folder for folder in scanned if name in scanned[folder])
            unpaired.append((scanned[present][name], missing))
    if unpaired:
        path, missing = unpaired[0]
        more = f" ({len(unpaired) - 1} more unpaired case(s))" if len(unpaired) > 1 else ""
        raise InputError(path, f"{path.name} has no partner in {', '.join(m + '/' for m in missing)}{more}")

    def get(folder, name):
        return scanned[folder][name] if folder in scanned else None

    return [Pair(name, get(MOVING_IMAGES, name), get(MOVING_LABELS, name), get(FIXED_IMAGES, name),
                 get(FIXED_LABELS, name)) for name in all_names]


def kfold_split(names: Iterable[str], num_folds: int = 5, fold: int = 0, seed: int = 0) -> tuple[list, list]:
    """(train_names, val_names) of fold ``fold`` of ``num_folds``.

    Deterministic: the sorted names are shuffled with ``numpy.random.default_rng(seed)`` and cut into
    ``num_folds`` contiguous folds whose sizes differ by at most one. The validation folds are disjoint and
    together hold every name. Both returned lists are sorted.
    """
    names = sorted(names)
    if len(set(names)) != len(names):
        raise InputError("names", "case names are not unique")
    if isinstance(num_folds, bool) or not isinstance(num_folds, (int, np.integer)) or num_folds < 2:
        raise InputError("num_folds", f"must be an integer >= 2, got {num_folds!r}")
    if num_folds > len(names):
        raise InputError("num_folds", f"{num_folds} folds need at least {num_folds} cases, got {len(names)}")
    if isinstance(fold, bool) or not isinstance(fold, (int, np.integer)) or not 0 <= fold < num_folds:
        raise InputError("fold", f"must be an integer in 0..{num_folds - 1}, got {fold!r}")
    order = np.random.default_rng(seed).permutation(len(names))
    folds = np.array_split(order, num_folds)
    val_idx = set(folds[fold].tolist())
    val = sorted(names[i] for i in val_idx)
    train = sorted(names[i] for i in range(len(names)) if i not in val_idx)
    return train, val


def _load_csv(csv_path) -> tuple[pathlib.Path, pd.DataFrame]:
    path = pathlib.Path(csv_path)
    if not path.is_file():
        raise InputError(path, "case list not found")
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise InputError(path, f"cannot parse CSV ({str(err).splitlines()[0] if str(err) else type(err).__name__})") from None
    frame.columns = [str(c).strip() for c in frame.columns]
    if "case" not in frame.columns:
        raise InputError(path, f"no 'case' column (columns: {', '.join(frame.columns) or 'none'})")
    frame = frame.apply(lambda col: col.str.strip())
    return path, frame


def _validate_cases(path, cases: Sequence[str], known) -> list[str]:
    cases = [case_name(c) or c for c in cases]
    if any(c == "" for c in cases):
        raise InputError(path, "empty value in the 'case' column")
    seen = set()
    for c in cases:
        if c in seen:
            raise InputError(path, f"case '{c}' is listed twice")
        seen.add(c)
    if known is not None:
        known_names = {p.name if isinstance(p, Pair) else str(p) for p in known}
        for c in cases:
            if c not in known_names:
                raise InputError(path, f"case '{c}' is not among the discovered pairs")
    return cases


def read_case_list(csv_path, known=None) -> list[str]:
    """Case names from the ``case`` column of a CSV, in file order. A ``.nii``/``.nii.gz`` extension is
    dropped. With ``known`` (names or Pairs), a case not in it raises InputError naming the CSV and the case."""
    path, frame = _load_csv(csv_path)
    if frame.empty:
        raise InputError(path, "lists no cases")
    return _validate_cases(path, frame["case"].tolist(), known)


def select_split(csv_path, split: str, known=None, column: str = "split") -> list[str]:
    """Names of the cases whose ``column`` (default ``split``) equals ``split``, in file order."""
    path, frame = _load_csv(csv_path)
    if column not in frame.columns:
        raise InputError(path, f"no '{column}' column (columns: {', '.join(frame.columns)})")
    values = sorted(set(frame[column]))
    chosen = frame[frame[column] == str(split)]
    if chosen.empty:
        raise InputError(path, f"no case has {column} '{split}' (values: {', '.join(values) or 'none'})")
    # validate every row (duplicates, unknown names), not only the chosen ones
    _validate_cases(path, frame["case"].tolist(), known)
    return [case_name(c) or c for c in chosen["case"].tolist()]


def select_pairs(pairs: Sequence[Pair], names: Iterable[str], source="case list") -> list[Pair]:
    """The pairs with these names, in the order of ``names``; an unknown name raises InputError(source, ...)."""
    by_name = {p.name: p for p in pairs}
    out = []
    for name in names:
        if name not in by_name:
            raise InputError(source, f"case '{name}' is not among the discovered pairs")
        out.append(by_name[name])
    return out
