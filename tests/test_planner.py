"""The memory planner (selfreplay_fast/planner.py): its parts checked on the CPU against real tensors.

What a CPU can check exactly is checked exactly: parameter counts of HF models built from configs,
parameter/gradient/optimizer-state bytes after a real AdamW step, the bytes a Llama block saves for
backward per token, and the buffers fused_replay_kl allocates (measured with planner.LiveBytes). The
GPU-only terms (allocator margins, CUDA kernels' workspaces) wait for benchmarks/validate_planner.py.
"""

import json

import pytest
import torch
import torch.nn as nn

from selfreplay_fast import cli, fused_replay_kl
from selfreplay_fast.planner import (
    LINEAR_MODULES, PRESETS, LiveBytes, PlanConfig, fused_call_bytes, gradient_bytes, layer_activation_bytes_per_token,
    load_model_spec, optimizer_state_bytes, plan, predict, spec_from_hf_config, suggest_fit, weight_bytes,
)

transformers = pytest.importorskip("transformers")


def _tiny_config(kind="llama", tied=False, layers=2):
    common = dict(vocab_size=96, hidden_size=64, intermediate_size=160, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied, attn_implementation="sdpa")
    if kind == "qwen2":
        return transformers.Qwen2Config(**common)
    return transformers.LlamaConfig(head_dim=16, **common)


def _model(config, dtype=torch.float32):
    torch.manual_seed(0)
    cls = transformers.Qwen2ForCausalLM if config.model_type == "qwen2" else transformers.LlamaForCausalLM
    return cls(config).to(dtype)


class LoRALinear(nn.Module):
    """A minimal LoRA adapter with peft's forward: the input is cast to the adapter's dtype per module."""

    def __init__(self, base, rank, dtype):
        super().__init__()
        self.base = base
        self.A = nn.Linear(base.in_features, rank, bias=False, dtype=dtype)
        self.B = nn.Linear(rank, base.out_features, bias=False, dtype=dtype)
        nn.init.normal_(self.B.weight, std=0.02)

    def forward(self, x):
        out = self.base(x)
        return (out + self.B(self.A(x.to(self.A.weight.dtype))) * 2.0).to(out.dtype)


def _add_lora(model, rank, dtype, targets=LINEAR_MODULES):
    model.requires_grad_(False)
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name in targets:
                if hasattr(parent, name):
                    setattr(parent, name, LoRALinear(getattr(parent, name), rank, dtype))
    return model


# ------------------------------------------------------------------ model specs


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_preset_parameter_counts_match_the_published_ones(preset):
    spec = load_model_spec(preset)
    # published: 1.24B / 8.03B / 7.62B (model cards); rounding to 3 digits allows 0.4% on the 1B
    assert spec.num_params() == pytest.approx(spec.published_params, rel=0.01)


def test_preset_exact_counts():
    # Known exact totals (sum of the safetensors shapes of the released checkpoints).
    assert load_model_spec("llama-3.1-8b").num_params() == 8_030_261_248
    assert load_model_spec("llama-3.2-1b").num_params() == 1_235_814_400
    assert load_model_spec("Qwen2.5-7B").num_params() == 7_615_616_512


@pytest.mark.parametrize("kind,tied", [("llama", False), ("llama", True), ("qwen2", False)])
def test_config_json_path_gives_the_hf_models_parameter_count(tmp_path, kind, tied):
    config = _tiny_config(kind, tied)
    config.save_pretrained(tmp_path)
    model = _model(config)
    actual = sum(p.numel() for p in model.parameters())  # tied weights are one Parameter
    for path in (tmp_path, tmp_path / "config.json"):
        spec = load_model_spec(str(path))
        assert spec.num_params() == actual
    assert spec.attention_bias == (kind == "qwen2") and spec.tie_word_embeddings == tied


# ------------------------------------------------------------------ training state


def _state_bytes(model, opt):
    params = [p for p in model.parameters() if p.requires_grad]
    grads = sum(p.grad.nbytes for p in params)
    states = sum(t.nbytes for s in opt.state.values() for name, t in s.items() if name != "step")
    return sum(p.nbytes for p in model.parameters()), grads, states


def _one_step(model, opt):
    ids = torch.randint(0, 96, (2, 12))
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    opt.step()


