"""Memory planner: predicted peak GPU memory of one fine-tuning step with a replay KL.

Two recipes are compared for the same model, batch and training settings:

* **naive** replay-KL: a frozen teacher copy of the model in memory, and dense fp32 logits: the
  student's logits, their log-softmax and their gradient over every task + replay token, the
  teacher's logits and log-softmax over the replay tokens.
* **selfreplay-fast**: no teacher model; the cached top-k teacher batch (ids int32 + log-probs fp32
  per slot); ``fused_replay_kl`` for both the task NLL (a label is a k = 1 teacher) and the replay
  KL, whose logits buffers are bounded by its chunk size (docs/design.md, section 4).

Everything below is a *model*: byte counts that follow from tensor shapes are exact, the activation
and workspace terms are estimates of what PyTorch eager + Hugging Face transformers keep alive. They
were checked on the CPU (tests/test_planner.py: parameter, gradient and optimizer bytes exactly; the
saved activations of a Llama block per token; fused_replay_kl's buffers) and are still to be
validated against ``torch.cuda.max_memory_allocated`` on a GPU (benchmarks/validate_planner.py).

Notation
--------
V vocabulary, h hidden size, i intermediate size, L layers, n_h query heads, n_kv key/value heads,
d head dim, q = n_h d, kv = n_kv d, r LoRA rank, S sequence length, B task batch, B_r replay batch,
k teacher slots. a = bytes of an activation element = bytes of the parameter dtype (bf16: 2; the
model runs in its parameter dtype, no autocast). l = bytes of a LoRA adapter parameter (fp32: 4 by
default, as peft's ``autocast_adapter_dtype=True`` keeps adapters of a 16-bit model in fp32).

Parameters (exact)
------------------
per layer: q-proj h q, k/v-proj 2 h kv, o-proj q h, MLP 3 h i, two RMSNorm weights 2 h, plus q + 2 kv
bias for models with an attention bias (Qwen2); embeddings V h, the lm_head another V h unless tied,
final norm h. P is the total. A LoRA adapter on a linear layer [out, in] adds r (in + out)
parameters (A [r, in], B [out, r]); the default targets are all seven linear layers of a block.

Training state (exact for the listed optimizers)
-------------------------------------------------
* weights: P x w (w = parameter bytes) + the adapters' parameters x l.
* gradients: one per trainable parameter, in its dtype (full: P x w; LoRA: adapters x l).
* optimizer states: ``adamw`` 2 fp32 states, 8 B per trainable parameter (exactly what
  torch.optim.AdamW keeps for fp32 parameters such as peft's adapters; for bf16 parameters
  torch.optim.AdamW would keep bf16 states, half of this); ``adamw-8bit`` (bitsandbytes blockwise):
  2 B per parameter + 2 fp32 absmax per block of 2048; ``sgd`` (no momentum): nothing.
  The optimizer step's own temporaries (foreach AdamW: about one fp32 copy of the trainable
  parameters) are a separate, later phase: the peak is max(training pass, optimizer step).

Activations saved for backward, per token (estimate; the CPU test measures them exactly for the
HF Llama block in eager mode with SDPA)
---------------------------------------------------------------------------------------------
A Llama block (HF transformers 5, SDPA with native GQA, no dropout) keeps, per token:

* each RMSNorm: its fp32 input, 4 h (+ 4 B for the rsqrt); plus its bf16 normalized output a h when
  the norm weight is trained (full fine-tuning);
* attention: the rotated q and k and v (SDPA's inputs), a (q + 2 kv); SDPA's output a q and its fp32
  log-sum-exp 4 n_h (flash and CPU-flash kernels keep exactly these; the output's
  ``transpose(1, 2).contiguous()`` is then a view, so o-proj's input is the same storage);
* MLP: gate output a i (SiLU's input), SiLU output a i and up output a i (the product's inputs);
* the input of a linear layer (a x in_features), once per distinct input tensor, when its weight is
  trained (full) or when a LoRA adapter of the activation's dtype is on it. An adapter of another dtype
  (peft's fp32 adapters on a bf16 model cast the input per adapted module) keeps its own cast copy,
  l x in_features per adapted module, and its A output l r.

Without gradient checkpointing: L x (per-layer bytes) x T. With checkpointing (HF's per-layer
checkpoint): each layer keeps only its input, L x a h x T, and backward recomputes one layer at a
time, adding one layer's bytes x T. Either way the backward of a layer needs gradient workspace,
estimated as a (3 i + 2 h) x T (the MLP's gradients through down-proj, the product and SiLU, plus the
incoming and outgoing hidden gradients). The final RMSNorm keeps 4 h x T and its output (the head's
input) a h x T is alive during the loss. RoPE's cos and sin (2 a d x T) are shared by all layers.

Where T is the number of tokens in one forward/backward pass: B S + B_r S in a joint step (task and
replay batches in one pass, one backward of loss = NLL + lambda KL; the default), or, with
``micro_batch`` m, min(m, B) S for a task pass and min(m, B_r) S for a replay pass (gradient
accumulation over passes that hold task or replay data, never both).

Loss buffers
------------
* naive: student fp32 logits, log-softmax and gradient, 3 x 4 V x T; teacher fp32 logits and
  log-softmax over the replay tokens, 2 x 4 V x T_r (a conservative count for naive: HF's 16-bit
  logits, before ``.float()``, would add 2 V per token); the teacher's own forward runs under no_grad
  before the student's and its activations are gone by the time of the peak.
* selfreplay-fast (docs/design.md sections 3 and 4, selfreplay_fast/replay_kl.py): per call, chunks of
  c rows as the dispatcher sizes them (``replay_kl.vocab_chunk_rows``: a 384 MiB fp32 logits budget on
  CUDA, rounded down to a multiple of 256 rows: 768 at V = 128256). On CUDA with a 16-bit head a chunk
  holds one fp32 logits buffer 4 c V (the 16-bit gradient is written into its own storage, the hidden
  gradient straight into its rows), the partials pass's [c, k] slot logits and two [c, S] split
  partials (S from ``kernels.vocab_pass.vocab_splits``), and the row terms' [c] scalars and [c, k]
  slot gradient (from the second chunk on, the previous chunk's too); per call the masked copy of the
  hidden states, a h per row, and two fp32 row weights. tests/test_planner.py checks this sum equals the
  peak the dispatcher allocates on meta tensors (tests/test_kl_launch_budget.py), at the headline
  shape and at a small one. The gradients are computed in the forward, so each call also holds its
  hidden gradient [N, h] (a per row) and, when the lm_head is trained, a [V, h] weight gradient until
  backward (``ReplayTrainer`` holds one per call; ``replay_step`` shares one, docs/design.md section 4);
  and while it runs, int64 ids, fp32 log-probs and a bool mask per slot (13 B per slot) plus the
  teacher value checks' sort (about 24 B per slot; the task NLL's k = 1 teacher skips them). The task
  NLL is a k = 1 call over the task tokens, the replay KL a k-slot call over the replay tokens.
* cache batch: replay ids int32 + log-probs fp32, 8 k B per replay token; input ids and labels int64,
  16 B per token (naive: 16 B per token too).

Margins (estimates)
-------------------
``torch.cuda.max_memory_allocated`` is predicted by the sum above (``allocated``). The budget check
adds the caching allocator's fragmentation, 5% of the allocated peak, the cuBLAS workspace (32 MiB
on Hopper) and the CUDA context (about 0.6 GiB, outside the allocator). Budgets are in GiB (2^30
bytes): a "24 GB" card (RTX 4090, A10) has 24 GiB.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, replace
from typing import Dict, List, Optional, Sequence

from .replay_kl import _CHUNK_BYTES

GiB = 1 << 30
MiB = 1 << 20

DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
OPTIMIZERS = ("adamw", "adamw-8bit", "sgd")
LINEAR_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DEFAULT_CHUNK_BYTES = _CHUNK_BYTES["cuda"]  # fused_replay_kl's logits budget on CUDA (selfreplay_fast/replay_kl.py)
FRAGMENTATION = 0.05  # of the allocated peak (estimate)
CUBLAS_WORKSPACE = 32 * MiB
CUDA_CONTEXT = int(0.6 * GiB)  # estimate for a recent driver + torch on an H100; outside the allocator
BNB_BLOCK = 2048

# Real config values (the models' config.json on the Hugging Face hub).
PRESETS: Dict[str, dict] = {
    "llama-3.2-1b": dict(
        name="meta-llama/Llama-3.2-1B", vocab_size=128256, hidden_size=2048, intermediate_size=8192,
        num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
        tie_word_embeddings=True, attention_bias=False, published_params=1.24e9,
    ),
    "llama-3.1-8b": dict(
        name="meta-llama/Llama-3.1-8B", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
        tie_word_embeddings=False, attention_bias=False, published_params=8.03e9,
    ),
    "qwen2.5-7b": dict(
        name="Qwen/Qwen2.5-7B", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
        num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4, head_dim=128,
        tie_word_embeddings=False, attention_bias=True, published_params=7.62e9,
    ),
}


@dataclass(frozen=True)
class ModelSpec:
    name: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    tie_word_embeddings: bool
    attention_bias: bool = False
    published_params: Optional[float] = None

    @property
    def q_dim(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_key_value_heads * self.head_dim

    def linear_shapes(self) -> Dict[str, tuple]:
        """(in_features, out_features) of each linear layer of a block."""
        h, i = self.hidden_size, self.intermediate_size
        return {
            "q_proj": (h, self.q_dim), "k_proj": (h, self.kv_dim), "v_proj": (h, self.kv_dim),
            "o_proj": (self.q_dim, h), "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h),
        }

    def layer_params(self) -> int:
        n = sum(a * b for a, b in self.linear_shapes().values()) + 2 * self.hidden_size
        if self.attention_bias:
            n += self.q_dim + 2 * self.kv_dim
        return n

    def num_params(self) -> int:
        v, h = self.vocab_size, self.hidden_size
        head = 0 if self.tie_word_embeddings else v * h
        return v * h + head + h + self.num_hidden_layers * self.layer_params()

    def lora_params(self, rank: int, targets: Sequence[str]) -> int:
        shapes = self.linear_shapes()
        return self.num_hidden_layers * sum(rank * (shapes[t][0] + shapes[t][1]) for t in targets)


def _positive_int(name: str, value, *, allow_zero: bool = False) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value}")
    return value


def spec_from_hf_config(config, name: str = "config") -> ModelSpec:
    """A ModelSpec from a transformers PretrainedConfig (Llama/Mistral/Qwen2-style decoders)."""
    missing = [a for a in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                           "num_attention_heads") if getattr(config, a, None) is None]
    if missing:
        raise ValueError(f"--model {name}: the config lacks {', '.join(missing)} (a Llama-style decoder config is expected)")
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    bias = bool(getattr(config, "attention_bias", False)) or getattr(config, "model_type", "") == "qwen2"
    return ModelSpec(
        name=name, vocab_size=config.vocab_size, hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size, num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=heads, num_key_value_heads=kv, head_dim=head_dim,
        tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)), attention_bias=bias,
    )


def load_model_spec(model: str) -> ModelSpec:
    """A preset name (case-insensitive) or a local HF config.json (file or model directory)."""
    if not isinstance(model, str) or not model:
        raise ValueError(f"--model must be a preset ({', '.join(PRESETS)}) or a path to a config.json, got {model!r}")
    key = model.lower()
    if key in PRESETS:
        return ModelSpec(**PRESETS[key])
    if not os.path.exists(model):
        raise ValueError(
            f"--model {model!r} is neither a preset ({', '.join(PRESETS)}) nor an existing path to a "
            "config.json or a model directory"
        )
    path = os.path.join(model, "config.json") if os.path.isdir(model) else model
    if not os.path.isfile(path):
        raise ValueError(f"--model {model!r}: no config.json in that directory")
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except Exception as exc:  # transformers raises several types for a bad file
        raise ValueError(f"--model {model!r}: transformers could not read {path}: {exc}") from exc
    return spec_from_hf_config(config, name=model)


@dataclass
class PlanConfig:
    seq_len: int = 4096
    batch: int = 4
    replay_batch: Optional[int] = None  # default: max(1, batch // 2), the paper's ratio
    k: int = 64
    lora_rank: Optional[int] = 16  # None: full fine-tuning
    lora_targets: Sequence[str] = LINEAR_MODULES
    lora_dtype: str = "fp32"
    checkpointing: bool = True
    optimizer: str = "adamw"
    param_dtype: str = "bf16"
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    micro_batch: Optional[int] = None  # None: one joint pass; m: passes of <= m sequences
    budget_gib: float = 24.0

    def validated(self) -> "PlanConfig":
        _positive_int("--seq-len", self.seq_len)
        _positive_int("--batch", self.batch)
        rb = max(1, self.batch // 2) if self.replay_batch is None else self.replay_batch
        _positive_int("--replay-batch", rb, allow_zero=True)
        _positive_int("--k", self.k)
        if self.lora_rank is not None:
            _positive_int("--lora-rank", self.lora_rank)
            targets = tuple(self.lora_targets)
            bad = [t for t in targets if t not in LINEAR_MODULES]
            if not targets or bad:
                raise ValueError(f"--lora-targets must be a non-empty subset of {', '.join(LINEAR_MODULES)}, got {bad or 'nothing'}")
            if self.lora_dtype not in DTYPE_BYTES:
                raise ValueError(f"--lora-dtype must be one of {', '.join(DTYPE_BYTES)}, got {self.lora_dtype!r}")
        else:
            targets = ()
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"--optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.param_dtype not in DTYPE_BYTES:
            raise ValueError(f"--dtype must be one of {', '.join(DTYPE_BYTES)}, got {self.param_dtype!r}")
        _positive_int("--chunk-mib (chunk bytes)", self.chunk_bytes)
        if self.micro_batch is not None:
            _positive_int("--micro-batch", self.micro_batch)
        if not (isinstance(self.budget_gib, (int, float)) and math.isfinite(self.budget_gib) and self.budget_gib > 0):
            raise ValueError(f"--budget-gb must be a number > 0, got {self.budget_gib!r}")
        return replace(self, replay_batch=rb, lora_targets=targets)

    @property
    def full(self) -> bool:
        return self.lora_rank is None


# ----------------------------------------------------------------------------------------------
# Pieces (each is a plain function of shapes, tested on its own)


def trainable_params(spec: ModelSpec, cfg: PlanConfig) -> int:
    return spec.num_params() if cfg.full else spec.lora_params(cfg.lora_rank, cfg.lora_targets)


def weight_bytes(spec: ModelSpec, cfg: PlanConfig) -> int:
    w = DTYPE_BYTES[cfg.param_dtype]
    n = spec.num_params() * w
    if not cfg.full:
        n += spec.lora_params(cfg.lora_rank, cfg.lora_targets) * DTYPE_BYTES[cfg.lora_dtype]
    return n


def gradient_bytes(spec: ModelSpec, cfg: PlanConfig) -> int:
    return trainable_params(spec, cfg) * DTYPE_BYTES[cfg.param_dtype if cfg.full else cfg.lora_dtype]


def optimizer_state_bytes(spec: ModelSpec, cfg: PlanConfig, *, per_tensor: Optional[List[int]] = None) -> int:
    """``per_tensor``: numels of the trainable tensors (8-bit blocks are per tensor); defaults to a
    whole-model estimate."""
    n = trainable_params(spec, cfg)
    if cfg.optimizer == "adamw":
        return 8 * n
    if cfg.optimizer == "sgd":
        return 0
    tensors = per_tensor if per_tensor is not None else [n]
    return sum(2 * t + 2 * 4 * math.ceil(t / BNB_BLOCK) for t in tensors)


def layer_activation_bytes_per_token(spec: ModelSpec, cfg: PlanConfig) -> int:
    """Bytes one Llama block saves for backward per token (no checkpointing)."""
    a = DTYPE_BYTES[cfg.param_dtype]
    h, i, q, kv = spec.hidden_size, spec.intermediate_size, spec.q_dim, spec.kv_dim
    shapes = spec.linear_shapes()
    n = 2 * (4 * h + 4)  # two RMSNorms: fp32 input + rsqrt
    if cfg.full:
        n += 2 * a * h  # normalized outputs, saved for the norm weights' gradients
    n += a * (q + 2 * kv) + a * q + 4 * spec.num_attention_heads  # SDPA inputs, output, lse
    n += 3 * a * i  # gate (SiLU input), SiLU output, up
    # Linear inputs: x1 (q, k, v), attention output (o), x2 (gate, up), product (down).
    groups = {"x1": ("q_proj", "k_proj", "v_proj"), "attn": ("o_proj",), "x2": ("gate_proj", "up_proj"),
              "prod": ("down_proj",)}
    lora_same_dtype = not cfg.full and DTYPE_BYTES[cfg.lora_dtype] == a and cfg.lora_dtype == cfg.param_dtype
    for group, modules in groups.items():
        in_features = shapes[modules[0]][0]
        targeted = [m for m in modules if not cfg.full and m in cfg.lora_targets]
        saves_input = cfg.full or (targeted and lora_same_dtype)
        if saves_input and group != "attn":  # the attention output is SDPA's saved output already
            n += a * in_features
        if targeted and not lora_same_dtype:
            n += len(targeted) * DTYPE_BYTES[cfg.lora_dtype] * in_features  # per-adapter cast copy
        n += len(targeted) * DTYPE_BYTES[cfg.lora_dtype] * cfg.lora_rank if targeted else 0  # A output
    return n


def activation_parts(spec: ModelSpec, cfg: PlanConfig, tokens: int) -> Dict[str, int]:
    a = DTYPE_BYTES[cfg.param_dtype]
    h, i, L = spec.hidden_size, spec.intermediate_size, spec.num_hidden_layers
    layer = layer_activation_bytes_per_token(spec, cfg) * tokens
    if cfg.checkpointing:
        saved = L * a * h * tokens + layer  # layer inputs + one recomputed layer
    else:
        saved = L * layer
    return {
        "layers": saved,
        "final norm + head input": (4 * h + 4 + a * h) * tokens,
        "rope cos/sin": 2 * a * spec.head_dim * tokens,
        "backward workspace": a * (3 * i + 2 * h) * tokens,
    }


def fused_call_bytes(
    rows: int, vocab: int, dim: int, k: int, *, hidden_bytes: int = 2, weight_bytes_per: int = 2,
    weight_grad: bool = False, chunk_bytes: Optional[int] = None, chunk_rows: Optional[int] = None,
    device: str = "cuda", value_checks: bool = True, ids_int64: bool = False, mask: bool = True,
) -> Dict[str, int]:
    """Memory fused_replay_kl allocates in one call (reduction "mean"/"sum", tail/sampled mode),
    beyond its inputs: ``held`` lives until backward, ``peak`` is the most alive during the call, and
    ``dispatch_peak`` the part of it that the dispatcher allocates after the input checks (what
    tests/test_kl_launch_budget.py measures on meta tensors).

    The chunk rows are the dispatcher's own (``replay_kl.vocab_chunk_rows``, with ``chunk_bytes`` as its
    logits budget when given). device "cuda": a 16-bit head with Triton passes, the 16-bit gradient
    written into the fp32 logits chunk's storage (docs/design.md, sections 3 and 4). device "cpu":
    everything in fp32 (16-bit weights get an fp32 copy), PyTorch passes; ATen-internal temporaries
    (e.g. inside logsumexp) are not counted."""
    from .replay_kl import vocab_chunk_rows

    c = min(chunk_rows or vocab_chunk_rows(rows, vocab, device, budget=chunk_bytes), rows)
    low = device == "cuda" and weight_bytes_per < 4
    op_bytes = weight_bytes_per if low else 4
    held = rows * dim * hidden_bytes + 4 * rows  # hidden gradient + per-row losses
    if weight_grad:
        held += vocab * dim * op_bytes
    slots = rows * k * (1 + 4 + (0 if ids_int64 else 8))  # valid mask, fp32 log-probs, int64 ids
    checks = rows * k * 24 if value_checks else 0  # sorted ids (int64 values + indices) + masked copy
    if low:
        return _fused_cuda_bytes(rows, vocab, dim, k, c, hidden_bytes, held, slots, checks, mask)
    rows_tmp = 4 * 4 * rows  # row weights, their normalization, row scale, loss x weight
    weight_copy = vocab * dim * 4 if (device == "cpu" and weight_bytes_per < 4) else 0
    chunk = 4 * c * vocab  # fp32 logits
    chunk += c * dim * op_bytes + (c * dim * 4 if device == "cpu" and hidden_bytes < 4 else 0)
    chunk += c * k * 4 * 6  # [c, k] row terms (z_teacher, p, grads, ...)
    return {
        "chunk_rows": c,
        "held": held,
        "chunk": chunk,
        "inputs": slots + rows_tmp + weight_copy,
        "checks": checks,
        "peak": held + rows_tmp + slots + weight_copy + max(checks, chunk),
        "dispatch_peak": held + rows_tmp + weight_copy + chunk,
    }


def _fused_cuda_bytes(rows, vocab, dim, k, c, hidden_bytes, held, slots, checks, mask):
    """The CUDA plan's buffers: per call the masked copy of hidden (with a mask) and two fp32 [N] row
    weights; per chunk the fp32 logits (the 16-bit gradient lives in their storage, the hidden gradient
    is written straight into its rows), the partials pass's [c, k] slot logits and two [c, S] split
    partials, the row terms' four [c] scalars and [c, k] slot gradient; from the second chunk on the
    previous chunk's three [c] and one [c, k] row terms are still alive while the next are formed."""
    from .kernels.vocab_pass import vocab_splits

    per_call = (rows * dim * hidden_bytes if mask else 0) + 2 * 4 * rows
    chunk = 4 * c * vocab + 2 * 4 * c * k + 2 * 4 * c * vocab_splits(vocab, "cuda") + 4 * 4 * c
    if rows > c:
        chunk += 4 * c * k + 3 * 4 * c
    return {
        "chunk_rows": c,
        "held": held,
        "chunk": chunk,
        "inputs": slots + per_call,
        "checks": checks,
        "peak": held + slots + per_call + max(checks, chunk),
        "dispatch_peak": held + per_call + chunk,
    }


