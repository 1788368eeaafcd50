"""``label-reg register``: register an MR volume to a TRUS volume with a trained model (outputs in TRUS world space).

One pair::

    label-reg register --moving_image MR.nii.gz --fixed_image US.nii.gz --moving_label MRSEG.nii.gz \\
        [--moving_points targets.csv] --model_dir MODEL_DIR --output_dir OUT

A whole paired data folder (moving_images/, moving_labels/, fixed_images/; fixed labels not needed; optional
moving_points/<case>.csv), loading the model once, one subfolder of OUT per case::

    label-reg register --data_dir DATA --model_dir MODEL_DIR --output_dir OUT

See :mod:`label_reg.register` for the outputs. A model trained with ``--prealign=trus_gland`` runs its TRUS gland
segmenter first and checks the result (a warning on stderr when the self-check fails; the exit status stays 0);
``--recentre_passes=N`` then registers it N more times, each on the centre of the gland the last pass warped
(:mod:`label_reg.recentre`).
``--model`` is an alias of ``--model_dir``.
"""
import sys

from absl import flags

from label_reg.commands import define_model_dir_flag, reject_positional
from label_reg.errors import InputError
from label_reg.register import QC_MAX_CENTRE_MM, QC_MIN_DSC

flags.DEFINE_string("moving_image", None, "MR volume (NIfTI), any spacing/size/orientation.")
flags.DEFINE_string("fixed_image", None, "TRUS volume (NIfTI); every output is written on its grid.")
flags.DEFINE_string("moving_label", None, "MR labels (NIfTI, 3-D mask or 4-D stack, channel 0 = gland). Required: "
                                          "the gland drives the pre-alignment (and is the MIX+ third input).")
flags.DEFINE_string("moving_points", None, "Optional CSV of MR points (x,y,z in mm, MR world/LPS; optional name "
                                           "column) to map into TRUS world space.")
define_model_dir_flag()
flags.DEFINE_string("output_dir", None, "Output folder (a subfolder per case with --data_dir).")
flags.DEFINE_string("data_dir", None, "Batch mode: paired data folder instead of the single-pair flags.")
flags.DEFINE_float("check_min_dsc", QC_MIN_DSC, "Self-check of found-gland (prealign trus_gland) models: warn when "
                                                "the DSC between the warped MR gland and the found TRUS gland is "
                                                "below this.")
flags.DEFINE_float("check_max_centre_mm", QC_MAX_CENTRE_MM, "Self-check: warn when the centres of mass of the "
                                                            "warped MR gland and the found TRUS gland are further "
                                                            "apart than this (mm).")
flags.DEFINE_integer("recentre_passes", 0, "Found-gland (prealign trus_gland) models: after the registration on the "
                                        "found gland, register again this many times, each on the centre of the "
                                        "MR gland the last pass warped.", lower_bound=0)

FLAGS = flags.FLAGS


def main(argv):
    reject_positional(argv)
    if not FLAGS.model_dir:
        raise InputError("--model_dir", "is required (a model directory from `label-reg train`)")
    if not FLAGS.output_dir:
        raise InputError("--output_dir", "is required")
    single = [name for name in ("moving_image", "fixed_image", "moving_label", "moving_points")
              if getattr(FLAGS, name)]
    from label_reg.register import Registrar, check_output_dir, register_folder
    if FLAGS.data_dir:
        if single:
            raise InputError("--data_dir", f"cannot be combined with --{', --'.join(single)}")
        check_output_dir(FLAGS.output_dir)  # writable, before the model loads
        registrar = Registrar(FLAGS.model_dir, FLAGS.check_min_dsc, FLAGS.check_max_centre_mm, FLAGS.recentre_passes)
        results = register_folder(FLAGS.data_dir, FLAGS.output_dir, registrar=registrar)
        failed = [r for r in results if not r["ok"]]
        done = [r["seconds"] for r in results if r["ok"]]
        if done:
            print(f"registered {len(done)} of {len(results)} case(s) into {FLAGS.output_dir} "
                  f"({sum(done) / len(done):.2f} s per case; model loaded in {registrar.load_seconds:.2f} s)")
            doubtful = [r["name"] for r in results if r["check_passed"] is False]
            if doubtful:
                print(f"self-check failed on {len(doubtful)} case(s) (warnings above): {', '.join(doubtful)}")
        if failed:
            for r in failed:
                print(f"label-reg register: error: case {r['name']}: {r['error']}", file=sys.stderr)
            raise InputError(FLAGS.data_dir, f"{len(failed)} of {len(results)} case(s) failed (see above); "
                                             "their output folders were not written")
        return 0
    missing = [name for name in ("moving_image", "fixed_image") if not getattr(FLAGS, name)]
    if missing:
        raise InputError(f"--{missing[0]}", "is required (or --data_dir for a folder of pairs)")
    # Validate every input before loading TensorFlow and the model: bad input fails fast and writes nothing.
    from label_reg.model_dir import takes_moving_label
    from label_reg.register import read_inputs
    output_dir = check_output_dir(FLAGS.output_dir)
    inputs = read_inputs(FLAGS.moving_image, FLAGS.fixed_image, FLAGS.moving_label, FLAGS.moving_points,
                         mixplus=takes_moving_label(FLAGS.model_dir))
    check_output_dir(output_dir, inputs)  # room for these outputs, before the model loads
    registrar = Registrar(FLAGS.model_dir, FLAGS.check_min_dsc, FLAGS.check_max_centre_mm, FLAGS.recentre_passes)
    result = registrar.register_inputs(inputs, output_dir)
    for warning in result.warnings:
        print(f"label-reg register: warning: {warning}", file=sys.stderr)
    if result.replaced:
        print(f"label-reg register: replaced {len(result.replaced)} output file(s) of an earlier run in "
              f"{result.output_dir}: {', '.join(result.replaced)}", file=sys.stderr)
    report = result.report
    print(f"registered {FLAGS.moving_image} -> {FLAGS.fixed_image} in {report['timings_s']['total_s']:.2f} s "
          f"(+ {report['model_load_s']:.2f} s model load); outputs in {result.output_dir}")
    check = report["quality_check"]
    if check is not None and check["passed"]:
        print(f"self-check passed: DSC {check['dsc']:.2f} between the warped MR gland and the found TRUS gland, "
              f"centres {check['centre_distance_mm']:.1f} mm apart")
    if result.point_status is not None:
        flagged = [s for s in result.point_status if s != "ok"]
        print(f"mapped {len(result.point_status)} point(s); {len(flagged)} flagged "
              f"(see the status column of {result.files['moving_points_in_fixed_csv'].name})")
    return 0
