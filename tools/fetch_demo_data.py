#!/usr/bin/env python3
"""Download the public MR-TRUS prostate demo data and lay it out for `label-reg`.

The data is the `mrus` branch of the example-data repository that DeepReg's
`paired_mrus_prostate` demo downloads: four folders `moving_images`,
`moving_labels`, `fixed_images` and `fixed_labels` of `.nii.gz` files, one file
name per MR/TRUS pair (108 cases), inside a top-level folder such as
`example-data-mrus/`.

Usage:
    python tools/fetch_demo_data.py --output_dir DIR [--url URL] [--zip LOCAL.zip]
                                    [--exclude_test] [--overwrite]

`--zip` unpacks an archive that is already on disk instead of downloading it.
`--exclude_test` drops DeepReg's test partitions part09-10 (sorted names, case i
goes to part i % 11), leaving the 90 training/validation cases.

The output is written into a temporary directory beside DIR and renamed into
place at the end, so a failed run leaves no partial output. The module needs only
the standard library; it does not import `label_reg`.
"""
from __future__ import annotations

import argparse
import datetime
import os
import pathlib
import shutil
import stat
import sys
import tempfile
import typing
import urllib.error
import urllib.request
import zipfile
import zlib

DEFAULT_URL = "https://github.com/yipenghu/example-data/archive/mrus.zip"
FOLDERS = ("moving_images", "moving_labels", "fixed_images", "fixed_labels")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
NUM_PARTITIONS = 11
TEST_PARTITIONS = (9, 10)
DOWNLOAD_TIMEOUT_S = 60.0
CHUNK_BYTES = 1 << 16


class FetchError(Exception):
    """A failure to report to the user as one line; nothing partial is left behind."""


class Summary(typing.NamedTuple):
    num_pairs: int
    output_dir: pathlib.Path
    num_dropped: int  # test cases dropped by exclude_test
    num_ignored: int  # archive members that are not NIfTI files in the four folders


# --------------------------------------------------------------------------- download