# ----------------------------------------------------------------------------------------------
# The step


@dataclass
class Prediction:
    method: str
    phase: str
    tokens: int
    parts: Dict[str, int]
    allocated: int
    margin: int
    total: int
    budget: int
    notes: List[str] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return self.total <= self.budget

    def to_dict(self) -> dict:
        d = asdict(self)
        d["fits"] = self.fits
        return d


def _passes(cfg: PlanConfig):
    """(name, task sequences, replay sequences) of each forward/backward pass of a step."""
    if cfg.micro_batch is None:
        return [("joint pass", cfg.batch, cfg.replay_batch)]
    out = [("task pass", min(cfg.micro_batch, cfg.batch), 0)]
    if cfg.replay_batch:
        out.append(("replay pass", 0, min(cfg.micro_batch, cfg.replay_batch)))
    return out


def _loss_parts(spec: ModelSpec, cfg: PlanConfig, method: str, task_tokens: int, replay_tokens: int):
    V, h = spec.vocab_size, spec.hidden_size
    a = DTYPE_BYTES[cfg.param_dtype]
    tokens = task_tokens + replay_tokens
    ids = 16 * tokens  # input ids + labels, int64
    if method == "naive":
        return {
            "logits/KL buffers": 3 * 4 * V * tokens + 2 * 4 * V * replay_tokens,
            "teacher": spec.num_params() * a,
            "cache batch": ids,
        }
    head_trained = cfg.full
    calls = []
    if task_tokens:
        calls.append(fused_call_bytes(task_tokens, V, h, 1, hidden_bytes=a, weight_bytes_per=a,
                                      weight_grad=head_trained, chunk_bytes=cfg.chunk_bytes, ids_int64=True,
                                      value_checks=False))  # task_nll's k = 1 teacher is valid by construction
    if replay_tokens:
        calls.append(fused_call_bytes(replay_tokens, V, h, cfg.k, hidden_bytes=a, weight_bytes_per=a,
                                      weight_grad=head_trained, chunk_bytes=cfg.chunk_bytes))
    buffers, held_before = 0, 0
    for c in calls:  # sequential calls: earlier calls' held buffers stay until backward
        buffers = max(buffers, held_before + c["peak"])
        held_before += c["held"]
    return {
        "logits/KL buffers": buffers,
        "teacher": 0,
        "cache batch": ids + 8 * cfg.k * replay_tokens,
    }


