"""Data-parallel generation (issue 12, item 2): N processes fill one out_dir, each generating the shards of
its rank, and the buffer equals a single-process run's with the same seed, shard for shard (tensors and
bytes), also after a rank is killed with SIGKILL and the run is resumed; the writer lock keeps exclusive
writers out while ranks run; bad rank / world_size are refused naming the argument; the CLI's --rank /
--world-size and the torchrun module entry point of the README.

The model is a tiny random Llama built from a config (as in tests/test_generation.py); processes that
must run at the same time are real subprocesses (run_script / torchrun).
"""

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from test_generation import one_thread  # noqa: F401  (autouse: one thread, as in the ranks)

from selfreplay_fast import cli
from selfreplay_fast.dir_lock import DirectoryLock, DirectoryLockedError
from selfreplay_fast.generation import generate_replay
from selfreplay_fast.generation import parallel_writer
from selfreplay_fast.generation.shard_schedule import progress_span, rank_engine_devices, rank_shards, resolve_rank
from selfreplay_fast.replay_buffer import ReplayBuffer, read_metadata

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = dict(num_sequences=14, max_new_tokens=9, top_k=5, batch_size=3, shard_size=3, seed=7)  # 5 shards, the last short
NUM_SHARDS = 5
TENSORS = ("input_ids", "lengths", "teacher_ids", "teacher_logprobs", "teacher_tail_logprob", "sampled_logprobs")


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=48, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    return model


SCRIPT = textwrap.dedent(
    """
    import json, os, signal, sys
    import torch
    torch.set_num_threads(1)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from test_generation_data_parallel import RUN, tiny_llama
    from selfreplay_fast.generation import generate_replay

    out_dir, rank, world_size, kill_after = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])

    def on_shard_written(shard, _):
        print(json.dumps({"wrote": shard}), flush=True)
        if shard == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)  # abrupt death: no cleanup, no finally blocks

    generate_replay(tiny_llama(), out_dir=out_dir, rank=rank, world_size=world_size, progress=False,
                    keep_in_memory=False, on_shard_written=on_shard_written, **RUN)
    """
)


