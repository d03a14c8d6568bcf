"""Test configuration: without a GPU, Triton kernels run under the Triton interpreter on the CPU; the vLLM
tests share one engine (the fixture vllm_engine)."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Must be set before triton is first imported anywhere in the test session.
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def device_for(impl: str) -> str:
    """Where an implementation's tests run: Triton on the GPU when there is one (the interpreter is
    then off), everything else on the CPU."""
    return "cuda" if impl == "triton" and torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="session")
def vllm_engine(tmp_path_factory):
    """(model directory, the float32 model saved there, a vllm.LLM of it), shared by every vLLM test file of
    the session: an engine starts in ~30 s on 2 cores. vllm_cases is imported only here, when a vLLM test
    asks for the engine, so the rest of the suite never imports vLLM."""
    from vllm_cases import build_engine

    path, model, llm = build_engine(str(tmp_path_factory.mktemp("vllm") / "model"))
    yield path, model, llm
    del llm
