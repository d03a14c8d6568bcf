"""The built wheel holds every module of the package (an editable install finds them on disk either way,
so only a real build shows a subpackage missing from setup.py)."""

import os
import shutil
import subprocess
import sys
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _source_modules():
    found = set()
    for folder, installed_as in (("selfreplay_fast", "selfreplay_fast"), ("kernels", "selfreplay_fast/kernels")):
        for directory, dirs, files in os.walk(os.path.join(ROOT, folder)):
            dirs[:] = [d for d in dirs if d != "__pycache__"]
            rel = os.path.relpath(directory, os.path.join(ROOT, folder))
            prefix = installed_as if rel == "." else f"{installed_as}/{rel}"
            found.update(f"{prefix}/{name}" for name in files if name.endswith(".py"))
    return found


def test_wheel_contains_every_module(tmp_path):
    # Built from a copy: setuptools builds in the source tree's build/, whose leftovers would end up in the wheel.
    source = tmp_path / "source"
    source.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md", "selfreplay_fast", "kernels"):
        copy = shutil.copytree if os.path.isdir(os.path.join(ROOT, name)) else shutil.copy
        copy(os.path.join(ROOT, name), source / name, **({"ignore": shutil.ignore_patterns("__pycache__", "*.so")}
                                                        if copy is shutil.copytree else {}))
    env = dict(os.environ, SELFREPLAY_FAST_NO_EXTENSION="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-build-isolation", "--no-deps", "-w",
                    str(tmp_path), str(source)], check=True, env=env, cwd=tmp_path)
    (wheel,) = [name for name in os.listdir(tmp_path) if name.endswith(".whl")]
    with zipfile.ZipFile(tmp_path / wheel) as archive:
        packaged = {name for name in archive.namelist() if name.endswith(".py")}
    missing = sorted(_source_modules() - packaged)
    assert not missing, f"setup.py does not package {missing}"
    assert "selfreplay_fast/commands/generate.py" in packaged
