"""Import a script from ``tools/`` (not a package) as a module, for the tests that call its functions."""
import importlib.util
import pathlib
import sys

TOOLS = pathlib.Path(__file__).resolve().parents[1] / "tools"


def load_tool(script, module_name):
    """Execute ``tools/<script>`` as module ``module_name`` (registered in ``sys.modules``) and return it."""
    spec = importlib.util.spec_from_file_location(module_name, TOOLS / script)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
