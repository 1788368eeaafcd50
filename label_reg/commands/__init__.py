"""One module per ``label-reg`` subcommand; see :mod:`label_reg.cli`."""
