"""The vLLM row of ``bench_generate``, run in the interpreter that has vLLM (a venv of its own: vLLM pins
its own torch and transformers, see .ci/run).

``bench_generate`` saves its model with ``save_pretrained`` and starts this module as a worker in that
interpreter (:class:`VllmWorker`). The worker builds one engine (its start-up is not timed), warms it up,
then answers each ``run`` line on stdin with one timed ``generate_replay(..., backend="vllm")`` into a fresh
temporary folder: generated tokens per second and the bytes the buffer's files hold. The rounds stay
interleaved with the in-process contenders, so a burst of load on a shared machine hits all of them alike.
vLLM logs to stdout too, so the worker's answers are the lines that start with :data:`MARK`.

    python -m benchmarks.vllm_row --model DIR --batch-size 32 --max-new-tokens 64 --top-k 64   # the worker
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

MARK = "BENCH_VLLM_ROW "
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_VENV_PYTHON = os.path.join(REPO, ".venv-vllm", "bin", "python")


def find_vllm_python(explicit=None):
    """(interpreter, None) for one that can import vllm, else (None, the reason, for the printed skip).

    ``explicit`` (``--vllm-python``) is checked alone; otherwise the repository's .venv-vllm, then this
    interpreter."""
    if explicit:
        candidates = [explicit]
    else:
        candidates = [p for p in (DEFAULT_VENV_PYTHON, sys.executable) if os.path.exists(p)]
    reasons = []
    for python in candidates:
        if not os.path.exists(python):
            reasons.append(f"{python} does not exist")
            continue
        if os.path.abspath(python) == os.path.abspath(sys.executable):
            if importlib.util.find_spec("vllm") is not None:
                return python, None
        else:
            probe = subprocess.run([python, "-c", "import importlib.util, sys; sys.exit(importlib.util.find_spec('vllm') is None)"],
                                   capture_output=True)
            if probe.returncode == 0:
                return python, None
        reasons.append(f"{python} cannot import vllm")
    if not explicit:
        reasons.append(f"build {DEFAULT_VENV_PYTHON} as .ci/run does, or pass --vllm-python")
    return None, "; ".join(reasons)


class VllmWorker:
    """A worker process holding one vLLM engine; :meth:`run` times one generation, as bench_generate's
    in-process contenders do: returns (generated tokens / s, extra facts)."""

    def __init__(self, python, model_dir, *, batch_size, max_new_tokens, top_k, engine_args):
        env = dict(os.environ)
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; the default asks for much of the RAM
        self._stderr = tempfile.TemporaryFile(mode="w+")
        cmd = [python, "-m", "benchmarks.vllm_row", "--model", model_dir, "--batch-size", str(batch_size),
               "--max-new-tokens", str(max_new_tokens), "--top-k", str(top_k), "--engine-args", json.dumps(engine_args)]
        self._proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      stderr=self._stderr, text=True, bufsize=1)
        self.ready = self._answer()

    def _answer(self):
        for line in self._proc.stdout:
            if line.startswith(MARK):
                answer = json.loads(line[len(MARK):])
                if "error" in answer:
                    raise RuntimeError(f"vLLM worker: {answer['error']}")
                return answer
        self._proc.wait()
        self._stderr.seek(0)
        last = (self._stderr.read().strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"vLLM worker exited ({self._proc.returncode}): {last}")

    def run(self):
        self._proc.stdin.write("run\n")
        self._proc.stdin.flush()
        answer = self._answer()
        return answer.pop("tokens_per_s"), answer

    def close(self):
        if self._proc.poll() is None:
            self._proc.stdin.close()  # EOF: the worker shuts its engine down and exits
            try:
                self._proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._stderr.close()


def _timed_generation(llm, args, max_new_tokens):
    from selfreplay_fast.generation import generate_replay
    from benchmarks.machine import written_bytes

    folder = tempfile.mkdtemp(prefix="bench_vllm_")
    try:
        start = time.perf_counter()
        buffer = generate_replay(llm, num_sequences=args.batch_size, max_new_tokens=max_new_tokens, top_k=args.top_k,
                                 batch_size=args.batch_size, shard_size=args.batch_size, progress=False, eos_token_id=[],
                                 out_dir=os.path.join(folder, "replay"), backend="vllm")
        seconds = time.perf_counter() - start
        generated = buffer.num_tokens - len(buffer)  # every sequence starts with one BOS
        if generated != args.batch_size * max_new_tokens:
            raise RuntimeError(f"vLLM generated {generated} tokens, expected {args.batch_size * max_new_tokens}")
        size = written_bytes(folder)
        return {"tokens_per_s": generated / seconds, "bytes_written": size, "bytes_per_token": size / generated}
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _say(answer):
    print(MARK + json.dumps(answer), flush=True)


def worker_main(argv=None):
    parser = argparse.ArgumentParser(description="the vLLM row of bench_generate (a worker; see the module docstring)")
    parser.add_argument("--model", required=True)
    parser.add_argument("--batch-size", type=int, required=True)
    parser.add_argument("--max-new-tokens", type=int, required=True)
    parser.add_argument("--top-k", type=int, required=True)
    parser.add_argument("--engine-args", default="{}", help="JSON dict of vllm.LLM arguments")
    args = parser.parse_args(argv)
    try:
        import vllm

        from selfreplay_fast.generation.vllm_backend import build_llm

        start = time.perf_counter()
        llm = build_llm(args.model, top_k=args.top_k, max_num_seqs=args.batch_size,
                        engine_args=json.loads(args.engine_args))
        startup = time.perf_counter() - start
        _timed_generation(llm, args, 4)  # warm-up
    except Exception as exc:  # the parent prints it as the reason the row is missing
        _say({"error": f"{type(exc).__name__}: {exc}"})
        return 1
    import torch
    import transformers

    # its own venv: its versions are not the parent's
    _say({"ready": True, "vllm": vllm.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
          "engine_startup_s": startup})
    for line in sys.stdin:
        if line.strip() != "run":
            continue
        try:
            _say(_timed_generation(llm, args, args.max_new_tokens))
        except Exception as exc:
            _say({"error": f"{type(exc).__name__}: {exc}"})
    del llm
    return 0


if __name__ == "__main__":
    sys.exit(worker_main())
