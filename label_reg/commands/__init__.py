"""One module per ``label-reg`` subcommand (see :mod:`label_reg.cli`), and the flag helpers they share.

* :func:`define_model_dir_flag`: ``--model_dir`` (a model directory written by ``label-reg train``), spelled the
  same in every subcommand; ``--model`` is kept as an alias.
* :func:`reject_positional`: the one-line error for stray positional arguments.
"""
from label_reg.errors import InputError


def define_model_dir_flag(flag_values=None):
    """``--model_dir`` (required by the subcommand itself), with ``--model`` as an alias (the old spelling)."""
    from absl import flags

    flag_values = flags.FLAGS if flag_values is None else flag_values
    flags.DEFINE_string("model_dir", None, "Model directory written by `label-reg train`.", flag_values=flag_values)
    flags.DEFINE_alias("model", "model_dir", flag_values=flag_values)


def reject_positional(argv):
    """InputError for positional arguments after the subcommand (every option is a --flag)."""
    if len(argv) > 1:
        raise InputError(" ".join(argv[1:]), "unexpected positional argument(s); all options are --flags")
