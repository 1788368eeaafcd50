"""``label-reg evaluate``: score a trained model; per-case CSV, summary table in the paper's format, figures.

    label-reg evaluate --model_dir DIR [--data_dir DIR] [--cases_csv CSV [--split val] | --fold K]
                       --output_dir OUT [--figures] [--method NAME] [--cache_dir DIR]
                       [--segmenter_dir SEG] [--true_gland_model_row] [--recentre_passes N]

By default the cases are the ones the training run held out (its fold, or the ``val`` split of its case list), from
the data directory it trained on. Writes ``OUT/per_case.csv`` (case, method, fold, metrics; a ``Coarse`` row per
case for the pre-alignment alone), ``OUT/summary.md`` (mean (median) ± SD per method, printed too) and, with
``--figures``, Fig. 3/4-style PNGs of the best, median and worst case into ``OUT/figures/``. ``--model`` is an alias
of ``--model_dir``.

A model trained with ``--prealign=trus_gland`` is scored on the TRUS gland centre its segmenter finds (row e.g.
``MIX+ (found gland)``), beside ``Coarse (found gland)``, ``Coarse (true gland)`` (on the TRUS mask's centre) and the
segmenter's gland Dice and centre error (columns ``segmenter_dsc``, ``segmenter_centre_error_mm``).
``--segmenter_dir`` adds the same rows and scores to a paper-pipeline (``trus_centre``) model's evaluation.
``--true_gland_model_row`` also scores the network on the true TRUS gland centre (e.g. ``MIX+ (true gland)``).
``--recentre_passes=N`` scores a found-gland model after N re-centring passes, as ``label-reg register`` does with
the same flag (row e.g. ``MIX+ recentred (found gland)``; :mod:`label_reg.recentre`).
"""
from absl import flags

from label_reg.commands import define_model_dir_flag, reject_positional

define_model_dir_flag()
flags.DEFINE_string("data_dir", None, "Paired dataset folder (default: the one the model was trained on).")
flags.DEFINE_string("cases_csv", None, "CSV with a 'case' column (and a 'split' column) choosing the cases.")
flags.DEFINE_string("split", "val", "With --cases_csv: the value of its 'split' column to evaluate ('' = all "
                                    "listed cases).")
flags.DEFINE_integer("fold", None, "Evaluate validation fold K of the model's k-fold split (num_folds and "
                                   "split_seed from its training run).", lower_bound=0)
flags.DEFINE_string("output_dir", None, "Folder for per_case.csv, summary.md and figures/.")
flags.DEFINE_boolean("figures", False, "Also write PNG figures of the best, median and worst case by DSC.")
flags.DEFINE_string("method", None, "Method name in the tables (default: from the loss weights: mDSC, SDM, MIX, "
                                    "MIX+). A trus_gland model's rows get ' (found gland)' and ' (true gland)' "
                                    "appended, as the default names do.")
flags.DEFINE_string("cache_dir", None, "Folder for pre-processed cases (default: OUT/.cache).")
flags.DEFINE_boolean("progress", True, "Print a line per case to stderr.")
flags.DEFINE_string("segmenter_dir", None, "TRUS gland segmenter model directory: adds the 'Coarse (found gland)' and "
                                           "'Coarse (true gland)' rows and the segmenter's scores to the evaluation "
                                           "of a trus_centre model (a trus_gland model uses the one it carries).")
flags.DEFINE_boolean("true_gland_model_row", False, "Also score the network on the TRUS gland centre of the TRUS "
                                                    "mask (row '<method> (true gland)'): the ceiling of the "
                                                    "found-gland pipeline.")
flags.DEFINE_integer("recentre_passes", 0, "Found-gland models: score the registration after this many re-centring "
                                        "passes (register again on the centre of the warped MR gland), as "
                                        "`label-reg register --recentre_passes` does.", lower_bound=0)
flags.mark_flags_as_required(["model_dir", "output_dir"])

FLAGS = flags.FLAGS


def main(argv):
    reject_positional(argv)
    from label_reg.evaluate import evaluate

    evaluate(FLAGS.model_dir, FLAGS.output_dir, data_dir=FLAGS.data_dir, cases_csv=FLAGS.cases_csv, split=FLAGS.split,
             fold=FLAGS.fold, method=FLAGS.method, cache_dir=FLAGS.cache_dir, figures=FLAGS.figures,
             progress=FLAGS.progress, segmenter_dir=FLAGS.segmenter_dir,
             true_gland_model_row=FLAGS.true_gland_model_row, recentre_passes=FLAGS.recentre_passes)
    return 0
