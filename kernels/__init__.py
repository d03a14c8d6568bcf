"""Triton kernels of selfreplay-fast, installed as ``selfreplay_fast.kernels``.

The name ``kernels`` belongs to another PyPI package (Hugging Face's hub kernels, which transformers
>= 5.25 requires and imports). Whenever the repository root is on ``sys.path`` (``python -m pytest``,
``python -m benchmarks`` or ``python -c`` run from a checkout), this folder would shadow it and break
``import transformers``. So when this file is imported under the top-level name, it hands the import on to
the package of that name found elsewhere on ``sys.path``, or, if there is none, leaves an empty namespace
module in its place.
"""

if __name__ == "kernels":
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _this_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def _is_this_root(entry):
        try:
            return os.path.samefile(entry or os.getcwd(), _this_root)
        except OSError:
            return False

    _spec = importlib.machinery.PathFinder.find_spec(
        "kernels", [entry for entry in sys.path if not _is_this_root(entry)]
    )
    if _spec is None or _spec.loader is None:
        # No such package installed: an empty namespace module (no __file__, no __path__ entries, nothing of
        # this folder reachable), the way a PEP 420 folder shadowing on sys.path looks. transformers < 5.25
        # probes for the package by importing it and takes exactly that as "not installed"; raising here
        # would fail its probe and with it `import transformers`.
        _spec = importlib.machinery.ModuleSpec("kernels", None, is_package=True)
        sys.modules["kernels"] = importlib.util.module_from_spec(_spec)
    else:
        _module = importlib.util.module_from_spec(_spec)
        # The other package's own `import kernels.x` must find it, not this folder, while it initializes;
        # the import system returns whatever sys.modules["kernels"] holds once this file has run.
        sys.modules["kernels"] = _module
        try:
            _spec.loader.exec_module(_module)
        except BaseException:
            del sys.modules["kernels"]
            raise
