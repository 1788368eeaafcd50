"""``label-reg phantoms``: write synthetic MR/TRUS phantom pairs with a known deformation.

    label-reg phantoms --num_pairs 10 --output_dir data/phantoms [--seed 0] [--max_rotation_deg 0 | --rotation_deg N]
                       [--overwrite]

Writes ``moving_images/``, ``moving_labels/``, ``fixed_images/``, ``fixed_labels/`` (the paired layout that
``label_reg.datasets.discover_pairs`` reads) and ``ground_truth/`` (ITK displacement fields on the TRUS grid, mm:
TRUS point p corresponds to MR point p + disp(p)). ``--max_rotation_deg N`` turns each TRUS side's view of the
anatomy about the TRUS gland centre by a random angle in [-N, N] degrees (about a random axis), for training and
testing the global affine stage; 0 (default) writes the unrotated pairs of earlier versions exactly.
``--rotation_deg N`` turns each by exactly N degrees about a random axis instead (a test set at one angle, as
``tools/rotation_study.py`` holds out). See :mod:`label_reg.synthetic`.
"""
import os
import re

from absl import flags

from label_reg import synthetic
from label_reg.commands import reject_positional
from label_reg.errors import InputError

FLAGS = flags.FLAGS

flags.DEFINE_integer("num_pairs", 10, "Number of phantom pairs to write.")
flags.DEFINE_string("output_dir", None, "Directory to write the dataset into (created if missing).")
flags.DEFINE_integer("seed", 0, "Random seed; the same seed writes the same data.")
flags.DEFINE_float("max_rotation_deg", 0.0, "Rotate each TRUS side by a random angle up to this many degrees "
                   "(0-180; 0 = no rotation).")
flags.DEFINE_float("rotation_deg", None, "Rotate each TRUS side by exactly this many degrees (0-180) about a random "
                   "axis, instead of --max_rotation_deg's random angle.")
flags.DEFINE_boolean("overwrite", False, "Replace phantom pairs already in --output_dir.")

_PHANTOM_FILE = re.compile(r"^phantom\d+\.nii(\.gz)?$")


def _existing_pair_files(output_dir):
    found = []
    for sub in synthetic.LAYOUT_DIRS + (synthetic.GROUND_TRUTH_DIR,):
        folder = os.path.join(output_dir, sub)
        if os.path.isdir(folder):
            found += [os.path.join(folder, f) for f in sorted(os.listdir(folder))
                      if f.endswith((".nii", ".nii.gz"))]
    return found


def main(argv):
    reject_positional(argv)
    output_dir = FLAGS.output_dir
    if not output_dir:
        raise InputError("--output_dir", "is required")
    if FLAGS.num_pairs < 1:
        raise InputError("--num_pairs", f"must be at least 1, got {FLAGS.num_pairs}")
    try:
        synthetic.check_angle("max_rotation_deg", FLAGS.max_rotation_deg)
    except ValueError as err:
        raise InputError("--max_rotation_deg", str(err).removeprefix("max_rotation_deg ")) from None
    if FLAGS.rotation_deg is not None:
        if FLAGS.max_rotation_deg:
            raise InputError("--rotation_deg", "and --max_rotation_deg exclude each other (an exact angle or a "
                                               "random one up to a limit)")
        try:
            synthetic.check_angle("rotation_deg", FLAGS.rotation_deg)
        except ValueError as err:
            raise InputError("--rotation_deg", str(err).removeprefix("rotation_deg ")) from None
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise InputError(output_dir, "exists and is not a directory")

    existing = _existing_pair_files(output_dir)
    if existing:
        if not FLAGS.overwrite:
            raise InputError(output_dir, f"already holds {len(existing)} pair file(s) (e.g. "
                                         f"{os.path.relpath(existing[0], output_dir)}); pass --overwrite to "
                                         "replace them or choose another directory")
        foreign = [f for f in existing if not _PHANTOM_FILE.match(os.path.basename(f))]
        if foreign:
            raise InputError(output_dir, f"holds files that are not phantoms (e.g. "
                                         f"{os.path.relpath(foreign[0], output_dir)}); refusing to overwrite, "
                                         "choose another directory")
        for f in existing:
            os.remove(f)
        print(f"removed {len(existing)} old phantom file(s) from {output_dir}")

    names = synthetic.write_phantoms(output_dir, FLAGS.num_pairs, FLAGS.seed, FLAGS.max_rotation_deg,
                                     rotation_deg=FLAGS.rotation_deg)
    turned = ""
    if FLAGS.rotation_deg is not None:
        turned = f", TRUS sides rotated by {FLAGS.rotation_deg:g} degrees"
    elif FLAGS.max_rotation_deg:
        turned = f", TRUS sides rotated up to {FLAGS.max_rotation_deg:g} degrees"
    print(f"wrote {len(names)} phantom pair(s) ({names[0]} .. {names[-1]}, seed {FLAGS.seed}{turned}) to "
          f"{os.path.abspath(output_dir)}:")
    for sub in synthetic.LAYOUT_DIRS:
        print(f"  {sub}/")
    print(f"  {synthetic.GROUND_TRUTH_DIR}/  (ground-truth ITK displacement fields on the TRUS grid, mm)")
    return 0
