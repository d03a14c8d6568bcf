"""Fine-tune a local Hugging Face causal LM on your JSONL with self-generated replay (ReplayTrainer).

    python examples/finetune_with_replay.py --model path/to/model --data train.jsonl \
        --replay replay/ --generate 2000 --replay-max-new-tokens 256 --replay-weight 4 \
        --lora-rank 16 --batch-size 4 --max-steps 500 --out run/

1. Replay: with ``--generate N``, sample N sequences from the model itself (prompted with BOS alone)
   into ``--replay`` and record its top-k teacher (``generate_replay``; a rerun resumes, a complete
   directory is reused); without it, ``--replay`` must hold a buffer already (``selfreplay generate`` or
   ``selfreplay cache``), which is loaded and checked against the model's vocabulary.
2. Fine-tune on ``--data`` (JSONL, one object a line: ``{"text": ...}``, tokenized with the model
   directory's tokenizer, or ``{"input_ids": [...]}``) with loss = task NLL + replay_weight * replay KL,
   both through fused_replay_kl (no full logits). ``--lora-rank`` trains LoRA adapters (needs peft)
   with the lm_head frozen; otherwise every weight is trained.
3. Report: the task loss and replay KL of every log line (printed once each, to 5 significant digits,
   so a KL of 1e-6 shows as such), and ``train_report.json`` in ``--out``: every logged step of the run,
   those before a ``--resume`` included. The adapter or model is saved there too, with the model
   directory's tokenizer, unless ``--no-save``. ``--save-steps N`` writes checkpoints there (tokenizer
   included); ``--resume`` continues an interrupted run from the last one, replay stream included.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch


def build_parser() -> argparse.ArgumentParser:
    from selfreplay_fast.cli import HelpFormatter  # every option's help states its default

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--model", required=True, help="local Hugging Face model directory")
    p.add_argument("--data", required=True, help='JSONL of {"text": ...} or {"input_ids": [...]} objects')
    p.add_argument("--replay", required=True, help="replay buffer directory (loaded, or written with --generate)")
    p.add_argument("--generate", type=int, default=None, metavar="N", help="generate N replay sequences first (default: load --replay)")
    p.add_argument("--replay-max-new-tokens", type=int, default=256, help="tokens per generated replay sequence at most")
    p.add_argument("--replay-top-k", type=int, default=64, help="teacher log-probs cached per position")
    p.add_argument("--replay-weight", type=float, default=4.0, help="lambda (the paper used 1 to 10)")
    p.add_argument("--replay-batch-size", type=int, default=None, help="default: half of --batch-size")
    p.add_argument("--out", required=True, help="output directory (checkpoints, report)")
    p.add_argument("--max-length", type=int, default=512, help="truncate training sequences to this many tokens")
    p.add_argument("--batch-size", type=int, default=4, help="task sequences per micro-batch")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--epochs", type=float, default=1.0, help="passes over --data")
    p.add_argument("--max-steps", type=int, default=-1, help="optimizer steps (overrides --epochs when > 0)")
    p.add_argument("--lr", type=float, default=2e-4, help="learning rate")
    p.add_argument("--lora-rank", type=int, default=None, help="train LoRA adapters of this rank (needs peft; default: full fine-tuning)")
    p.add_argument("--lora-alpha", type=float, default=None, help="default: 2 x rank")
    p.add_argument("--lora-targets", default="all-linear",
                   help="comma-separated module names, or all-linear (the lm_head is never a target)")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in backward")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: cuda if available")
    p.add_argument("--logging-steps", type=int, default=10, help="optimizer steps between log lines")
    p.add_argument("--seed", type=int, default=0, help="seed of training and replay generation")
    p.add_argument("--no-save", action="store_true", help="do not save the trained model/adapter")
    p.add_argument("--save-steps", type=int, default=0,
                   help="write a checkpoint to --out every N optimizer steps (0: none)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the last checkpoint in --out (model, optimizer, data and replay stream)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def parse_args(argv=None):
    return build_parser().parse_args(argv)


class _Sequences(torch.utils.data.Dataset):
    def __init__(self, sequences):
        self.sequences = sequences

    def __len__(self):
        return len(self.sequences)

    def __getitem__(self, i):
        return {"input_ids": self.sequences[i]}


def _collate(pad_token_id):
    def collate(rows):
        length = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), length), pad_token_id, dtype=torch.long)
        attention = torch.zeros_like(ids)
        for i, r in enumerate(rows):
            ids[i, : len(r["input_ids"])] = torch.tensor(r["input_ids"])
            attention[i, : len(r["input_ids"])] = 1
        return {"input_ids": ids, "attention_mask": attention, "labels": ids.masked_fill(attention == 0, -100)}

    return collate


def _replay_buffer(args, model, vocab):
    import selfreplay_fast as sf

    if args.generate is not None:
        was_training = model.training
        buffer = sf.generate_replay(model, num_sequences=args.generate, max_new_tokens=args.replay_max_new_tokens,
                                    top_k=args.replay_top_k, seed=args.seed, out_dir=args.replay,
                                    progress=not args.no_progress)
        model.train(was_training)
        return buffer
    if not os.path.exists(os.path.join(args.replay, "metadata.json")):
        raise SystemExit(f"--replay {args.replay} holds no replay buffer: pass --generate N to create one")
    return sf.ReplayBuffer.load(args.replay, expected_vocab_size=vocab)


def _fmt(value) -> str:
    """A logged loss to 5 significant digits: 0.23623, 1.2346e-06 (a fixed 5 decimals would print 0.00000)."""
    return f"{value:.5g}"


def _load_tokenizer(path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError):  # a model directory without tokenizer files: the data must be input_ids
        return None


def main(argv=None) -> int:
    args = parse_args(argv)
    from transformers import AutoModelForCausalLM, TrainerCallback, TrainingArguments
    from transformers.trainer_callback import PrinterCallback, ProgressCallback
    from transformers.trainer_utils import get_last_checkpoint

    import selfreplay_fast as sf
    from selfreplay_fast.commands.cache import read_jsonl_sequences

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).to(device)
    _, weight, _ = sf.lm_head_of(model)  # refuses softcapped / logit-scaled heads before any work
    vocab = weight.shape[0]
    sequences = read_jsonl_sequences(args.data, args.model, args.max_length)
    sequences = [s for s in sequences if len(s) >= 2]  # one token predicts nothing
    if not sequences:
        raise SystemExit(f"{args.data}: every sequence is shorter than 2 tokens")
    bad = [i for i, s in enumerate(sequences) if min(s) < 0 or max(s) >= vocab]
    if bad:
        raise SystemExit(f"{args.data}: sequence {bad[0]} holds token ids outside [0, {vocab}) (the model's vocabulary)")

    replay = _replay_buffer(args, model.eval(), vocab)  # from the frozen original model, before any update
    model.train()

    if args.lora_rank is not None:
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError:
            raise SystemExit("--lora-rank needs peft: pip install peft") from None
        targets = "all-linear" if args.lora_targets == "all-linear" else args.lora_targets.split(",")
        model = get_peft_model(model, LoraConfig(r=args.lora_rank, lora_alpha=args.lora_alpha or 2 * args.lora_rank,
                                                 target_modules=targets, lora_dropout=0.0, task_type="CAUSAL_LM"))

    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0

    class Report(TrainerCallback):
        """Prints each log line once (Trainer's own printing of the log dicts is removed below)."""

        def on_log(self, _args, state, control, logs=None, **kwargs):
            if logs and "task_loss" in logs and state.is_world_process_zero:
                print(f"step {state.global_step}: task loss {_fmt(logs['task_loss'])}  "
                      f"replay KL {_fmt(logs['replay_kl'])}", flush=True)

    class QuietProgress(ProgressCallback):
        """Trainer's progress bar without its copy of every log line."""

        def on_log(self, *args, **kwargs):
            pass

    training_args = TrainingArguments(
        output_dir=args.out, per_device_train_batch_size=args.batch_size, gradient_accumulation_steps=args.grad_accum,
        num_train_epochs=args.epochs, max_steps=args.max_steps, learning_rate=args.lr, logging_steps=args.logging_steps,
        bf16=args.bf16, gradient_checkpointing=args.gradient_checkpointing, use_cpu=device == "cpu", seed=args.seed,
        save_strategy="steps" if args.save_steps > 0 else "no", save_steps=max(args.save_steps, 1),
        report_to=[], remove_unused_columns=False, disable_tqdm=args.no_progress,
    )
    trainer = sf.ReplayTrainer(model=model, args=training_args, train_dataset=_Sequences(sequences),
                               data_collator=_collate(pad), replay_buffer=replay, replay_weight=args.replay_weight,
                               replay_batch_size=args.replay_batch_size, replay_seed=args.seed,
                               validate_replay=args.generate is not None, callbacks=[Report()],
                               processing_class=_load_tokenizer(args.model))  # saved with checkpoints and model
    trainer.remove_callback(PrinterCallback)
    if trainer.pop_callback(ProgressCallback) is not None:
        trainer.add_callback(QuietProgress)
    if args.resume and (not os.path.isdir(args.out) or get_last_checkpoint(args.out) is None):
        raise SystemExit(f"--resume: no checkpoint-* folder in {args.out} (write them with --save-steps)")
    result = trainer.train(resume_from_checkpoint=True if args.resume else None)
    if not args.no_save:
        trainer.save_model(args.out)
    # Trainer's log history, restored from the checkpoint on --resume: the whole run's log lines.
    reports = [{"step": entry["step"], "loss": entry.get("loss"), "task_loss": entry["task_loss"],
                "replay_kl": entry["replay_kl"]} for entry in trainer.state.log_history if "task_loss" in entry]
    report = {"train_loss": result.training_loss, "global_step": result.global_step, "log": reports,
              "replay_sequences": len(replay), "train_sequences": len(sequences), "lora_rank": args.lora_rank}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "train_report.json"), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
    last = reports[-1] if reports else {}
    print(f"done: {result.global_step} steps, train loss {_fmt(result.training_loss)}, "
          f"last task loss {_fmt(last.get('task_loss', float('nan')))}, "
          f"last replay KL {_fmt(last.get('replay_kl', float('nan')))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
