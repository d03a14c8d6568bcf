"""Every Triton kernel variant the dispatcher launches compiles for sm_90 and sm_80, without register
spills, on a machine without a GPU.

The launches are recorded from the real dispatcher: ``fused_replay_kl(impl="triton")`` forward and
backward runs on CPU tensors under the Triton interpreter while every kernel of ``selfreplay_fast.kernels``
is wrapped by a recorder. Each distinct launch is then specialized exactly as Triton's own launcher would
(its binder: argument types, 16-byte alignment and constant-1 specializations, constexprs, options) and
compiled for an NVIDIA target with the ptxas that Triton ships, whose ``-v`` report gives registers,
spills and shared memory. The two CPU-specific choices of the dispatcher are set to the GPU's while
recording: the wider tiles the interpreter prefers (``MAX_BLOCK_V_INTERPRETER``, ``SCALE_BLOCK_INTERPRETER``), and the fp32
gradient matmuls of 16-bit operands (``low_precision``, which CUDA tensors switch on), and the 16-bit
``tl.dot`` of the head matmul (``EXACT_FP32_DOT_INTERPRETER``; the interpreter's values are then wrong,
and not looked at). The hidden size reaches only the head matmul (fp32 master weights under autocast;
the other matmuls are cuBLAS's), as a runtime integer whose divisibility by 16 Triton specializes on, so
the headline cases (Llama-3-8B head) use its vocabulary, k and dtypes with a small D divisible by 16.

CI runs this file with the Triton of the main environment and with triton 3.6 (the GPU image's) in a
second one (.ci/run).
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import re
import subprocess
import sys

import pytest
import torch

triton = pytest.importorskip("triton")

import selfreplay_fast as sf  # noqa: E402
from selfreplay_fast import replay_kl  # noqa: E402
from selfreplay_fast.kernels import head_matmul, vocab_pass  # noqa: E402

KERNEL_MODULES = (vocab_pass, head_matmul)

# The cases run on the GPU where there is one, else on the CPU under the interpreter (tests/conftest.py).
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

TARGETS = [(90, "sm_90a"), (80, "sm_80")]


@dataclasses.dataclass(frozen=True)
class _Case:
    name: str
    n: int  # positions
    d: int
    v: int
    k: int
    dtype: torch.dtype
    mode: str = "tail"
    bias: bool = False
    temperature: float = 1.0
    train_weight: bool = True
    weight_dtype: torch.dtype = None  # the lm_head's dtype when it differs from hidden's (fp32 masters)
    autocast: bool = False  # under torch.autocast(dtype=dtype): fp32 masters launch the head matmul


CASES = [
    # Llama-3-8B's head as the kernels see it: V = 128256, k = 64, bf16 operands (fp32 logits, bf16 gradient)
    _Case("headline", 3, 16, 128256, 64, torch.bfloat16, train_weight=False),
    _Case("small_fp32", 5, 8, 61, 4, torch.float32, bias=True, temperature=0.7),
    _Case("odd_fp16_sampled", 7, 12, 1001, 7, torch.float16, mode="sampled"),
    _Case("fp64", 4, 8, 333, 5, torch.float64),
    _Case("k_above_slot_tile", 2, 8, 3000, 1500, torch.float32),
    _Case("k_equals_v", 3, 8, 40, 40, torch.bfloat16, temperature=2.0),
    # fp32 master weights under autocast: the head matmul (W rounded in registers), with and without bias,
    # at the headline's V (D = 4096 and V divisible by 16, as here) and at odd shapes
    _Case("headline_fp32_master", 3, 32, 128256, 64, torch.bfloat16, weight_dtype=torch.float32, autocast=True),
    _Case("fp32_master_bf16_autocast", 5, 40, 300, 8, torch.bfloat16, bias=True, weight_dtype=torch.float32,
          autocast=True),
    _Case("fp32_master_fp16_autocast", 3, 16, 129, 4, torch.float16, weight_dtype=torch.float32, autocast=True),
    # mode="topk": its row-terms kernel over the headline's k slots; fp16 operands launch it in forward
    # without gradients and again in backward with them; fp64
    _Case("headline_topk", 3, 16, 128256, 64, torch.bfloat16, mode="topk"),
    _Case("odd_fp16_topk", 5, 12, 333, 7, torch.float16, mode="topk", bias=True, temperature=0.7),
    _Case("fp64_topk", 4, 8, 61, 5, torch.float64, mode="topk"),
]


class _Recorder:
    """Stands in for a kernel: records each launch's arguments, then runs it."""

    def __init__(self, name, kernel, launches):
        self.name, self.kernel, self.launches = name, kernel, launches

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append((self.name, args, kwargs))
            return self.kernel[grid](*args, **kwargs)

        return launch