def _format_bytes(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def download(url: str, dest, timeout: float = DOWNLOAD_TIMEOUT_S, progress=sys.stderr) -> pathlib.Path:
    """Download `url` to the file `dest`, printing a progress line to `progress`.

    The data goes to `dest.part` first and is renamed at the end, so `dest` exists only
    after a complete download. Raises FetchError with a one-line message on any failure.
    """
    dest = pathlib.Path(dest)
    part = dest.with_name(dest.name + ".part")
    hint = "download it by hand and pass --zip FILE"
    received = 0
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            with open(part, "wb") as out:
                while True:
                    chunk = response.read(CHUNK_BYTES)
                    if not chunk:
                        break
                    out.write(chunk)
                    received += len(chunk)
                    if progress is not None:
                        shown = _format_bytes(received) + (f" / {_format_bytes(total)}" if total else "")
                        progress.write(f"\rdownloading {url}: {shown}")
                        progress.flush()
        if progress is not None and received:
            progress.write("\n")
        if total is not None and received != total:
            raise FetchError(f"cannot download {url}: got {received} of {total} bytes; {hint}")
        os.replace(part, dest)
    except FetchError:
        part.unlink(missing_ok=True)
        raise
    except urllib.error.HTTPError as e:
        part.unlink(missing_ok=True)
        raise FetchError(f"cannot download {url}: HTTP {e.code} {e.reason}; {hint}") from None
    except urllib.error.URLError as e:
        part.unlink(missing_ok=True)
        raise FetchError(f"cannot download {url}: {e.reason}; {hint}") from None
    except (OSError, ValueError) as e:  # timeouts, resets, malformed URLs
        part.unlink(missing_ok=True)
        if progress is not None and received:
            progress.write("\n")
        reason = str(e) or type(e).__name__
        raise FetchError(f"cannot download {url}: {reason}; {hint}") from None
    return dest


# --------------------------------------------------------------------------- unpack


def _is_nifti(name: str) -> bool:
    return name.endswith(NIFTI_SUFFIXES) and name not in NIFTI_SUFFIXES


def _check_member_name(name: str) -> list[str]:
    """Split an archive member name into parts; FetchError if it is absolute or climbs out."""
    posix = name.replace("\\", "/")
    if posix.startswith("/") or (len(posix) >= 2 and posix[1] == ":"):
        raise FetchError(f"unsafe archive: absolute member path {name!r}")
    parts = [p for p in posix.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise FetchError(f"unsafe archive: member path {name!r} contains '..'")
    return parts


def _select_members(zf: zipfile.ZipFile):
    """Map folder -> {file name: ZipInfo} for NIfTI files directly inside the four folders.

    Every member name is checked first, so an unsafe archive is refused before anything is
    written. The folders may sit under any top-level prefix, but all four must share it.
    """
    selected: dict[str, dict[str, zipfile.ZipInfo]] = {f: {} for f in FOLDERS}
    prefixes = set()
    ignored = 0
    for info in zf.infolist():
        parts = _check_member_name(info.filename)
        if info.is_dir():
            continue
        if len(parts) < 2 or parts[-2] not in FOLDERS or not _is_nifti(parts[-1]):
            ignored += 1
            continue
        if stat.S_ISLNK(info.external_attr >> 16):
            raise FetchError(f"unsafe archive: member {info.filename!r} is a symbolic link")
        folder, name = parts[-2], parts[-1]
        if name in selected[folder]:
            raise FetchError(f"archive holds {folder}/{name} twice")
        selected[folder][name] = info
        prefixes.add(tuple(parts[:-2]))
    if len(prefixes) > 1:
        shown = ", ".join(sorted("/".join(p) or "." for p in prefixes))
        raise FetchError(f"archive holds the data folders under more than one top-level folder: {shown}")
    return selected, ignored


def _check_names(selected) -> list[str]:
    """The four folders must hold the same file names; return them sorted."""
    missing = [f for f in FOLDERS if not selected[f]]
    if missing:
        raise FetchError(f"archive has no .nii/.nii.gz files in: {', '.join(missing)} (expected folders {', '.join(FOLDERS)})")
    reference = set(selected[FOLDERS[0]])
    for folder in FOLDERS[1:]:
        names = set(selected[folder])
        if names != reference:
            only_ref = sorted(reference - names)
            only_here = sorted(names - reference)
            detail = []
            if only_ref:
                detail.append(f"missing from {folder}: {', '.join(only_ref[:5])}{' ...' if len(only_ref) > 5 else ''}")
            if only_here:
                detail.append(f"only in {folder}: {', '.join(only_here[:5])}{' ...' if len(only_here) > 5 else ''}")
            raise FetchError(f"the folders do not hold the same file names ({FOLDERS[0]} vs {folder}): {'; '.join(detail)}")
    return sorted(reference)


def partition(index: int) -> int:
    """DeepReg's split: the i-th case in sorted file-name order goes to part i % 11."""
    return index % NUM_PARTITIONS


def held_out_names(names) -> list[str]:
    """Names of the cases in DeepReg's test partitions (part09-10)."""
    return [n for i, n in enumerate(sorted(names)) if partition(i) in TEST_PARTITIONS]


def check_output_dir(output_dir, overwrite: bool = False) -> pathlib.Path:
    """Refuse an existing file, or an existing non-empty directory unless `overwrite`."""
    output_dir = pathlib.Path(output_dir)
    if output_dir.exists() or output_dir.is_symlink():
        if not output_dir.is_dir() or output_dir.is_symlink():
            raise FetchError(f"output path {output_dir} exists and is not a directory")
        if any(output_dir.iterdir()) and not overwrite:
            raise FetchError(f"output directory {output_dir} exists and is not empty; pass --overwrite to replace it")
    return output_dir


def _source_md(url: str, zip_path: pathlib.Path, num_pairs: int, dropped: list[str], exclude_test: bool) -> str:
    today = datetime.date.today().isoformat()
    split = (
        f"DeepReg's test partitions part09-10 (sorted names, case i -> part i % 11) were dropped "
        f"with --exclude_test: {len(dropped)} cases removed, {num_pairs} train/val cases kept."
        if exclude_test
        else "All cases in the archive were kept, including DeepReg's test partitions part09-10 "
        "(sorted names, case i -> part i % 11)."
    )
    return f"""# MR-TRUS prostate demo data

Written by `tools/fetch_demo_data.py` on {today}.

**Demo / dummy data, not real clinical data.** The upstream authors describe these
volumes as simulated dummy images for tutorials. Use them for pipeline tests and rough
sanity checks only; do not report results on them as clinical accuracy.

## Origin

- URL: {url}
  (the `mrus` branch of the example-data repository used by DeepReg's
  `paired_mrus_prostate` demo)
- Archive unpacked: `{zip_path.name}`
- {num_pairs} MR/TRUS pairs. {split}

## Licence

The source repository has **no licence file**; no explicit redistribution terms exist.
Keep this copy for local use and do not redistribute it without asking the owner.

## Citation

- Hu Y. et al., "Weakly-supervised convolutional neural networks for multimodal image
  registration", Medical Image Analysis 49 (2018), doi:10.1016/j.media.2018.07.002
- Fu Y. et al., "DeepReg: a deep learning toolkit for medical image registration",
  Journal of Open Source Software (JOSS) 5(55) 2020, doi:10.21105/joss.02705

## Layout

```
moving_images/  MR images
moving_labels/  MR labels (channel 0 = gland, then paired landmarks)
fixed_images/   TRUS images
fixed_labels/   TRUS labels
```
The same file name in all four folders is one MR/TRUS pair.
"""


def _move_into_place(tmp: pathlib.Path, output_dir: pathlib.Path, overwrite: bool) -> None:
    if output_dir.is_dir() and any(output_dir.iterdir()):
        if not overwrite:  # appeared while unpacking
            raise FetchError(f"output directory {output_dir} exists and is not empty; pass --overwrite to replace it")
        backup = pathlib.Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.old-", dir=output_dir.parent))
        backup.rmdir()
        os.replace(output_dir, backup)
        try:
            os.replace(tmp, output_dir)
        except OSError:
            os.replace(backup, output_dir)
            raise
        shutil.rmtree(backup, ignore_errors=True)
    else:
        if output_dir.is_dir():
            output_dir.rmdir()
        os.replace(tmp, output_dir)


def unpack(zip_path, output_dir, exclude_test: bool = False, overwrite: bool = False, url: str = DEFAULT_URL) -> Summary:
    """Unpack the demo archive `zip_path` into `output_dir` in the layout `label-reg` reads.

    Only `.nii`/`.nii.gz` files directly inside the four data folders are extracted; any
    absolute or `..` member path refuses the whole archive. On any failure FetchError is
    raised and `output_dir` is left as it was. `url` is recorded in the output SOURCE.md.
    """
    zip_path = pathlib.Path(zip_path)
    output_dir = check_output_dir(pathlib.Path(output_dir).absolute(), overwrite)
    if not zip_path.is_file():
        raise FetchError(f"archive {zip_path} not found")
    try:
        zf = zipfile.ZipFile(zip_path)
    except (zipfile.BadZipFile, OSError) as e:
        raise FetchError(f"cannot open {zip_path} as a zip archive: {e}") from None
    with zf:
        selected, ignored = _select_members(zf)
        names = _check_names(selected)
        dropped = held_out_names(names) if exclude_test else []
        keep = sorted(set(names) - set(dropped))

        output_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.partial-", dir=output_dir.parent))
        try:
            for folder in FOLDERS:
                (tmp / folder).mkdir()
                for name in keep:
                    with zf.open(selected[folder][name]) as src, open(tmp / folder / name, "wb") as dst:
                        shutil.copyfileobj(src, dst, CHUNK_BYTES)
            (tmp / "SOURCE.md").write_text(_source_md(url, zip_path, len(keep), dropped, exclude_test))
            _move_into_place(tmp, output_dir, overwrite)
        except (zipfile.BadZipFile, EOFError, OSError, zlib.error) as e:
            raise FetchError(f"cannot unpack {zip_path}: {e}") from None
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return Summary(len(keep), output_dir, len(dropped), ignored)


# --------------------------------------------------------------------------- command line


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="fetch_demo_data.py",
        description="Download the public MR-TRUS prostate demo data and lay it out for label-reg.",
    )
    parser.add_argument("--output_dir", required=True, help="directory to create with the four data folders")
    parser.add_argument("--url", default=DEFAULT_URL, help=f"archive to download (default: {DEFAULT_URL})")
    parser.add_argument("--zip", dest="zip_path", metavar="LOCAL.zip", help="unpack this local archive instead of downloading")
    parser.add_argument("--exclude_test", action="store_true", help="drop DeepReg's test partitions part09-10 (keeps 90 of 108 cases)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing non-empty output directory")
    parser.add_argument("--timeout", type=float, default=DOWNLOAD_TIMEOUT_S, help="network timeout in seconds")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        check_output_dir(args.output_dir, args.overwrite)  # before a long download
        if args.zip_path:
            summary = unpack(args.zip_path, args.output_dir, args.exclude_test, args.overwrite, url=args.url)
        else:
            with tempfile.TemporaryDirectory(prefix="fetch_demo_data-") as scratch:
                zip_path = download(args.url, pathlib.Path(scratch) / "mrus.zip", timeout=args.timeout)
                summary = unpack(zip_path, args.output_dir, args.exclude_test, args.overwrite, url=args.url)
    except FetchError as e:
        print(f"fetch_demo_data: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("fetch_demo_data: interrupted", file=sys.stderr)
        return 130
    dropped = f" ({summary.num_dropped} test cases, part09-10, dropped)" if args.exclude_test else ""
    print(f"{summary.num_pairs} MR/TRUS pairs{dropped} written to {summary.output_dir}")
    print(f"train on it with: make train-mixplus DATA={summary.output_dir} PRESET=cpu")
    return 0


if __name__ == "__main__":
    sys.exit(main())
