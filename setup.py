"""Build script for selfreplay-fast.

The Triton kernels live in the top-level ``kernels/`` folder of the repository and are installed as
``selfreplay_fast.kernels`` (never as a top-level ``kernels`` package: that name belongs to another
PyPI project).
"""

from setuptools import setup

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
    packages=["selfreplay_fast", "selfreplay_fast.kernels"],
    package_dir={"selfreplay_fast": "selfreplay_fast", "selfreplay_fast.kernels": "kernels"},
    install_requires=[
        # A range, not a pin: install the torch build you want first (CUDA or CPU); pip keeps it.
        "torch>=2.4",
        "triton>=3.2; platform_system == 'Linux' and platform_machine == 'x86_64'",
        "transformers>=4.45",
        "safetensors>=0.4",
        "tqdm>=4.60",
    ],
    extras_require={
        "test": ["pytest>=7", "numpy", "scipy"],
        "bench": ["matplotlib"],
        "flash": ["flash-attn"],
    },
    entry_points={"console_scripts": ["selfreplay=selfreplay_fast.cli:main"]},
)
