"""Tiny models for the audit's tests: one with spare capacity, one saturated on purpose.

Both are bigram models (a Llama with no decoder layer: next-token logits from the current token alone) over
two disjoint sets of states. Text A (what the model was pretrained on, and what its BOS-prompted replay
samples) walks a cycle over states 0..11; the task B, prompted by its own MARK token, walks another cycle over
states 12..23. A model of width 32 holds both transition tables at once: replay keeps A at almost no cost to
B. A model of width 2 (rank-2 logits) pretrained to convergence on A spends its whole capacity on A: learning
B must overwrite it, whatever the replay weight.
"""

import json
import os

import torch

STATES = 12
A_STATES, B_STATES = range(0, STATES), range(STATES, 2 * STATES)
BOS, EOS, MARK = 2 * STATES, 2 * STATES + 1, 2 * STATES + 2
VOCAB = 2 * STATES + 3
LENGTH = 16


def walks(states, step, count, generator, start_token, stay=0.9):
    """``count`` sequences: ``start_token`` then LENGTH - 1 states of a noisy cycle (state -> state + step)."""
    first, n = states[0], len(states)
    seqs = []
    for _ in range(count):
        s = int(torch.randint(n, (1,), generator=generator))
        row = [start_token, first + s]
        for _ in range(LENGTH - 2):
            s = (s + step) % n if float(torch.rand(1, generator=generator)) < stay else int(
                torch.randint(n, (1,), generator=generator))
            row.append(first + s)
        seqs.append(row)
    return seqs


def bigram_model(hidden_size, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                         num_hidden_layers=0, num_attention_heads=1, num_key_value_heads=1, max_position_embeddings=64,
                         bos_token_id=BOS, eos_token_id=EOS, pad_token_id=EOS, tie_word_embeddings=False)
    return LlamaForCausalLM(config)


def pretrain_on_a(model, steps=300, lr=3e-2, seed=0):
    """Train to convergence on text A (fresh walks every step)."""
    from selfreplay_fast import task_nll

    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        ids = torch.tensor(walks(A_STATES, 1, 32, g, BOS))
        loss = task_nll(model, ids)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model.eval()


def saved_model(directory, hidden_size):
    model = pretrain_on_a(bigram_model(hidden_size))
    model.save_pretrained(directory)
    return str(directory)


def task_file(path, count=96, seed=1):
    g = torch.Generator().manual_seed(seed)
    with open(path, "w") as f:
        for row in walks(B_STATES, 5, count, g, MARK):
            f.write(json.dumps({"input_ids": row}) + "\n")
    return str(path)
