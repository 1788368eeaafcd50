"""The ``label-reg`` console script: ``label-reg <subcommand> [--flags]``.

Each subcommand lives in ``label_reg/commands/<name>.py``, defines its absl flags at module level and a
``main(argv)``. Only the chosen subcommand's module is imported, so flags of different subcommands never clash.
An :class:`label_reg.errors.InputError` (or ``OutputError``) becomes one line on stderr and exit status 2.
``label-reg <subcommand> --help`` lists that subcommand's flags. What TensorFlow's C++ libraries print to stderr
while they load (not reachable through ``TF_CPP_MIN_LOG_LEVEL``) is swallowed, so an error stays one line.
"""
import contextlib
import importlib
import importlib.abc
import importlib.util
import os
import sys
import tempfile

SUBCOMMANDS = {
    "train": "Train a registration network (absl flags; see experiments/*.flags).",
    "train-segmenter": "Train the TRUS gland segmenter used by the trus_gland pre-alignment.",
    "register": "Register an MR volume to a TRUS volume with a trained model; outputs in TRUS world space.",
    "evaluate": "Score a model on a dataset: per-case CSV and a summary table.",
    "export": "Write a TF Serving SavedModel from a model directory.",
    "compare": "Print our results beside the paper's Table 1 and score legacy NiftyNet outputs.",
    "phantoms": "Write synthetic MR/TRUS phantom pairs with a known deformation.",
}
HELP_FLAGS = ("-h", "--help", "-?", "--helpshort")


def _usage():
    lines = ["usage: label-reg <subcommand> [--flags]   (label-reg <subcommand> --help for its flags)", ""]
    lines += [f"  {name:<15} {text}" for name, text in SUBCOMMANDS.items()]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ quiet TF import
@contextlib.contextmanager
def _stderr_captured():
    """Point file descriptor 2 at a temporary file for the duration; replay what was written if the body raises."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        except BaseException:
            os.dup2(saved, 2)
            capture.seek(0)
            sys.stderr.buffer.write(capture.read())
            sys.stderr.flush()
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


class _QuietLoader(importlib.abc.Loader):
    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        module.__loader__ = self._loader
        with _stderr_captured():
            self._loader.exec_module(module)

    def __getattr__(self, name):
        return getattr(self._loader, name)


class _QuietTensorFlowImport(importlib.abc.MetaPathFinder):
    """On the first ``import tensorflow``, wherever it happens, load it with stderr captured: its C++ libraries
    print absl's "All log messages before absl::InitializeLog()" and oneDNN's start-up notice there, twice."""

    def find_spec(self, name, path=None, target=None):
        if name != "tensorflow":
            return None
        with contextlib.suppress(ValueError):
            sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            spec.loader = _QuietLoader(spec.loader)
        return spec


def quiet_tensorflow_import():
    """Install :class:`_QuietTensorFlowImport` (once; nothing to do when TensorFlow is already imported)."""
    if "tensorflow" not in sys.modules and not any(isinstance(f, _QuietTensorFlowImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _QuietTensorFlowImport())


# ------------------------------------------------------------------------------------------------ help
def _print_help(name, module, own_flags):
    """The subcommand's docstring and its own flags (absl's --help shows only the main module's, none here)."""
    from absl import flags
    for flag in own_flags:
        flags.FLAGS.register_key_flag_for_module(module.__name__, flag)
    print(f"usage: label-reg {name} [--flags]\n")
    print((module.__doc__ or SUBCOMMANDS[name]).strip())
    print(f"\nflags of label-reg {name}:")
    print(flags.FLAGS.module_help(module.__name__))
    print(f"\n(label-reg {name} --helpfull also lists absl's own flags)")


def main(argv=None):
    argv = list(sys.argv if argv is None else argv)
    if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
        print(_usage())
        return 0 if len(argv) >= 2 else 2
    name = argv[1]
    if name not in SUBCOMMANDS:
        print(f"label-reg: unknown subcommand {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    quiet_tensorflow_import()
    from absl import app, flags
    from absl import logging as _absl_logging  # noqa: F401  (its flags are absl's, not the subcommand's)
    known = set(flags.FLAGS)
    try:
        module = importlib.import_module(f"label_reg.commands.{name.replace('-', '_')}")
    except ModuleNotFoundError as err:
        if err.name == f"label_reg.commands.{name.replace('-', '_')}":
            print(f"label-reg: subcommand {name!r} is not available in this version", file=sys.stderr)
            return 2
        raise
    if any(a in HELP_FLAGS for a in argv[2:]):
        own = [flags.FLAGS[f] for f in flags.FLAGS if f not in known]
        try:
            _print_help(name, module, own)
        except BrokenPipeError:  # `label-reg train --help | head`
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0

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