def start_rank(tmp_path, out_dir, rank, world_size, kill_after=-1):
    script = tmp_path / "dp_script.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.path.join(REPO, "tests"), os.environ.get("PYTHONPATH", "")]))
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(name, None)
    return subprocess.Popen([sys.executable, str(script), str(out_dir), str(rank), str(world_size), str(kill_after)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def run_ranks(tmp_path, out_dir, world_size, kill=None):
    """All ranks at once, each a process of its own; ``kill``: {rank: shard after which it kills itself}."""
    procs = [start_rank(tmp_path, out_dir, rank, world_size, (kill or {}).get(rank, -1)) for rank in range(world_size)]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        results.append((proc.returncode, [json.loads(line)["wrote"] for line in out.splitlines() if line.startswith("{")], err))
    return results


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The reference: the same run in one process (its own, like the ranks')."""
    tmp = tmp_path_factory.mktemp("single")
    out = tmp / "buffer"
    [(rc, wrote, err)] = run_ranks(tmp, out, 1)
    assert rc == 0, err[-3000:]
    assert wrote == list(range(NUM_SHARDS))
    return out


def assert_equals_single(out_dir, single_dir, summed_stats=True):
    """Shard for shard: the same files (bytes, so checksums), the same metadata entries, the same tensors."""
    names = sorted(p.name for p in single_dir.iterdir())
    assert sorted(p.name for p in out_dir.iterdir()) == names  # no lock, claim or temporary file left over
    assert names == ["metadata.json"] + [f"shard-{i:05d}.safetensors" for i in range(NUM_SHARDS)]
    for name in names[1:]:
        assert (out_dir / name).read_bytes() == (single_dir / name).read_bytes(), name
    meta, ref = read_metadata(str(out_dir)), read_metadata(str(single_dir))
    assert meta["complete"] is True and parallel_writer.OUT_OF_ORDER_FIELD not in meta
    assert [e["sha256"] for e in meta["shards"]] == [e["sha256"] for e in ref["shards"]]
    for key in ("num_sequences", "num_tokens", "generation", "shard_size", "k", "vocab_size"):
        assert meta[key] == ref[key], key
    if summed_stats:  # the ranks' shards, summed (a single writer records the counters of its own call)
        assert meta["generation_stats"]["sequences"] == RUN["num_sequences"]
    a, b = ReplayBuffer.open(str(out_dir)), ReplayBuffer.open(str(single_dir))
    assert len(a) == len(b) == RUN["num_sequences"]
    for index in range(NUM_SHARDS):
        sa, sb = a.shard(index), b.shard(index)
        for name in TENSORS:
            assert torch.equal(getattr(sa, name), getattr(sb, name)), (index, name)
    assert ReplayBuffer.load(str(out_dir)).sequences() == ReplayBuffer.load(str(single_dir)).sequences()


# ----------------------------------------------------------------------------------------------------
# Two ranks at once, and a rank killed
# ----------------------------------------------------------------------------------------------------


def test_two_ranks_at_once_equal_one_process(tmp_path, single):
    out = tmp_path / "dp"
    results = run_ranks(tmp_path, out, 2)
    assert [rc for rc, _, _ in results] == [0, 0], results[0][2][-3000:] + results[1][2][-3000:]
    assert [wrote for _, wrote, _ in results] == [[0, 2, 4], [1, 3]]  # shard i belongs to rank i % 2
    assert_equals_single(out, single)


def test_a_rank_killed_mid_run_then_a_rerun_resumes_and_equals_one_process(tmp_path, single):
    out = tmp_path / "dp"
    (rc0, wrote0, err0), (rc1, wrote1, _) = run_ranks(tmp_path, out, 2, kill={1: 1})
    assert rc0 == 0, err0[-3000:]
    assert rc1 == -signal.SIGKILL and wrote1 == [1]  # rank 1 died after its first shard, before shard 3
    assert wrote0 == [0, 2, 4]
    meta = read_metadata(str(out))
    assert [e["file"] for e in meta["shards"]] == [f"shard-{i:05d}.safetensors" for i in range(3)]
    assert [e["file"] for e in meta[parallel_writer.OUT_OF_ORDER_FIELD]] == ["shard-00004.safetensors"]
    assert meta["complete"] is False and meta["num_sequences"] == 9
    with pytest.raises(ValueError, match="incomplete"):
        ReplayBuffer.open(str(out))
    assert len(ReplayBuffer.open(str(out), allow_incomplete=True)) == 9  # the listed prefix opens
    before = {i: (out / f"shard-{i:05d}.safetensors").stat().st_ino for i in (0, 1, 2, 4)}
    # What a rank killed while writing shard 3 leaves: a temporary, which the rerun must not trip over.
    (out / ".shard-00003.safetensors.12345.0123456789abcdef.tmp").write_bytes(b"half a shard")

    results = run_ranks(tmp_path, out, 2)
    assert [rc for rc, _, _ in results] == [0, 0], results[1][2][-3000:]
    assert [wrote for _, wrote, _ in results] == [[], [3]]  # only the missing shard was generated
    assert {i: (out / f"shard-{i:05d}.safetensors").stat().st_ino for i in (0, 1, 2, 4)} == before
    assert_equals_single(out, single)


def test_out_of_order_ranks_and_a_one_process_resume(tmp_path, single):
    """In one process, rank 1 of 3 first: nothing is listed until shard 0 exists; then a single-process
    rerun (the exclusive writer) finishes the buffer as if it had begun it."""
    model = tiny_llama()
    out = tmp_path / "dp"
    calls = []
    assert generate_replay(model, out_dir=str(out), rank=1, world_size=3, progress=False,
                           on_shard_written=lambda shard, _: calls.append(shard), **RUN) is None
    assert calls == [1, 4]
    meta = read_metadata(str(out))
    assert meta["shards"] == [] and meta["num_sequences"] == 0 and meta["complete"] is False
    assert [e["file"] for e in meta[parallel_writer.OUT_OF_ORDER_FIELD]] == ["shard-00001.safetensors",
                                                                            "shard-00004.safetensors"]
    generate_replay(model, out_dir=str(out), rank=0, world_size=3, progress=False,
                    on_shard_written=lambda shard, _: calls.append(shard), **RUN)
    assert calls == [1, 4, 0, 3]
    meta = read_metadata(str(out))
    assert [e["file"][:11] for e in meta["shards"]] == ["shard-00000", "shard-00001"]
    assert [e["file"] for e in meta[parallel_writer.OUT_OF_ORDER_FIELD]] == ["shard-00003.safetensors",
                                                                            "shard-00004.safetensors"]
    buffer = generate_replay(model, out_dir=str(out), progress=False,
                             on_shard_written=lambda shard, _: calls.append(shard), **RUN)
    assert calls[4:] == [2, 3, 4]  # the single writer resumes after the listed prefix
    assert len(buffer) == RUN["num_sequences"]
    assert_equals_single(out, single, summed_stats=False)


# ----------------------------------------------------------------------------------------------------
# The lock: ranks share it, exclusive writers are kept out
# ----------------------------------------------------------------------------------------------------


def test_an_exclusive_writer_is_refused_while_a_rank_runs_and_a_rank_while_it_runs(tmp_path, monkeypatch):
    model = tiny_llama()
    out = str(tmp_path / "dp")
    refused = []

    def single_process_meanwhile(shard, _):
        with pytest.raises(DirectoryLockedError, match=r"data-parallel rank 0 of 2") as info:
            generate_replay(model, out_dir=out, progress=False, **RUN)
        refused.append(str(info.value))

    generate_replay(model, out_dir=out, rank=0, world_size=2, progress=False, on_shard_written=single_process_meanwhile,
                    **dict(RUN, num_sequences=6))
    assert len(refused) == 1 and f"pid {os.getpid()}@" in refused[0]
    assert not os.path.exists(os.path.join(out, ".lock"))  # the last rank to close removed it

    monkeypatch.setattr(parallel_writer, "_SHARED_LOCK_WAIT_S", 0.2)

    def rank_meanwhile(shard, _):
        with pytest.raises(DirectoryLockedError, match="is being written by another process"):
            generate_replay(model, out_dir=str(tmp_path / "single"), rank=1, world_size=2, progress=False,
                            **dict(RUN, num_sequences=6))
        refused.append(shard)

    generate_replay(model, out_dir=str(tmp_path / "single"), progress=False, on_shard_written=rank_meanwhile,
                    **dict(RUN, num_sequences=6))
    assert refused[1:] == [0, 1]


def test_a_shard_claimed_or_written_by_another_process_is_skipped(tmp_path):
    """Two processes never generate one shard: a shard another process holds the claim of is left to it, and
    one written since the rank opened the directory (by a twin started with the same rank) is not redone."""
    model = tiny_llama()
    out = str(tmp_path / "dp")
    os.makedirs(out)
    calls = []
    other = DirectoryLock(out, purpose="another rank", name=parallel_writer.claim_lock_name(2)).acquire()
    generate_replay(model, out_dir=out, rank=0, world_size=2, progress=False,
                    on_shard_written=lambda shard, _: calls.append(shard), **RUN)
    other.release()
    assert calls == [0, 4]  # shard 2 was another process's

    def twin_of_rank_1(shard, _):
        # Runs after rank 1 wrote shard 1 and before it claims shard 3: the twin writes 3 first.
        if shard == 1:
            nested = []
            generate_replay(model, out_dir=out, rank=1, world_size=2, progress=False,
                            on_shard_written=lambda s, _: nested.append(s), **RUN)
            calls.append(("twin", nested))
        calls.append(shard)

    generate_replay(model, out_dir=out, rank=1, world_size=2, progress=False, on_shard_written=twin_of_rank_1, **RUN)
    assert calls == [0, 4, ("twin", [3]), 1]
    meta = read_metadata(out)
    assert [e["file"][:11] for e in meta["shards"]] == ["shard-00000", "shard-00001"]  # shard 2 is still missing
    assert sorted(os.listdir(out)) == ["metadata.json"] + [f"shard-{i:05d}.safetensors" for i in (0, 1, 3, 4)]


# ----------------------------------------------------------------------------------------------------
# Arguments and the schedule
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rank, world_size, match", [
    (2, 2, r"rank must be in \[0, world_size\) = \[0, 2\), got 2"),
    (-1, 2, r"rank must be in \[0, world_size\)"),
    (0, 0, "world_size must be an int >= 1"),
    (0, -3, "world_size must be an int >= 1"),
    (True, 2, "rank must be an int"),
    (0, 2.5, "world_size must be an int"),
    (None, 2, "rank must be given with world_size=2"),
    (1, None, r"rank must be in \[0, world_size\) = \[0, 1\)"),
])
def test_bad_rank_or_world_size_is_refused(rank, world_size, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        generate_replay(tiny_llama(), out_dir=str(tmp_path / "b"), rank=rank, world_size=world_size, progress=False,
                        **RUN)
    assert not (tmp_path / "b").exists()  # refused before anything is written


def test_data_parallel_needs_out_dir():
    with pytest.raises(ValueError, match="out_dir is needed for data-parallel generation"):
        generate_replay(tiny_llama(), rank=0, world_size=2, progress=False, **RUN)


def test_rank_and_world_size_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert resolve_rank(None, None, out_dir="x") == (1, 2)
    assert resolve_rank(None, 1, out_dir="x") == (0, 1)  # world_size=1: the whole buffer in this process
    assert resolve_rank(None, None, out_dir=None) == (0, 1)  # in memory: every rank its own buffer, as before
    model = tiny_llama()
    calls = []
    assert generate_replay(model, out_dir=str(tmp_path / "env"), progress=False,
                           on_shard_written=lambda shard, _: calls.append(shard), **RUN) is None
    assert calls == [1, 3]
    assert len(generate_replay(model, progress=False, **RUN)) == RUN["num_sequences"]
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="world_size must be an int, got 'two' from the WORLD_SIZE environment"):
        resolve_rank(None, None, out_dir="x")


def test_round_robin_schedule_and_progress_share():
    assert [rank_shards(5, r, 2) for r in range(2)] == [[0, 2, 4], [1, 3]]
    assert [rank_shards(2, r, 3) for r in range(3)] == [[0], [1], []]
    assert sorted(sum((rank_shards(11, r, 4) for r in range(4)), [])) == list(range(11))
    # 14 sequences in shards of 3: rank 0 owns shards 0, 2, 4 (3 + 3 + 2 sequences), shard 2 still to do.
    assert progress_span([2], 14, 3, 0, 2) == (5, 8)
    assert progress_span([3, 4], 14, 3, 0, 1) == (9, 14)


def test_engine_devices_of_a_torchrun_rank():
    env = {"LOCAL_RANK": "2", "CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7"}
    with rank_engine_devices(8, 1, env):
        assert env["CUDA_VISIBLE_DEVICES"] == "2"
    assert env["CUDA_VISIBLE_DEVICES"] == "0,1,2,3,4,5,6,7"
    with rank_engine_devices(4, 2, env):
        assert env["CUDA_VISIBLE_DEVICES"] == "4,5"  # tensor parallel 2: the local rank's pair
    env = {"LOCAL_RANK": "2", "CUDA_VISIBLE_DEVICES": "5"}  # the launcher gave each process its GPU
    with rank_engine_devices(8, 1, env):
        assert env["CUDA_VISIBLE_DEVICES"] == "5"
    env = {"CUDA_VISIBLE_DEVICES": "0,1"}  # no LOCAL_RANK: left alone
    with rank_engine_devices(2, 1, env):
        assert env["CUDA_VISIBLE_DEVICES"] == "0,1"


# ----------------------------------------------------------------------------------------------------
# The command line
# ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("model")
    tiny_llama().save_pretrained(path)
    return str(path)


def cli_args(model_dir, out):
    return ["generate", "--model", model_dir, "--out", str(out), "--num-sequences", "7", "--max-new-tokens", "6",
            "--top-k", "4", "--shard-size", "2", "--batch-size", "2", "--seed", "5", "--no-progress", "--device", "cpu"]


def test_cli_rank_and_world_size(model_dir, tmp_path, capsys):
    single = tmp_path / "single"
    assert cli.main(cli_args(model_dir, single)) == 0
    capsys.readouterr()
    dp = tmp_path / "dp"
    for rank in (1, 0):
        assert cli.main(cli_args(model_dir, dp) + ["--rank", str(rank), "--world-size", "2"]) == 0
        summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert summary["this_run"]["sequences"] == (3 if rank == 1 else 4)  # rank 1: shards 1, 3; rank 0: 0, 2
    assert summary["buffer"]["complete"] is True and summary["buffer"]["sequences"] == 7
    for name in sorted(p.name for p in single.iterdir()):
        if name != "metadata.json":
            assert (dp / name).read_bytes() == (single / name).read_bytes(), name
    assert sorted(p.name for p in dp.iterdir()) == sorted(p.name for p in single.iterdir())

    assert cli.main(cli_args(model_dir, tmp_path / "bad") + ["--rank", "2", "--world-size", "2"]) == cli.EXIT_USAGE_ERROR
    assert "argument --rank: rank must be in [0, world_size) = [0, 2), got 2" in capsys.readouterr().err
    assert cli.main(cli_args(model_dir, tmp_path / "bad") + ["--world-size", "0"]) == cli.EXIT_USAGE_ERROR
    assert "argument --world-size" in capsys.readouterr().err


def test_torchrun_module_entry_point(model_dir, tmp_path):
    """The README's multi-GPU command, on the CPU: torchrun starts two ranks of the module entry point."""
    single, dp = tmp_path / "single", tmp_path / "dp"
    assert cli.main(cli_args(model_dir, single)) == 0
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(name, None)
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "selfreplay_fast.cli", *cli_args(model_dir, dp)],
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    summaries = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    assert sorted(s["this_run"]["sequences"] for s in summaries) == [3, 4]  # each rank its own shards
    for name in sorted(p.name for p in single.iterdir()):
        if name != "metadata.json":
            assert (dp / name).read_bytes() == (single / name).read_bytes(), name
    assert read_metadata(str(dp))["complete"] is True