def predict(spec: ModelSpec, cfg: PlanConfig, method: str) -> Prediction:
    if method not in ("naive", "fused"):
        raise ValueError(f"method must be 'naive' or 'fused', got {method!r}")
    cfg = cfg.validated()
    state = {
        "weights": weight_bytes(spec, cfg),
        "gradients": gradient_bytes(spec, cfg),
        "optimizer states": optimizer_state_bytes(spec, cfg),
    }
    best = None
    for name, tb, rb in _passes(cfg):
        t_tok, r_tok = tb * cfg.seq_len, rb * cfg.seq_len
        parts = dict(state)
        act = activation_parts(spec, cfg, t_tok + r_tok)
        parts["activations"] = sum(act.values())
        parts.update(_loss_parts(spec, cfg, method, t_tok, r_tok))
        allocated = sum(parts.values())
        if best is None or allocated > best[2]:
            best = (name, t_tok + r_tok, allocated, parts)
    name, tokens, allocated, parts = best
    # The optimizer step runs after backward: activations and loss buffers are gone by then.
    opt_temp = 4 * trainable_params(spec, cfg) if cfg.optimizer != "sgd" else 0
    opt_phase = sum(state.values()) + opt_temp + (parts["teacher"])
    notes = []
    if opt_phase > allocated:
        name, allocated = "optimizer step", opt_phase
        parts = dict(state, **{"activations": 0, "logits/KL buffers": opt_temp, "teacher": parts["teacher"],
                               "cache batch": 0})
        notes.append("peak in the optimizer step (foreach AdamW temporaries counted as logits/KL buffers)")
    margin = int(FRAGMENTATION * allocated) + CUBLAS_WORKSPACE + CUDA_CONTEXT
    parts_out = dict(parts)
    return Prediction(
        method=method, phase=name, tokens=tokens, parts=parts_out, allocated=allocated, margin=margin,
        total=allocated + margin, budget=int(cfg.budget_gib * GiB), notes=notes,
    )


