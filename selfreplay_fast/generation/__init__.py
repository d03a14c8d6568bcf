"""Replay generation: sample from the frozen model and record its own top-k teacher on the way.

``generate_replay`` runs its own decode loop over a Hugging Face causal LM (never ``model.generate``,
so no generation_config default such as ``top_k=50`` can truncate the distribution):

* **Batched with continuous batching.** ``batch_size`` slots decode together; when a sequence ends
  (EOS or ``max_new_tokens``) its slot is refilled with the next sequence at once, so the batch stays
  full. Every slot keeps its own positions inside one shared ``DynamicCache``: a per-slot validity mask
  over cache columns says which columns belong to the slot's current sequence, and a custom 4D
  attention mask lets each token see exactly those columns (plus the earlier tokens of its own block).
  Columns of finished sequences and rejected draft tokens simply become invalid; the cache is
  compacted (valid columns of each slot gathered to the right) whenever it has grown to twice the
  longest live sequence, so memory stays bounded.
* **Exact sampling** from ``softmax(logits / temperature)`` over the full vocabulary, and at every
  sampled position the top-k ids/log-probs of *that* distribution plus the log of the remaining mass,
  computed stably as ``logsumexp(non-top-k logits) - logsumexp(all logits)``.
* **Speculative decoding** (``draft_model=`` or ``drafter=NGramDrafter()``): batched, each slot accepts
  its own number of draft tokens. Acceptance is standard rejection sampling (accept with probability
  ``min(1, p/q)``, on rejection resample from ``normalize(max(p - q, 0))``, a bonus token when all are
  accepted), so the output follows the target distribution exactly; the teacher rows come from the
  target's verification logits.
* **Sharded, resumable output.** Sequences are generated shard by shard; shard ``s`` draws all its
  randomness from a ``torch.Generator`` seeded from ``(seed, s)`` and starts from an empty batch, so
  its content does not depend on earlier shards. With ``out_dir`` each finished shard is written
  atomically and listed in ``metadata.json``; rerunning with the same arguments skips the listed
  shards and produces exactly what an uninterrupted run produces (same device and software assumed:
  kernels differ between CPU and GPU). The settings include a fingerprint of the model's weights and
  their dtype (fingerprint.py), checked before anything else: a rerun with other weights under the same
  name and config (a checkpoint retrained in place, another dtype) is refused instead of completing the
  buffer with a second teacher.

One concept per module: ``replay`` (``generate_replay``: checks, resume, the shard loop), ``inputs``
(prompts, special ids, lengths: both backends), ``shards`` (shard seeds, buffer metadata, resume,
assembly: both backends), ``decode_loop`` (the native decode loop of one shard), ``slot_cache`` (the
per-slot cache and its check), ``sampling`` (the sampler, speculative acceptance and the teacher rows),
``drafting`` (the drafters), ``vllm_backend`` (the same buffer from vLLM), ``shard_schedule`` (which
rank of a data-parallel run generates which shard), ``parallel_writer`` (how the ranks share out_dir),
and the prompt sources beyond BOS: ``task_prompts`` (prefixes of the task data) and ``self_dialogue``
(the model writes a user turn and its answer through the chat template; both backends).
"""
from .decode_loop import GenerationStats
from .drafting import DecodeState, Drafter, ModelDrafter, NGramDrafter
from .inputs import load_model_for_generation, pick_attn_implementation
from .replay import RecentRate, generate_replay
from .sampling import sample_categorical
from .self_dialogue import SelfDialogue
from .task_prompts import task_prompts
from .slot_cache import check_slot_attention
from ..model_info import model_config_hash

__all__ = [
    "generate_replay",
    "SelfDialogue",
    "task_prompts",
    "GenerationStats",
    "DecodeState",
    "Drafter",
    "ModelDrafter",
    "NGramDrafter",
    "RecentRate",
    "load_model_for_generation",
    "pick_attn_implementation",
    "sample_categorical",
    "check_slot_attention",
    "model_config_hash",
]