def test_full_finetuning_state_bytes_are_exact():
    config = _tiny_config()
    model = _model(config, torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    _one_step(model, opt)
    weights, grads, states = _state_bytes(model, opt)
    spec = spec_from_hf_config(config)
    cfg = PlanConfig(lora_rank=None, param_dtype="fp32", optimizer="adamw").validated()
    assert weights == weight_bytes(spec, cfg)
    assert grads == gradient_bytes(spec, cfg)
    assert states == optimizer_state_bytes(spec, cfg)  # 2 fp32 states per parameter


@pytest.mark.parametrize("targets", [LINEAR_MODULES, ("q_proj", "v_proj")])
def test_lora_state_bytes_are_exact(targets):
    config = _tiny_config()
    model = _add_lora(_model(config, torch.bfloat16), 4, torch.float32, targets)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    _one_step(model, opt)
    weights, grads, states = _state_bytes(model, opt)
    spec = spec_from_hf_config(config)
    cfg = PlanConfig(lora_rank=4, lora_targets=targets, lora_dtype="fp32").validated()
    assert weights == weight_bytes(spec, cfg)  # bf16 base + fp32 adapters
    assert grads == gradient_bytes(spec, cfg)
    assert states == optimizer_state_bytes(spec, cfg)
    sgd = PlanConfig(lora_rank=4, lora_targets=targets, optimizer="sgd").validated()
    assert optimizer_state_bytes(spec, sgd) == 0


def test_peft_lora_trainable_parameters_match():
    peft = pytest.importorskip("peft")
    config = _tiny_config()
    model = _model(config, torch.bfloat16)
    model = peft.get_peft_model(model, peft.LoraConfig(r=8, target_modules=list(LINEAR_MODULES)))
    trainable = [p for p in model.parameters() if p.requires_grad]
    spec = spec_from_hf_config(config)
    cfg = PlanConfig(lora_rank=8).validated()
    assert sum(p.numel() for p in trainable) == spec.lora_params(8, LINEAR_MODULES)
    assert {p.dtype for p in trainable} == {torch.float32}  # peft's default: fp32 adapters
    assert sum(p.nbytes for p in model.parameters()) == weight_bytes(spec, cfg)


# ------------------------------------------------------------------ activations


def _saved_bytes(model, ids):
    """Bytes of the distinct storages autograd saves for backward, parameters excluded."""
    skip = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    seen = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in skip:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        hidden = model.model(input_ids=ids).last_hidden_state
    del hidden
    return sum(seen.values())


@pytest.mark.parametrize("mode", ["lora-fp32", "lora-bf16", "lora-qv", "full"])
def test_layer_activation_bytes_per_token_are_exact(mode):
    """Per layer = saved bytes with 3 layers minus with 2 (the first layer, fed by frozen embeddings,
    and the final norm differ); the formula must match to the byte (eager CPU SDPA saves what flash
    attention saves on CUDA: q, k, v, output and an fp32 log-sum-exp)."""
    targets = ("q_proj", "v_proj") if mode == "lora-qv" else LINEAR_MODULES
    dtype = torch.bfloat16 if mode == "lora-bf16" else torch.float32
    ids = torch.randint(0, 96, (2, 24))
    measured = []
    for layers in (2, 3):
        config = _tiny_config(layers=layers)
        model = _model(config, torch.bfloat16)
        if mode != "full":
            model = _add_lora(model, 4, dtype, targets)
        measured.append(_saved_bytes(model, ids))
    cfg = PlanConfig(lora_rank=None if mode == "full" else 4, lora_targets=targets,
                     lora_dtype="bf16" if mode == "lora-bf16" else "fp32").validated()
    per_token = (measured[1] - measured[0]) / ids.numel()
    assert per_token == layer_activation_bytes_per_token(spec_from_hf_config(config), cfg)


# ------------------------------------------------------------------ fused_replay_kl buffers


def _fused_peak(n, vocab, dim, k, dtype, chunk, weight_grad):
    torch.manual_seed(0)
    hidden = torch.randn(n, dim, dtype=dtype, requires_grad=True)
    weight = (torch.randn(vocab, dim) * 0.1).to(dtype).requires_grad_(weight_grad)
    top = torch.randn(n, vocab).log_softmax(-1).topk(k, dim=-1)
    ids, logprobs = top.indices.to(torch.int32), top.values
    with LiveBytes() as live:
        fused_replay_kl(hidden, weight, ids, logprobs, impl="torch", chunk_size=chunk).backward()
    return live.peak


@pytest.mark.parametrize("n,vocab,dim,k,dtype,chunk,weight_grad", [
    (256, 4096, 64, 16, torch.float32, 64, False),
    (1024, 4096, 64, 16, torch.float32, 64, False),
    (256, 4096, 64, 16, torch.float32, 64, True),
    (512, 8192, 32, 64, torch.bfloat16, 32, True),
    (300, 5000, 48, 8, torch.bfloat16, 100, False),
])
def test_fused_replay_kl_buffers_match_the_measured_peak(n, vocab, dim, k, dtype, chunk, weight_grad):
    """Measured: peak bytes of the storages ATen ops create during forward + backward (the CPU
    torch path; kernel-internal temporaries are invisible to LiveBytes). 2% covers the [c, k] and [c]
    temporaries the model rounds (six fp32 [c, k] tensors)."""
    measured = _fused_peak(n, vocab, dim, k, dtype, chunk, weight_grad)
    size = 2 if dtype == torch.bfloat16 else 4
    predicted = fused_call_bytes(n, vocab, dim, k, hidden_bytes=size, weight_bytes_per=size,
                                 weight_grad=weight_grad, chunk_rows=chunk, device="cpu")
    assert measured == pytest.approx(predicted["peak"], rel=0.02)
    # the [chunk, V] buffers dominate and do not grow with the token count
    assert predicted["chunk"] >= 4 * chunk * vocab  # the fp32 logits chunk


def test_fused_buffers_do_not_grow_with_tokens():
    small = _fused_peak(256, 4096, 32, 8, torch.float32, 64, False)
    large = _fused_peak(2048, 4096, 32, 8, torch.float32, 64, False)
    per_row = fused_call_bytes(2048, 4096, 32, 8, device="cpu", hidden_bytes=4, weight_bytes_per=4, chunk_rows=64)
    # 8x the tokens: only the O(N (D + k)) terms grow, not the 2 MiB of [64, 4096] chunks
    assert large - small < 0.7 * per_row["chunk"]
    assert large - small == pytest.approx(
        per_row["peak"] - fused_call_bytes(256, 4096, 32, 8, device="cpu", hidden_bytes=4, weight_bytes_per=4,
                                           chunk_rows=64)["peak"], rel=0.1)  # per-slot terms are rounded


# ------------------------------------------------------------------ the step and its goal


def test_8b_lora_goal_and_naive():
    spec = load_model_spec("llama-3.1-8b")
    preds = plan(spec, PlanConfig())
    naive, fused = preds["naive"], preds["selfreplay-fast"]
    for p in (naive, fused):
        assert p.allocated == sum(p.parts.values())
        assert p.total == p.allocated + p.margin
    assert naive.parts["teacher"] == 8_030_261_248 * 2
    assert fused.parts["teacher"] == 0
    # dense fp32 logits: 3 x [24576, V] for the student, 2 x [8192, V] for the teacher
    assert naive.parts["logits/KL buffers"] == 4 * 128256 * (3 * 24576 + 2 * 8192)
    assert fused.parts["logits/KL buffers"] < 1 << 30 < naive.parts["logits/KL buffers"] / 40
    assert not naive.fits
    fix = suggest_fit(spec, PlanConfig())
    assert fix is not None and predict(spec, fix, "fused").fits and not predict(spec, fix, "naive").fits


def test_checkpointing_and_micro_batches_reduce_activations():
    spec = load_model_spec("llama-3.2-1b")
    act = lambda **kw: predict(spec, PlanConfig(**kw), "fused").parts["activations"]  # noqa: E731
    assert act(checkpointing=False) > 3 * act(checkpointing=True)
    assert act(micro_batch=1) < act(micro_batch=2) < act()


# ------------------------------------------------------------------ CLI


def test_cli_table(capsys):
    assert cli.main(["plan", "--model", "llama-3.1-8b", "--seq-len", "4096", "--batch", "4"]) == 0
    out = capsys.readouterr().out
    for part in ("weights", "gradients", "optimizer states", "activations", "logits/KL buffers", "teacher",
                 "cache batch", "margin", "naive", "selfreplay-fast", "fits 24 GiB", "fits with"):
        assert part in out
    assert "pending GPU validation" in out


def test_cli_json(capsys, tmp_path):
    _tiny_config().save_pretrained(tmp_path)
    assert cli.main(["plan", "--model", str(tmp_path), "--seq-len", "128", "--batch", "2", "--k", "8", "--full",
                     "--no-checkpointing", "--optimizer", "sgd", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["config"]["lora_rank"] is None and out["config"]["checkpointing"] is False
    for p in out["predictions"].values():
        assert p["allocated"] == sum(p["parts"].values()) and p["fits"] is True
        assert p["parts"]["optimizer states"] == 0


@pytest.mark.parametrize("argv,name", [
    (["--model", "llama-9b"], "--model"),
    (["--model", "/nonexistent/config.json"], "--model"),
    (["--model", "llama-3.1-8b", "--seq-len", "0"], "--seq-len"),
    (["--model", "llama-3.1-8b", "--seq-len", "-5"], "--seq-len"),
    (["--model", "llama-3.1-8b", "--k", "0"], "--k"),
    (["--model", "llama-3.1-8b", "--batch", "0"], "--batch"),
    (["--model", "llama-3.1-8b", "--replay-batch", "-1"], "--replay-batch"),
    (["--model", "llama-3.1-8b", "--lora-rank", "0"], "--lora-rank"),
    (["--model", "llama-3.1-8b", "--lora-targets", "q_proj,lm_head"], "--lora-targets"),
    (["--model", "llama-3.1-8b", "--dtype", "int8"], "--dtype"),
    (["--model", "llama-3.1-8b", "--micro-batch", "0"], "--micro-batch"),
    (["--model", "llama-3.1-8b", "--budget-gb", "0"], "--budget-gb"),
])
def test_cli_bad_input_names_the_argument(argv, name, capsys):
    assert cli.main(["plan"] + argv) == 2
    err = capsys.readouterr().err
    assert name in err and "error" in err


def test_cli_bad_config_file(tmp_path, capsys):
    (tmp_path / "config.json").write_text("{not json")
    assert cli.main(["plan", "--model", str(tmp_path)]) == 2
    assert "--model" in capsys.readouterr().err


def test_bad_optimizer_is_rejected():
    assert cli.main(["plan", "--model", "llama-3.1-8b", "--optimizer", "adam"]) == 2
    with pytest.raises(ValueError, match="--optimizer"):
        PlanConfig(optimizer="adam").validated()


def test_parameter_counts_read_at_every_size():
    from selfreplay_fast.planner import format_params

    cases = {8_030_261_248: "8.03B", 70_553_706_496: "70.6B", 494_032_768: "494M", 1_235_814_400: "1.24B",
             150_000: "150k", 1_500: "1.5k", 312: "312", 0: "0"}
    assert {n: format_params(n) for n in cases} == cases


def test_cli_small_model_markdown_keeps_every_row_and_the_fix_names_its_flag(capsys, tmp_path):
    _tiny_config().save_pretrained(tmp_path)
    n = load_model_spec(str(tmp_path)).num_params()
    assert n < 1e6
    assert cli.main(["plan", "--model", str(tmp_path), "--seq-len", "64", "--batch", "2"]) == 0
    text = capsys.readouterr().out
    assert "0.00B" not in text and f"{n / 1e3:.3g}k parameters" in text
    assert cli.main(["plan", "--model", str(tmp_path), "--seq-len", "64", "--batch", "2", "--markdown"]) == 0
    markdown = capsys.readouterr().out
    assert text.splitlines()[0] == markdown.splitlines()[0]  # the title line
    text_rows = [line[:36].strip() for line in text.splitlines()[2:] if line[:36].strip() and "  " in line]
    md_rows = [line.split("|")[1].strip() for line in markdown.splitlines() if line.startswith("| ")][1:]
    assert text_rows and md_rows == text_rows[: len(md_rows)] and len(md_rows) == len(text_rows)
    # 8B LoRA at seq 4096 x 4 does not fit 24 GiB in one pass: the fix names its flag, and the flag fits
    assert cli.main(["plan", "--model", "llama-3.1-8b", "--seq-len", "4096", "--batch", "4"]) == 0
    out = capsys.readouterr().out
    assert "fits with --micro-batch 2:" in out
    assert cli.main(["plan", "--model", "llama-3.1-8b", "--seq-len", "4096", "--batch", "4", "--micro-batch", "2",
                     "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["predictions"]["selfreplay-fast"]["fits"] is True


@pytest.mark.parametrize("n,vocab,dim,k,budget", [
    (8192, 128256, 4096, 64, None),  # the headline: Llama-3-8B head, 8192 tokens, 768-row chunks
    (300, 5000, 48, 8, 1 << 20),  # odd shapes: 52-row chunks (a 1 MiB logits budget), 5 vocabulary splits
])
def test_fused_cuda_peak_equals_the_meta_device_measurement(n, vocab, dim, k, budget, monkeypatch):
    """The CUDA model (the dispatcher's own chunk rows and split count) against the peak that
    tests/test_kl_launch_budget.py measures when the real dispatcher runs forward + backward on meta
    tensors with the CUDA code path (a bf16 head with a trained weight, a mask and a tail)."""
    import test_kl_launch_budget as budget_test
    from selfreplay_fast import replay_kl

    monkeypatch.setattr(budget_test, "V", vocab)
    monkeypatch.setattr(budget_test, "D", dim)
    monkeypatch.setattr(budget_test, "K", k)
    if budget is not None:
        monkeypatch.setitem(replay_kl._CHUNK_BYTES, "cuda", budget)
    measured, _ = budget_test._run(monkeypatch, n, torch.bfloat16, autocast=False)
    predicted = fused_call_bytes(n, vocab, dim, k, weight_grad=True, device="cuda")
    assert predicted["chunk_rows"] == measured.matmul_shapes[0][0]  # the first chunk's logits matmul
    assert predicted["chunk_rows"] == (768 if budget is None else 52) and n > predicted["chunk_rows"]
    assert predicted["dispatch_peak"] == measured.peak
