"""Helper of tests/test_vllm_resume.py: ``generate_replay(model_dir, backend="vllm")`` in a process of its
own, killed with SIGKILL right after shard ``kill_after`` is written (-1: never).

argv: model_dir out_dir kill_after engine_args_json [rank world_size] (data parallel: this process is that
rank and builds its own engine). The engine runs in this process
(VLLM_ENABLE_V1_MULTIPROCESSING=0), so the kill leaves no engine process behind.
"""

import json
import os
import signal
import sys


def main():
    model_dir, out_dir, kill_after, engine_args = sys.argv[1], sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4])
    rank, world_size = (int(sys.argv[5]), int(sys.argv[6])) if len(sys.argv) > 6 else (None, None)
    from selfreplay_fast.generation import generate_replay

    def kill(shard, _):
        if shard == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)  # abrupt death: no cleanup, no finally blocks

    generate_replay(model_dir, num_sequences=10, max_new_tokens=6, top_k=3, shard_size=3, seed=11, out_dir=out_dir,
                    progress=False, keep_in_memory=False, on_shard_written=kill, backend="vllm",
                    vllm_engine_args=engine_args, rank=rank, world_size=world_size)


if __name__ == "__main__":
    main()
