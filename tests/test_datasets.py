"""label_reg.datasets: pair discovery, k-fold splits, case lists; and the demo data loads through label_reg.io."""
import itertools

import numpy as np
import pytest

from label_reg import datasets, io
from label_reg.errors import InputError


def _make_layout(root, names, folders=datasets.FOLDERS, ext=".nii.gz"):
    """Empty placeholder files are enough: discovery looks at names only."""
    for folder in folders:
        (root / folder).mkdir(parents=True, exist_ok=True)
        for name in names:
            (root / folder / f"{name}{ext}").write_bytes(b"")
    return root


def test_discover_pairs_sorted_and_complete(tmp_path):
    _make_layout(tmp_path, ["case10", "case02", "case01"])
    (tmp_path / "fixed_images" / "case03.nii").write_bytes(b"")  # .nii works too, but must be paired
    for folder in ("moving_images", "moving_labels", "fixed_labels"):
        (tmp_path / folder / "case03.nii").write_bytes(b"")
    (tmp_path / "moving_images" / "README.txt").write_text("ignored")
    (tmp_path / "moving_images" / ".case99.tmp-abc.nii.gz").write_bytes(b"")  # hidden: ignored
    pairs = datasets.discover_pairs(tmp_path)
    assert [p.name for p in pairs] == ["case01", "case02", "case03", "case10"]
    p = pairs[2]
    assert p.moving_image == tmp_path / "moving_images" / "case03.nii"
    assert p.moving_label == tmp_path / "moving_labels" / "case03.nii"
    assert p.fixed_image == tmp_path / "fixed_images" / "case03.nii"
    assert p.fixed_label == tmp_path / "fixed_labels" / "case03.nii"
    assert pairs[0].fixed_label == tmp_path / "fixed_labels" / "case01.nii.gz"


def test_discover_pairs_without_label_folders(tmp_path):
    _make_layout(tmp_path, ["a", "b"], folders=("moving_images", "fixed_images"))
    with pytest.raises(InputError) as err:
        datasets.discover_pairs(tmp_path)
    assert "moving_labels" in str(err.value)
    pairs = datasets.discover_pairs(tmp_path, require_labels=False)
    assert [p.name for p in pairs] == ["a", "b"] and pairs[0].moving_label is None and pairs[0].fixed_label is None


@pytest.mark.parametrize("case", ["root_missing", "folder_missing", "no_pairs", "unpaired", "duplicate"])
def test_discover_pairs_errors(tmp_path, case):
    root = tmp_path / "data"
    if case == "root_missing":
        named = str(root)
    elif case == "folder_missing":
        _make_layout(root, ["obs000"], folders=("moving_images", "moving_labels", "fixed_images"))
        named = "fixed_labels"
    elif case == "no_pairs":
        _make_layout(root, [])
        named = str(root)
    elif case == "unpaired":
        _make_layout(root, ["obs000", "obs001"])
        (root / "moving_images" / "obs003.nii.gz").write_bytes(b"")
        (root / "moving_labels" / "obs003.nii.gz").write_bytes(b"")
        (root / "fixed_images" / "obs003.nii.gz").write_bytes(b"")
        named = "obs003.nii.gz has no partner in fixed_labels/"
    else:
        _make_layout(root, ["obs000"])
        (root / "fixed_images" / "obs000.nii").write_bytes(b"")
        named = "obs000"
    with pytest.raises(InputError) as err:
        datasets.discover_pairs(root)
    assert named in str(err.value)
    assert "\n" not in str(err.value)


def test_kfold_properties():
    names = [f"obs{i:03d}" for i in range(23)]
    shuffled = list(reversed(names))
    vals = []
    for fold in range(5):
        train, val = datasets.kfold_split(shuffled, num_folds=5, fold=fold, seed=7)
        assert set(train).isdisjoint(val)
        assert sorted(train + val) == names
        assert (train, val) == datasets.kfold_split(names, num_folds=5, fold=fold, seed=7)  # order-independent
        vals.append(set(val))
    sizes = [len(v) for v in vals]
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == len(names)
    for a, b in itertools.combinations(vals, 2):
        assert a.isdisjoint(b)
    assert set().union(*vals) == set(names)
    # the seed shuffles: folds are not just contiguous runs of sorted names, and another seed differs
    assert vals[0] != set(names[:len(vals[0])])
    assert datasets.kfold_split(names, 5, 0, seed=8)[1] != sorted(vals[0])


