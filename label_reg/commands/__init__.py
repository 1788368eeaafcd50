"""One module per ``label-reg`` subcommand (see :mod:`label_reg.cli`), and the flag helpers they share.

* :func:`define_config_flags` / :func:`config_from_flags`: one absl flag per field of a configuration dataclass
  (:class:`label_reg.train.TrainConfig`), its default and help text taken from the field
  (:func:`label_reg.trainer.option`), so the flags and the config cannot drift apart.
* :func:`define_model_dir_flag`: ``--model_dir`` (a model directory written by ``label-reg train``), spelled the
  same in every subcommand; ``--model`` is kept as an alias.
* :func:`reject_positional`: the one-line error for stray positional arguments.
"""
import dataclasses

from label_reg.errors import InputError


def define_config_flags(config_cls, flag_values=None):
    """Define an absl flag for every field of the dataclass ``config_cls``: string, float, integer, boolean, or a
    comma-separated list for tuple fields; fields without a default are required flags. Help text: the field's
    ``metadata["help"]`` (see :func:`label_reg.trainer.option`)."""
    from absl import flags

    flag_values = flags.FLAGS if flag_values is None else flag_values
    required = []
    for field in dataclasses.fields(config_cls):
        help_text = field.metadata.get("help", field.name)
        default = None if field.default is dataclasses.MISSING else field.default
        if default is None:
            flags.DEFINE_string(field.name, None, help_text, flag_values=flag_values)
            required.append(field.name)
        elif isinstance(default, bool):
            flags.DEFINE_boolean(field.name, default, help_text, flag_values=flag_values)
        elif isinstance(default, int):
            flags.DEFINE_integer(field.name, default, help_text, flag_values=flag_values)
        elif isinstance(default, float):
            flags.DEFINE_float(field.name, default, help_text, flag_values=flag_values)
        elif isinstance(default, str):
            flags.DEFINE_string(field.name, default, help_text, flag_values=flag_values)
        elif isinstance(default, tuple):
            flags.DEFINE_list(field.name, [str(v) for v in default], help_text, flag_values=flag_values)
        else:
            raise TypeError(f"{config_cls.__name__}.{field.name}: no flag type for {type(default).__name__}")
    flags.mark_flags_as_required(required, flag_values=flag_values)


def config_from_flags(config_cls, flag_values=None, **overrides):
    """An instance of ``config_cls`` from the flags :func:`define_config_flags` defined (tuple fields converted
    element-wise to the type of their default's elements); ``overrides`` replace flag values. A value that does
    not convert raises InputError naming the flag."""
    from absl import flags

    flag_values = flags.FLAGS if flag_values is None else flag_values
    values = {}
    for field in dataclasses.fields(config_cls):
        value = flag_values[field.name].value
        if isinstance(field.default, tuple):
            kind = type(field.default[0]) if field.default else str
            try:
                value = tuple(kind(v) for v in value)
            except ValueError:
                raise InputError(f"--{field.name}", f"expected {kind.__name__} values, got {value!r}") from None
        values[field.name] = value
    values.update(overrides)
    return config_cls(**values)


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
