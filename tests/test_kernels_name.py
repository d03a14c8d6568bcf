"""The repository's kernels/ folder never stands in for the top-level PyPI package ``kernels``.

transformers >= 5.25 depends on that package and imports it while importing any model; a checkout's
kernels/ folder is first on sys.path whenever the repository root is (``python -m pytest``, ``python -m
benchmarks``), and used to shadow it, so that ``from transformers import LlamaForCausalLM`` failed.
"""

import importlib.metadata
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_from_root(code, *, isolated_path=False):
    # isolated_path: sys.path is the repository root and the standard library only, so that no installed
    # `kernels` distribution can be found, whatever this environment has.
    prefix = ""
    if isolated_path:
        prefix = ("import sys, sysconfig; "
                  "sys.path[:] = ['', sysconfig.get_paths()['stdlib'], sysconfig.get_paths()['platstdlib']]\n")
    return subprocess.run([sys.executable, "-c", prefix + code], cwd=ROOT, capture_output=True, text=True)


def _installed_kernels_dir():
    try:
        distribution = importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        return None
    return os.path.realpath(str(distribution.locate_file("kernels")))


_NAMESPACE_PROBE = (
    "import kernels\n"
    "print(getattr(kernels, '__file__', None), list(kernels.__path__), getattr(kernels, '__version__', None))\n"
    "print(sorted(n for n in vars(kernels) if not n.startswith('__')))\n"
    "try:\n import kernels.vocab_pass\nexcept ModuleNotFoundError:\n print('ours unreachable')\n")


def test_top_level_kernels_is_the_other_package_or_an_empty_namespace():
    installed = _installed_kernels_dir()
    if installed is None:  # what transformers < 5.25 reads as "not installed" (no __file__, no version)
        result = _run_from_root(_NAMESPACE_PROBE)
        assert result.returncode == 0, result.stderr
        assert result.stdout.split("\n")[:3] == ["None [] None", "[]", "ours unreachable"]
    else:
        result = _run_from_root("import kernels, os; print(os.path.realpath(os.path.dirname(kernels.__file__)))")
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == installed
        assert result.stdout.strip() != os.path.realpath(os.path.join(ROOT, "kernels"))


def test_without_the_other_package_top_level_kernels_is_an_empty_namespace():
    result = _run_from_root(_NAMESPACE_PROBE, isolated_path=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:3] == ["None [] None", "[]", "ours unreachable"]


def test_transformers_model_imports_from_the_repository_root():
    result = _run_from_root(
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "import selfreplay_fast.kernels as ours, os\n"
        "print(os.path.realpath(os.path.dirname(ours.__file__)))")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith(os.path.join("", "kernels"))
