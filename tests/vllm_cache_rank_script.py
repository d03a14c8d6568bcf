"""Helper of tests/test_vllm_teacher_cache.py: one rank of a data-parallel
``build_teacher_cache(model_dir, cache_corpus(), 3, out_dir, backend="vllm")`` in a process of its own, with
an engine of its own (in this process: VLLM_ENABLE_V1_MULTIPROCESSING=0).

argv: model_dir out_dir engine_args_json rank world_size
"""

import json
import sys


def main():
    model_dir, out_dir, engine_args, rank, world_size = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), *map(int, sys.argv[4:])
    from vllm_cases import cache_corpus

    from selfreplay_fast.teacher_cache import build_teacher_cache

    assert build_teacher_cache(model_dir, cache_corpus(), 3, out_dir, batch_size=3, shard_size=2, progress=False,
                               backend="vllm", vllm_engine_args=engine_args, rank=rank, world_size=world_size) is None


if __name__ == "__main__":
    main()
