"""The ``label-reg`` console script: ``label-reg <subcommand> [--flags]``.

Each subcommand lives in ``label_reg/commands/<name>.py``, defines its absl flags at module level and a
``main(argv)``. Only the chosen subcommand's module is imported, so flags of different subcommands never clash.
An :class:`label_reg.errors.InputError` becomes one line on stderr and exit status 2.
"""
import importlib
import sys

SUBCOMMANDS = {
    "train": "Train a registration network (absl flags; see experiments/*.flags).",
    "train-segmenter": "Train the TRUS gland segmenter used by the trus_gland pre-alignment.",
    "register": "Register an MR volume to a TRUS volume with a trained model; outputs in TRUS world space.",
    "evaluate": "Score a model on a dataset: per-case CSV and a summary table.",
    "export": "Write a TF Serving SavedModel from a model directory.",
    "compare": "Print our results beside the paper's Table 1 and score legacy NiftyNet outputs.",
    "phantoms": "Write synthetic MR/TRUS phantom pairs with a known deformation.",
}


def _usage():
    lines = ["usage: label-reg <subcommand> [--flags]   (label-reg <subcommand> --helpfull for all flags)", ""]
    lines += [f"  {name:<15} {text}" for name, text in SUBCOMMANDS.items()]
    return "\n".join(lines)


def main(argv=None):
    argv = list(sys.argv if argv is None else argv)
    if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
        print(_usage())
        return 0 if len(argv) >= 2 else 2
    name = argv[1]
    if name not in SUBCOMMANDS:
        print(f"label-reg: unknown subcommand {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    try:
        module = importlib.import_module(f"label_reg.commands.{name.replace('-', '_')}")
    except ModuleNotFoundError as err:
        if err.name == f"label_reg.commands.{name.replace('-', '_')}":
            print(f"label-reg: subcommand {name!r} is not available in this version", file=sys.stderr)
            return 2
        raise
    from absl import app

    from label_reg.errors import InputError

    def run(args):
        if not any(a.startswith(("--verbosity", "-v")) for a in argv[2:]):
            from absl import logging
            logging.set_verbosity(logging.WARNING)  # TensorFlow's INFO chatter hides the progress bar
        try:
            return module.main(args)
        except InputError as err:
            print(f"label-reg {name}: error: {err}", file=sys.stderr)
            sys.exit(2)

    app.run(run, argv=[f"label-reg {name}"] + argv[2:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
