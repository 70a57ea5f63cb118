"""Triton kernels of fused-gates (installed as ``fused_gates.kernels``).

In a checkout this folder sits at the repository's root, where ``python -m ...`` (pytest, the training script) puts
the working directory first on ``sys.path``: there it would shadow the PyPI package ``kernels`` (Hugging Face's kernel
hub, a dependency of transformers since 5.25), which transformers imports as ``from kernels import ...``. Imported
under that top-level name, this file hands the name to the installed package, or fails as a missing module would.
"""

if __name__ == "kernels":
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _checkout_root = os.path.realpath(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    _other_entries = [entry for entry in sys.path if os.path.realpath(entry or os.curdir) != _checkout_root]
    _installed = importlib.machinery.PathFinder.find_spec("kernels", _other_entries)
    if _installed is None or _installed.loader is None:
        raise ModuleNotFoundError(
            "No module named 'kernels': the kernels/ folder of this checkout is the package fused_gates.kernels",
            name="kernels",
        )
    _module = importlib.util.module_from_spec(_installed)
    sys.modules["kernels"] = _module  # the import statement returns what sys.modules holds once this file has run
    _installed.loader.exec_module(_module)