PART_ORDER = ("weights", "gradients", "optimizer states", "activations", "logits/KL buffers", "teacher",
              "cache batch")


def plan(spec: ModelSpec, cfg: PlanConfig) -> Dict[str, Prediction]:
    return {"naive": predict(spec, cfg, "naive"), "selfreplay-fast": predict(spec, cfg, "fused")}


def suggest_fit(spec: ModelSpec, cfg: PlanConfig) -> Optional[PlanConfig]:
    """The first of a few standard memory settings under which selfreplay-fast fits the budget."""
    cfg = cfg.validated()
    candidates = []
    if not cfg.checkpointing:
        candidates.append(replace(cfg, checkpointing=True))
    base = replace(cfg, checkpointing=True)
    for m in (2, 1):
        if m < max(cfg.batch, cfg.replay_batch):
            candidates.append(replace(base, micro_batch=m))
    if not cfg.full and cfg.lora_dtype != cfg.param_dtype:
        for m in (None, 2, 1):
            candidates.append(replace(base, lora_dtype=cfg.param_dtype, micro_batch=m))
    for c in candidates:
        if predict(spec, c, "fused").fits:
            return c
    return None


def describe(cfg: PlanConfig) -> str:
    cfg = cfg.validated()
    train = "full fine-tuning" if cfg.full else f"LoRA r={cfg.lora_rank} ({cfg.lora_dtype}) on {','.join(cfg.lora_targets)}"
    passes = "one joint pass" if cfg.micro_batch is None else f"gradient accumulation, <= {cfg.micro_batch} sequences per pass"
    return (f"seq {cfg.seq_len} x batch {cfg.batch} + replay batch {cfg.replay_batch}, k={cfg.k}, {train}, "
            f"{cfg.param_dtype} weights, checkpointing {'on' if cfg.checkpointing else 'off'}, "
            f"optimizer {cfg.optimizer}, {passes}, fused chunk {cfg.chunk_bytes // MiB} MiB")


