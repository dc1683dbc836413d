"""T5's span-corruption objective on the data root's own texts, before the embedded default's multi-task
fine-tune: the tiny model learns the language of the corpora from tens of thousands of texts instead of the
600 prompts per task it is fine-tuned on.

Semantics (Raffel et al. 2020, section 3.1.4): drop ~`noise` of a text's tokens in spans of mean length
`mean_span`; the input keeps the rest with one sentinel <extra_id_k> per dropped span, the target is each
sentinel followed by its span, then a closing sentinel. Texts: every task's train-split texts that are no
user's test text (the PEFT-U split lets a text be train for one user and test for another: those are left
out), deduplicated, in a fixed order.
"""
from __future__ import annotations

import random

SENTINELS = [f"<extra_id_{k}>" for k in range(32)]


def corpus_texts(tasks: dict) -> list[str]:
    from .data import split_users
    train, test = set(), set()
    for name, t in sorted(tasks.items()):
        for u, p in split_users(t.users).items():
            train.update(t.users[u][sid]["text"] for sid in p["train"] + p["val"])
            test.update(t.users[u][sid]["text"] for sid in p["test"])
    return sorted(train - test)


def span_corrupt(ids: list[int], sentinel_ids: list[int], rng: random.Random, noise: float = 0.15,
                 mean_span: float = 3.0) -> tuple[list[int], list[int]]:
    """(input, target) ids for one text (without its EOS; both get one appended)."""
    n = len(ids)
    if n < 2:
        raise ValueError(f"span corruption needs at least 2 tokens, got {n}")
    n_noise = max(1, min(n - 1, round(n * noise)))
    n_spans = max(1, min(len(sentinel_ids) - 1, round(n_noise / mean_span), n_noise, n - n_noise))

    def runs(total, k):  # `total` tokens in k non-empty runs, cut at k - 1 distinct random places
        cuts = sorted(rng.sample(range(1, total), k - 1))
        return [b - a for a, b in zip([0] + cuts, cuts + [total])]
    noise_runs, keep_runs = runs(n_noise, n_spans), runs(n - n_noise, n_spans)  # interleaved keep, drop, ...
    inp, tgt, at = [], [], 0
    for k, (keep, drop) in enumerate(zip(keep_runs, noise_runs)):
        inp += ids[at:at + keep] + [sentinel_ids[k]]
        at += keep
        tgt += [sentinel_ids[k]] + ids[at:at + drop]
        at += drop
    return inp + [1], tgt + [sentinel_ids[n_spans], 1]


def pretrain(model, tok, texts: list[str], steps: int, batch: int, lr: float, max_len: int, seed: int,
             device="cpu", bar=None) -> float:
    """`steps` AdamW steps of span corruption over `texts` (cycled in a seeded order); returns the last loss."""
    import torch

    from peftu_kernels.optim import linear_warmup
    sent = tok.convert_tokens_to_ids(SENTINELS)
    enc = [x[:-1][:max_len - 1] for x in tok(texts).input_ids if len(x) > 3]
    rng = random.Random(seed)
    order = list(range(len(enc)))
    rng.shuffle(order)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: linear_warmup(s, steps, steps // 20))
    model.train()
    loss, at = float("nan"), 0
    for _ in range(steps):
        if at + batch > len(order):
            rng.shuffle(order)
            at = 0
        ex = [span_corrupt(enc[j], sent, rng) for j in order[at:at + batch]]
        at += batch
        loss = seq2seq_step(model, opt, sched, ex, device, bar)
    return loss


def seq2seq_step(model, opt, sched, examples, device, bar=None) -> float:
    """One AdamW step on (input ids, target ids) pairs: token-mean loss, gradient norm clipped at 1."""
    import torch

    from peftu_kernels.train import collate, token_losses
    ids, mask, y = collate(examples, device=device)
    s, n = token_losses(model, ids, mask, y, None)
    loss = s.sum() / n.sum()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    sched.step()
    opt.zero_grad()
    if bar is not None:
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    return loss.item()
