"""``label-reg compare``: our cross-validation results beside the paper's Table 1; legacy NiftyNet outputs scored too.

    label-reg compare --results OUT_fold0/per_case.csv OUT_fold1/per_case.csv ... \\
                      [--niftynet_dir DIR --data_dir DATA] [--methods "MIX+,MIX+ (found gland)"] [--output FILE.md]

``--results`` takes per-case CSVs written by ``label-reg evaluate`` (folds and methods), comma-separated, repeated, or
as the words following the flag. ``--niftynet_dir`` holds ``<subject>_niftynet_out.nii.gz`` files (moving labels
resampled onto the TRUS image grid), scored against ``DATA/fixed_labels`` with the same metrics and shown as the row
"NiftyNet (legacy)". ``--methods`` keeps only the named methods (exact names; pre-alignment rows are always kept), so
the paired tests are between those alone. Prints the tables (markdown) and, with ``--output``, writes them to a file too.
"""
from absl import flags

from label_reg.errors import InputError

flags.DEFINE_multi_string("results", [], "Per-case CSV(s) from `label-reg evaluate` (comma-separated or repeated; "
                                         "further CSV paths may follow as plain arguments).")
flags.DEFINE_string("niftynet_dir", None, "Folder of legacy <subject>_niftynet_out.nii.gz outputs to score.")
flags.DEFINE_string("data_dir", None, "Dataset whose fixed_labels/ the legacy outputs are scored against.")
flags.DEFINE_multi_string("methods", [], "Only these methods (exact names from the CSVs' method column, "
                                         "comma-separated or repeated) and the pre-alignment rows.")
flags.DEFINE_string("output", None, "Also write the report to this markdown file.")

FLAGS = flags.FLAGS


def main(argv):
    paths = [p for value in FLAGS.results for p in value.split(",") if p] + list(argv[1:])
    stray = [p for p in argv[1:] if p.startswith("-")]
    if stray:
        raise InputError(" ".join(stray), "unknown flag(s)")
    if not paths:
        raise InputError("--results", "give at least one per-case CSV")
    from label_reg import io as lio
    from label_reg.compare import compare

    methods = [m.strip() for value in FLAGS.methods for m in value.split(",") if m.strip()]
    result = compare(paths, niftynet_dir=FLAGS.niftynet_dir, data_dir=FLAGS.data_dir, methods=methods or None)
    if FLAGS.output:
        with lio.atomic_path(FLAGS.output) as tmp:
            tmp.write_text(result.text, encoding="utf-8")
    print(result.text, end="")
    return 0