@pytest.mark.parametrize("num_folds,fold", [(5, 5), (5, -1), (1, 0), (30, 0), (5, 1.0)])
def test_kfold_rejects_bad_fold(num_folds, fold):
    with pytest.raises(InputError):
        datasets.kfold_split([f"c{i}" for i in range(10)], num_folds=num_folds, fold=fold)


def test_case_list_and_split(tmp_path):
    csv = tmp_path / "cases.csv"
    csv.write_text("case,split,other\nobs002,train,1\nobs000.nii.gz, val,2\nobs001,train,3\n")
    known = ["obs000", "obs001", "obs002", "obs003"]
    assert datasets.read_case_list(csv, known=known) == ["obs002", "obs000", "obs001"]
    assert datasets.select_split(csv, "train", known=known) == ["obs002", "obs001"]
    assert datasets.select_split(csv, "val") == ["obs000"]
    with pytest.raises(InputError) as err:
        datasets.select_split(csv, "test")
    assert str(csv) in str(err.value) and "train" in str(err.value)

    with pytest.raises(InputError) as err:
        datasets.read_case_list(csv, known=["obs000", "obs001"])
    assert str(csv) in str(err.value) and "obs002" in str(err.value)

    pairs = [datasets.Pair(n, *(tmp_path / f"{n}.nii",) * 4) for n in known]
    assert [p.name for p in datasets.select_pairs(pairs, ["obs003", "obs000"])] == ["obs003", "obs000"]
    with pytest.raises(InputError):
        datasets.select_pairs(pairs, ["obs009"], source=csv)


@pytest.mark.parametrize("text,words", [("name\nobs000\n", "'case' column"), ("case\nobs000\nobs000\n", "twice"),
                                        ("case\n", "no cases")])
def test_case_list_errors(tmp_path, text, words):
    csv = tmp_path / "list.csv"
    csv.write_text(text)
    with pytest.raises(InputError) as err:
        datasets.read_case_list(csv)
    assert str(csv) in str(err.value) and words in str(err.value)
    with pytest.raises(InputError) as err:
        datasets.read_case_list(tmp_path / "missing.csv")
    assert "missing.csv" in str(err.value)


def test_demo_data_loads(demo_data_dir):
    pairs = datasets.discover_pairs(demo_data_dir)
    assert len(pairs) == 90
    assert len({p.name for p in pairs}) == 90
    counts = {}
    for pair in pairs:
        mr = io.read_image(pair.moving_image)
        us = io.read_image(pair.fixed_image)
        mr_labels = io.read_label(pair.moving_label, reference=mr)
        us_labels = io.read_label(pair.fixed_label, reference=us)
        assert 2 <= len(mr_labels) <= 6
        assert len(mr_labels) == len(us_labels), pair.name
        counts[len(mr_labels)] = counts.get(len(mr_labels), 0) + 1
        # every landmark channel is present in both modalities
        for ch in mr_labels[1:] + us_labels[1:]:
            assert io.to_array(ch).any(), pair.name
    assert sum(counts.values()) == 90 and set(counts) <= {2, 3, 4, 5, 6}

    csv_cases = datasets.read_case_list(demo_data_dir / "cases.csv", known=pairs)
    assert sorted(csv_cases) == [p.name for p in pairs]
    train = datasets.select_split(demo_data_dir / "cases.csv", "train", known=pairs, column="deepreg_split")
    assert 0 < len(train) < 90
    train, val = datasets.kfold_split([p.name for p in pairs], num_folds=5, fold=0)
    assert len(val) == 18 and len(train) == 72
    assert np.all([n in csv_cases for n in train + val])
