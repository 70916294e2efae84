"""Train a gate: only its parameters change (base and deltas frozen), on the LM loss over answer tokens, plus the
gate's own auxiliary loss (the sentence router's classification, the topk routing loss) where it has one.

AdamW with a cosine schedule after a linear warm-up (LoRA-Flow's recipe: 5 epochs, lr 1e-3, batch 4, 20%
warm-up). A fraction of the examples is held out and scored at the end. Where the auxiliary loss needs each
example's task and the data does not give it (``task`` in prompt/answer JSON lines), the task is the delta that
alone scores the example best.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random

import torch
from tqdm.auto import tqdm

from deltacomp.fusion.config import FusionError, TrainConfig
from deltacomp.fusion.data import Encoded, batches, encode
from deltacomp.fusion.evaluate import _to, batch_nll, example_losses, loss

log = logging.getLogger(__name__)


def cosine_schedule(step: int, total: int, warmup: int) -> float:
    """The learning-rate factor at ``step``: linear warm-up over ``warmup`` steps, then a cosine to 0."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1)))


def split(encoded: list[Encoded], holdout: float, seed: int) -> tuple[list[Encoded], list[Encoded]]:
    """(train, held out): a seeded shuffle, ``holdout`` of the examples (at least one when > 0) held out."""
    order = list(range(len(encoded)))
    random.Random(seed).shuffle(order)
    n_hold = max(1, round(len(encoded) * holdout)) if holdout > 0 else 0
    return [encoded[i] for i in order[n_hold:]], [encoded[i] for i in order[:n_hold]]


def label_tasks(fm, encoded: list[Encoded], batch_size: int) -> list[Encoded]:
    """Fill each unlabelled example's task with the delta that alone gives it the lowest loss."""
    todo = [e for e in encoded if e.task is None]
    if not todo:
        return encoded
    k = fm.num_deltas
    losses = []
    for i in range(k):
        with fm.variant([1.0 if j == i else 0.0 for j in range(k)]):
            losses.append(example_losses(fm, todo, batch_size))
    best = iter(torch.stack(losses).argmin(0).tolist())
    return [dataclasses.replace(e, task=next(best)) if e.task is None else e for e in encoded]


def train_gate(fm, examples, config: TrainConfig, progress: bool | None = None) -> dict:
    """Train ``fm.gate`` on ``examples``; return a summary (steps, losses, held-out score)."""
    fm._need_causal("gate training (LM loss)")
    if not examples:
        raise FusionError("the training data has no examples")
    encoded = encode(list(examples), fm.tokenizer, config.max_length)
    need = config.min_examples + (1 if config.holdout > 0 else 0)
    if len(encoded) < need:
        raise FusionError(f"the training data has {len(encoded)} usable examples (of {len(examples)}; an example "
                          f"needs a token to score); at least {need} are needed")
    train, held = split(encoded, config.holdout, config.seed)
    gate, k = fm.gate, fm.num_deltas
    bad = sorted({e.task for e in encoded if e.task is not None and e.task >= k})
    if bad:
        raise FusionError(f"the training data names task(s) {bad}; there are {k} deltas (tasks 0 to {k - 1})")
    if gate.needs_task:
        train = label_tasks(fm, train, config.batch_size)
    params = [p for p in gate.parameters() if p.requires_grad]
    if not params:
        raise FusionError(f"the {fm.config.gate} gate has no parameters to train")
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    per_epoch = math.ceil(len(train) / config.batch_size)
    total = config.epochs * per_epoch
    warm = int(config.warmup * total)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_schedule(s, total, warm))
    pad = fm.tokenizer.pad_token_id
    history = []
    gate.train()
    bar = tqdm(total=total, desc=f"train {fm.config.gate} gate", unit="step",
               disable=progress is False if progress is not None else None)
    try:
        for epoch in range(config.epochs):
            epoch_loss = 0.0
            for b in batches(train, config.batch_size, pad, shuffle=True, seed=config.seed + epoch):
                b = _to(b, fm.device)
                nll, count = batch_nll(fm, b)
                lm = nll.sum() / count.sum().clamp(min=1)
                task = b["task"] if bool((b["task"] >= 0).all()) else None
                aux = gate.aux_loss(task)
                total_loss = lm if aux is None else lm + config.aux_weight * aux
                opt.zero_grad(set_to_none=True)
                total_loss.backward()
                opt.step()
                sched.step()
                epoch_loss += float(lm.detach())
                bar.update(1)
                bar.set_postfix(loss=f"{float(lm.detach()):.4f}")
            history.append(epoch_loss / per_epoch)
            log.info("epoch %d: mean LM loss %.4f", epoch + 1, history[-1])
    finally:
        bar.close()
        gate.eval()
        opt.zero_grad(set_to_none=True)
        if fm.device.type == "cuda":  # the float factors training used; inference runs the packed kernel
            for site in fm.sites:
                site.layer.bank.release_factors()
    fm.apply_stored()  # a learned static gate moves the whole-stored tensors with it
    summary = {"examples": len(train), "heldout_examples": len(held), "steps": total, "epoch_loss": history,
               "heldout_loss": loss(fm, held, config.batch_size) if held else None, "config": config.to_dict()}
    fm.training = summary
    return summary