def format_params(n: int) -> str:
    """A parameter count readably at any size: 8.03B, 494M, 150k, 312."""
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= scale:
            value = n / scale
            return f"{value:.3g}{unit}" if value < 100 else f"{value:.0f}{unit}"
    return str(n)


def fit_flags(cfg: PlanConfig, fix: PlanConfig) -> str:
    """The ``selfreplay plan`` flags (the same settings in a training script) that turn ``cfg`` into ``fix``."""
    cfg, fix = cfg.validated(), fix.validated()
    flags = []
    if fix.checkpointing and not cfg.checkpointing:
        flags.append("--checkpointing")
    if fix.micro_batch != cfg.micro_batch and fix.micro_batch is not None:
        flags.append(f"--micro-batch {fix.micro_batch}")
    if fix.lora_dtype != cfg.lora_dtype:
        flags.append(f"--lora-dtype {fix.lora_dtype}")
    return " ".join(flags)


def format_table(spec: ModelSpec, cfg: PlanConfig, preds: Dict[str, Prediction], markdown: bool = False) -> str:
    """The prediction table: the same title line and rows as text or as markdown."""
    cols = list(preds)
    rows = [(p, [f"{preds[c].parts[p] / GiB:.2f}" for c in cols]) for p in PART_ORDER]
    rows.append(("= allocated (max_memory_allocated)", [f"{preds[c].allocated / GiB:.2f}" for c in cols]))
    rows.append(("workspace/fragmentation margin", [f"{preds[c].margin / GiB:.2f}" for c in cols]))
    rows.append(("= total", [f"{preds[c].total / GiB:.2f}" for c in cols]))
    budget = preds[cols[0]].budget / GiB
    rows.append((f"fits {budget:g} GiB", ["yes" if preds[c].fits else "NO" for c in cols]))
    rows.append(("peak phase", [preds[c].phase for c in cols]))
    title = f"{spec.name}: {format_params(spec.num_params())} parameters; {describe(cfg)}"
    if markdown:
        lines = [title, "", "| " + " | ".join(["GiB"] + cols) + " |", "|" + "---|" * (len(cols) + 1)]
        lines += [f"| {name} | " + " | ".join(vals) + " |" for name, vals in rows]
    else:
        lines = [title, f"{'GiB':<36}" + "".join(f"{c:>18}" for c in cols)]
        lines += [f"{name:<36}" + "".join(f"{v:>18}" for v in vals) for name, vals in rows]
    return "\n".join(lines)


