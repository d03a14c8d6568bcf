"""Test configuration: without a GPU, Triton kernels run under the Triton interpreter on the CPU."""

import os

import torch

if not torch.cuda.is_available():
    # Must be set before triton is first imported anywhere in the test session.
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def device_for(impl: str) -> str:
    """Where an implementation's tests run: Triton on the GPU when there is one (the interpreter is
    then off), everything else on the CPU."""
    return "cuda" if impl == "triton" and torch.cuda.is_available() else "cpu"