def _kernels(module):
    return {name: obj for name, obj in vars(module).items() if hasattr(obj, "fn") and hasattr(obj, "__getitem__")
            and callable(getattr(obj, "fn"))}


def _all_kernels():
    """{name: kernel} of every module in KERNEL_MODULES (names are unique across them)."""
    kernels = {}
    for module in KERNEL_MODULES:
        for name, kernel in _kernels(module).items():
            assert name not in kernels, f"kernel name {name} in two modules"
            kernels[name] = (module, kernel)
    return kernels


def _run_case(case: _Case) -> None:
    g = torch.Generator().manual_seed(0)
    param_dtype = case.weight_dtype or case.dtype
    hidden = (torch.randn(case.n, case.d, generator=g) * 2).to(DEVICE, case.dtype).requires_grad_()
    weight = torch.randn(case.v, case.d, generator=g).to(DEVICE, param_dtype).requires_grad_(case.train_weight)
    bias = torch.randn(case.v, generator=g).to(DEVICE, param_dtype).requires_grad_() if case.bias else None
    ids = torch.stack([torch.randperm(case.v, generator=g)[: case.k] for _ in range(case.n)])
    ids[0, case.k // 2:] = -1  # padded slots
    logprobs = torch.randn(case.n, case.k, generator=g).log_softmax(-1) - 0.5
    logprobs = torch.where(ids >= 0, logprobs, 0.0)
    mask = torch.ones(case.n, dtype=torch.bool)
    mask[-1] = case.n == 1
    ids, logprobs, mask = ids.to(DEVICE), logprobs.to(DEVICE), mask.to(DEVICE)
    with torch.autocast(DEVICE, dtype=case.dtype, enabled=case.autocast):
        loss = sf.fused_replay_kl(hidden, weight, ids, logprobs, bias=bias, mask=mask, mode=case.mode,
                                  temperature=case.temperature, impl="triton")
    loss.backward()


@pytest.fixture(scope="module")
def launches():
    """(kernel name, args, kwargs) of every launch of every case, recorded from the dispatcher."""
    recorded = []
    saved = _all_kernels()
    cap, scale_cap, apply = vocab_pass.MAX_BLOCK_V_INTERPRETER, vocab_pass.SCALE_BLOCK_INTERPRETER, replay_kl._apply
    exact_dot = head_matmul.EXACT_FP32_DOT_INTERPRETER
    assert _kernels(vocab_pass) and _kernels(head_matmul), "no Triton kernels found in selfreplay_fast.kernels"

    def apply_as_on_cuda(inp, impl, chunk_size, low_precision, vocab=replay_kl._WHOLE_VOCAB):
        return apply(inp, impl, chunk_size, True, vocab)  # fused_replay_kl passes hidden.is_cuda

    try:
        vocab_pass.MAX_BLOCK_V_INTERPRETER = vocab_pass.MAX_BLOCK_V  # the tiles the wrappers pick on a GPU
        vocab_pass.SCALE_BLOCK_INTERPRETER = vocab_pass.SCALE_BLOCK
        head_matmul.EXACT_FP32_DOT_INTERPRETER = False  # the 16-bit tl.dot a GPU runs (values not checked)
        replay_kl._apply = apply_as_on_cuda
        for name, (module, kernel) in saved.items():
            setattr(module, name, _Recorder(name, kernel, recorded))
        for case in CASES:
            _run_case(case)
    finally:
        vocab_pass.MAX_BLOCK_V_INTERPRETER, vocab_pass.SCALE_BLOCK_INTERPRETER, replay_kl._apply = cap, scale_cap, apply
        head_matmul.EXACT_FP32_DOT_INTERPRETER = exact_dot
        for name, (module, kernel) in saved.items():
            setattr(module, name, kernel)
    return recorded, {name: kernel for name, (_, kernel) in saved.items()}


def _specialize(jit_fn, backend, args, kwargs):
    """(signature, constexprs, attrs, options) as Triton's launcher computes them for these arguments."""
    from triton.runtime.jit import create_function_from_signature

    binder = create_function_from_signature(jit_fn.signature, jit_fn.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = jit_fn._pack_args(backend, kwargs, bound, specialization, options)
    return signature, constexprs, attrs, options


def _ptxas_report(ptx: str, arch: str, directory: str) -> dict:
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    path = os.path.join(directory, "kernel.ptx")
    with open(path, "w") as handle:
        handle.write(ptx)
    done = subprocess.run([ptxas, "-v", "--gpu-name", arch, path, "-o", os.devnull], capture_output=True,
                          text=True, timeout=120)
    if done.returncode != 0:
        return {"error": done.stderr}
    report = done.stderr
    registers = re.search(r"Used (\d+) registers", report)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
    if not (registers and spills):
        return {"error": f"unreadable ptxas report: {report}"}
    return {"registers": int(registers.group(1)), "spill_stores": int(spills.group(1)),
            "spill_loads": int(spills.group(2))}


def _compile_variants(variants_path: str, out_path: str) -> None:
    """Child process (no interpreter: it patches triton.language for good once a kernel is interpreted):
    compile each variant for its target and write the ptxas reports."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    with open(variants_path, "rb") as handle:
        variants = pickle.load(handle)
    kernels = {name: kernel for name, (_, kernel) in _all_kernels().items()}
    results = []
    for name, capability, arch, signature, constexprs, attrs, options in variants:
        try:
            compiled = triton.compile(ASTSource(kernels[name], signature, constexprs, attrs),
                                      target=GPUTarget("cuda", capability, 32), options=options)
            report = _ptxas_report(compiled.asm["ptx"], arch, os.path.dirname(out_path))
            report["shared_bytes"] = compiled.metadata.shared
        except Exception as exc:  # reported, and failed on, by the test
            report = {"error": f"{type(exc).__name__}: {exc}"}
        results.append(report)
    with open(out_path, "wb") as handle:
        pickle.dump(results, handle)


def test_every_launched_kernel_variant_compiles_for_sm90_and_sm80_without_spills(launches, tmp_path):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import JITFunction

    recorded, kernels = launches
    names = {name for name, _, _ in recorded}
    assert names == set(kernels), f"the cases launch {sorted(names)} of {sorted(kernels)}: add a case"
    jit = {name: JITFunction(kernel.fn) for name, kernel in kernels.items()}
    variants, described = [], []
    for capability, arch in TARGETS:
        backend = make_backend(GPUTarget("cuda", capability, 32))
        seen = set()
        for name, args, kwargs in recorded:
            signature, constexprs, attrs, options = _specialize(jit[name], backend, args, kwargs)
            key = (name, tuple(signature.items()), tuple(sorted(constexprs.items())), repr(sorted(attrs.items())),
                   options.num_warps)
            if key not in seen:
                seen.add(key)
                variants.append((name, capability, arch, signature, constexprs, attrs, options.__dict__))
                consts = {jit[name].arg_names[path[0]]: value for path, value in constexprs.items()
                          if jit[name].params[path[0]].is_constexpr}
                described.append(f"{arch} {name}({signature[jit[name].arg_names[0]]}, {consts}, "
                                 f"num_warps={options.num_warps})")
    with open(tmp_path / "variants.pkl", "wb") as handle:
        pickle.dump(variants, handle)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, os.path.abspath(__file__), str(tmp_path / "variants.pkl"),
                           str(tmp_path / "reports.pkl")], env=env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    with open(tmp_path / "reports.pkl", "rb") as handle:
        reports = pickle.load(handle)
    print(f"\ntriton {triton.__version__}: {len(variants)} kernel variants")
    for what, report in zip(described, reports):
        print(f"  {what}: " + (report["error"] if "error" in report else
              f"{report['registers']} registers, {report['spill_stores']}/{report['spill_loads']} bytes spill "
              f"stores/loads, {report['shared_bytes']} bytes shared memory"))
    failed = [(what, report["error"]) for what, report in zip(described, reports) if "error" in report]
    assert not failed, f"compile errors: {failed}"
    spilled = [what for what, report in zip(described, reports) if report["spill_stores"] or report["spill_loads"]]
    assert not spilled, f"register spills: {spilled}"
    assert {arch for _, _, arch, *_ in variants} == {arch for _, arch in TARGETS}
    # the headline launches were among them: the GPU's vocabulary tile over V = 128256
    tiles = [v[4].get((jit[v[0]].arg_names.index("BLOCK_V"),)) for v in variants if "BLOCK_V" in jit[v[0]].arg_names]
    assert vocab_pass.MAX_BLOCK_V in tiles

if __name__ == "__main__":
    _compile_variants(sys.argv[1], sys.argv[2])