def plan_dict(spec: ModelSpec, cfg: PlanConfig, preds: Dict[str, Prediction]) -> dict:
    cfg = cfg.validated()
    c = asdict(cfg)
    c["lora_targets"] = list(cfg.lora_targets)
    return {
        "model": asdict(spec), "num_params": spec.num_params(), "config": c, "description": describe(cfg),
        "predictions": {k: v.to_dict() for k, v in preds.items()}, "unit": "bytes",
        "status": "prediction (estimates pending GPU validation, benchmarks/validate_planner.py)",
    }


if __name__ == "__main__":  # pragma: no cover
    s = load_model_spec("llama-3.1-8b")
    print(format_table(s, PlanConfig(), plan(s, PlanConfig())))
    print(json.dumps(plan_dict(s, PlanConfig(), plan(s, PlanConfig()))["predictions"]["selfreplay-fast"], indent=1))


# ----------------------------------------------------------------------------------------------
# Measuring on the CPU


class LiveBytes:
    """Context manager tracking the bytes of tensor storages created by ATen ops inside it (any
    device), and their peak. A storage counts from the op that creates it until it is freed.

    It sees every op that reaches the Python dispatcher (a TorchDispatchMode): outputs of ATen ops,
    including those of autograd's backward (views, in-place and out= ops allocate nothing); not the temporaries an ATen kernel allocates internally,
    nor tensors created before entering. On CUDA use torch.cuda.max_memory_allocated instead."""

    def __init__(self):
        self.current = 0
        self.peak = 0
        self._alive = {}

    def _track(self, t):
        import torch

        if not isinstance(t, torch.Tensor) or t.device.type == "meta":
            return
        st = t.untyped_storage()
        key = id(st)
        if key in self._alive:
            return
        import weakref

        size = st.nbytes()
        self._alive[key] = size
        self.current += size
        self.peak = max(self.peak, self.current)
        weakref.finalize(st, self._free, key)

    def _free(self, key):
        size = self._alive.pop(key, None)
        if size is not None:
            self.current -= size

    def __enter__(self):
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_leaves

        tracker = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                # Views, in-place and out= ops return storage that already exists: nothing allocated.
                if not any(r.alias_info is not None for r in func._schema.returns):
                    for t in tree_leaves(out):
                        tracker._track(t)
                return out

        self._mode = _Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self._mode.__exit__(*exc)

    def reset_peak(self):
        self.peak = self.current
