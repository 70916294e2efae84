"""``--tune``: fit every compressed matrix's S, scales and offsets, codes fixed, to the fine-tune's outputs.

Run once every matrix is compressed (their results in the compression's :class:`~deltacomp.resume.ResultStore`),
before the package is written. One model is in memory: the fine-tune, whole, on ``--device``. It first runs the
calibration samples as the teacher: the top :data:`TOP_K` log-probabilities of every next token (a causal LM) or
its last hidden states (an encoder) are kept. Then each compressed linear layer becomes its base weight plus the
stored delta (:class:`~deltacomp.tune.student.TunedLinear`), a compressed matrix that is not a linear layer or
keeps only some rows (a token table) its base weight plus the rebuilt delta, fixed; the tensors stored whole keep
the fine-tune's values. Adam fits the relative S, scale and offset corrections for ``--tune`` epochs on the KL to
the teacher's next-token distribution (over its top tokens and a rest bucket), or an encoder's relative squared
error of the last hidden states. Every eighth sample (from 16 samples on) is held out: the epoch with the least
held-out loss is kept, the untuned factors included, so tuning never leaves the held-out loss higher than it found
it. The tuned values are written back into the results, marked so that a resumed run does not tune them twice.
"""

from __future__ import annotations

import json
import logging
import math
import time

import torch
from torch import nn
from tqdm.auto import tqdm

from deltacomp.calib.activations import build_skeleton
from deltacomp.errors import DeltacompError
from deltacomp.io.checkpoint import Checkpoint
from deltacomp.package.manifest import tensor_key
from deltacomp.package.reader import delta_from_parts
from deltacomp.quality.causal import kl_topk, top_k
from deltacomp.quality.weights import model_kind
from deltacomp.quant.packed import packed_from_parts
from deltacomp.resume import ResultStore
from deltacomp.stages import timed
from deltacomp.tune.student import TunedFactors, TunedLinear

log = logging.getLogger(__name__)
TOP_K = 64  # teacher tokens kept per position (the rest of the vocabulary is one bucket)
BATCH_SAMPLES, BATCH_TOKENS = 8, 8192  # a batch: at most this many samples and padded tokens
HOLD_OUT = 8  # every HOLD_OUT-th sample is held out (from 2 * HOLD_OUT samples on)
REPORT = "tuning.json"  # the report, beside the tuned results


def _chunks(samples: list[torch.Tensor]) -> list[list[int]]:
    """The samples' indices in order, cut into batches of at most BATCH_SAMPLES samples and BATCH_TOKENS padded
    tokens."""
    out, chunk, longest = [], [], 0
    for i, s in enumerate(samples):
        if chunk and (len(chunk) == BATCH_SAMPLES or max(longest, len(s)) * (len(chunk) + 1) > BATCH_TOKENS):
            out.append(chunk)
            chunk, longest = [], 0
        chunk.append(i)
        longest = max(longest, len(s))
    return out + [chunk] if chunk else out


def batches(samples: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Samples (1-D token ids) in order, padded into (input_ids, attention_mask) batches of (B, T)."""
    out = []
    for chunk in _chunks(samples):
        ids = torch.zeros((len(chunk), max(len(samples[i]) for i in chunk)), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, i in enumerate(chunk):
            ids[row, :len(samples[i])], mask[row, :len(samples[i])] = samples[i], 1
        out.append((ids, mask))
    return out


def answer_weights(samples: list[torch.Tensor], starts: list[int | None]) -> list[torch.Tensor]:
    """Per batch of :func:`batches`, (B, T) float32: 1 at the positions whose next token is an answer's (a sample's
    tokens from ``starts[i]`` on), 0 elsewhere (prompts, texts, padding)."""
    out = []
    for chunk in _chunks(samples):
        w = torch.zeros((len(chunk), max(len(samples[i]) for i in chunk)))
        for row, i in enumerate(chunk):
            if starts[i] is not None:
                w[row, starts[i] - 1:len(samples[i]) - 1] = 1
        out.append(w)
    return out


class Objective:
    """The teacher's targets on fixed batches, and the student's loss against them.

    A batch may run in ``parts`` slices of its samples (the gradients of a batch add up to the same step): a batch
    that runs out of GPU memory is run again in twice as many (:meth:`step`). With ``weights``
    (:func:`answer_weights`), a batch's loss is the mean over its weighted tokens only (a batch without one counts
    for nothing); with ``by_tokens`` as well, the weighted sum over the batch's tokens, divided by their number."""

    def __init__(self, model: nn.Module, causal: bool, data: list[tuple[torch.Tensor, torch.Tensor]], device: str,
                 weights: list[torch.Tensor] | None = None):
        self.causal = causal
        self.parts = 1
        self.by_tokens = False
        self.data = [(ids.to(device), mask.to(device)) for ids, mask in data]
        self.weights = [w.to(device) for w in weights] if weights is not None else None
        with torch.no_grad():
            self.targets = [self._outputs(model, ids, mask) for ids, mask in self.data]
            if causal:
                self.targets = [top_k(t, TOP_K) for t in self.targets]

    def _outputs(self, model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(N, V) logits or (N, d) last hidden states of the N real tokens, float32."""
        if self.causal:
            out = model(input_ids=ids, attention_mask=mask).logits
        else:
            out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
        return out[mask.bool()].float()

    def _slices(self, i: int):
        """Batch i in ``parts`` slices of its samples: (ids, mask, the targets of their tokens, the tokens' weights
        or None), padding trimmed."""
        ids, mask = self.data[i]
        bounds = torch.linspace(0, len(ids), min(self.parts, len(ids)) + 1).round().long().tolist()
        rows = [0, *mask.sum(1).cumsum(0).tolist()]  # the targets' first row of each sample
        for a, b in zip(bounds, bounds[1:]):
            width = int(mask[a:b].sum(1).max())
            want = [t[rows[a]:rows[b]] for t in self.targets[i]] if self.causal else self.targets[i][rows[a]:rows[b]]
            m = mask[a:b, :width]
            w = self.weights[i][a:b, :width][m.bool()] if self.weights is not None else None
            yield ids[a:b, :width], m, want, w

    def _total(self, i: int) -> float:
        """Batch i's tokens, or their weight."""
        by_weight = self.weights is not None and not self.by_tokens
        return float(self.weights[i].sum()) if by_weight else float(self.data[i][1].sum())

    def _token_losses(self, got: torch.Tensor, want) -> torch.Tensor:
        if self.causal:
            return kl_topk(*want, got)
        return ((got - want) ** 2).sum(-1) / (want**2).sum(-1).clamp(min=1e-12)

    def loss(self, model: nn.Module, i: int, backward: bool = False) -> float:
        """Batch i's mean loss per token; with ``backward``, its gradients added to the parameters'."""
        total = self._total(i)
        out = 0.0
        if total == 0:
            return out
        for ids, mask, want, w in self._slices(i):
            losses = self._token_losses(self._outputs(model, ids, mask), want)
            part = (losses if w is None else losses * w).sum() / total
            if backward:
                part.backward()
            out += float(part.detach())
        return out

    def step(self, model: nn.Module, i: int, opt: torch.optim.Optimizer) -> float:
        """Batch i's gradients (``opt``'s zeroed first) and loss; out of GPU memory, run again in twice as many
        slices."""
        while True:
            try:
                opt.zero_grad(set_to_none=True)
                return self.loss(model, i, backward=True)
            except torch.cuda.OutOfMemoryError:
                if self.parts >= max(len(ids) for ids, _ in self.data):
                    raise DeltacompError("--tune: one calibration sample does not fit in GPU memory with the whole "
                                         "model; lower --calib-seqlen, or leave out --tune") from None
            self.parts *= 2  # the exception (and the memory its frames held) is gone here
            torch.cuda.empty_cache()
            log.info("--tune: out of GPU memory; each batch now runs in %d slices", self.parts)

    @torch.no_grad()
    def balance(self, model: nn.Module, answers: list[torch.Tensor], shares: Objective | None = None) -> None:
        """Weigh the answers' tokens (``answers``: :func:`answer_weights` of this objective's batches) and the others
        so that each part's KL, relative to its value for ``model`` now, makes half the loss (1.0 for ``model``);
        the parts' sizes and values are measured on ``shares`` (default: this objective's own batches)."""
        self.weights = [a.to(mask.device) for a, (_, mask) in zip(answers, self.data)]  # the answers' indicator
        if shares is None:
            sums, counts = torch.zeros(2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64)
            for i in range(len(self.data)):
                for ids, mask, want, a in self._slices(i):
                    kl, a = self._token_losses(self._outputs(model, ids, mask), want).double(), a.double()
                    sums += torch.stack([(kl * a).sum(), (kl * (1 - a)).sum()]).cpu()
                    counts += torch.stack([a.sum(), (1 - a).sum()]).cpu()
            per_token = sums / counts.clamp(min=1)
            self.shares = [float(counts.sum() / (2 * c * v)) if c > 0 and v > 0 else 0.0
                           for c, v in zip(counts, per_token)]
        else:
            self.shares = shares.shares
        wa, wp = self.shares
        self.weights = [wa * a + wp * (mask - a) for a, (_, mask) in zip(self.weights, self.data)]
        self.by_tokens = True

    @torch.no_grad()
    def mean(self, model: nn.Module) -> float:
        """The loss per batch, averaged over the batches (those with tokens to score)."""
        scored = [i for i in range(len(self.data)) if self._total(i) > 0]
        return sum(self.loss(model, i) for i in scored) / max(len(scored), 1)


def _students(model: nn.Module, names: dict[str, str], base: Checkpoint, store: ResultStore, todo: list[str],
              device: str) -> dict[str, TunedFactors]:
    """Each compressed matrix of ``todo`` in ``model`` as its base weight plus its stored delta: the linear layers'
    deltas trained (returned by name), the others rebuilt and fixed."""
    tuned = {}
    for name, base_weight in base.read_many(todo):
        tensors, meta = store.load(name)
        record = meta["record"]
        parts = {k.removeprefix(tensor_key(name, "")): t for k, t in tensors.items()}
        path = names[name].removesuffix(".weight")
        parent, _, leaf = path.rpartition(".")
        layer = model.get_submodule(path)
        weight = model.get_parameter(names[name])
        with torch.no_grad():
            weight.copy_(base_weight)
        packed = None if "rows" in parts else packed_from_parts(name, parts, record["info"], tuple(record["shape"]))
        if (packed is not None and packed.rank and isinstance(layer, nn.Linear)
                and tuple(layer.weight.shape) == packed.shape):
            tuned[name] = TunedFactors(packed, device)
            setattr(model.get_submodule(parent) if parent else model, leaf, TunedLinear(layer, tuned[name]))
            continue
        delta = delta_from_parts(parts, record, f"{store.folder}: {name}")
        with torch.no_grad():
            weight.add_(delta.reshape(weight.shape).to(weight))
    return tuned


@timed("tune")
def tune(base: Checkpoint, ft: Checkpoint, samples: list[torch.Tensor], store: ResultStore, compressed: list[str],
         epochs: int, lr: float, device: str, dtype: torch.dtype, progress: bool | None = None,
         answer_starts: list[int | None] | None = None, on: str = "all") -> dict | None:
    """Tune the stored S, scales and offsets of the ``mixed`` results in ``store`` of the ``compressed`` matrices
    (in place, in ``store``); returns the report the manifest keeps (None when there was nothing to tune): the
    matrices tuned, the epochs run and kept, the held-out samples, the loss and its value before and after.
    ``on`` (``--tune-on``) is ``all`` (every token), ``answers`` (a causal LM's answer tokens only), ``balanced``
    (the answers' KL and the other tokens', each relative to its untuned value, weigh half each) or ``auto``
    (balanced where a causal LM's samples have answers, all otherwise); all but ``all`` need ``answer_starts``:
    where each sample's answer begins, None for a sample without one."""
    with torch.inference_mode(False), torch.enable_grad():  # whatever the caller runs under
        return _tune(base, ft, samples, store, compressed, epochs, lr, device, dtype, progress,
                     answer_starts if on != "all" else None, on)


def _tune(base, ft, samples, store, compressed, epochs, lr, device, dtype, progress, starts, on) -> dict | None:
    metas = {n: store.load(n, tensors=False)[1] for n in compressed if store.has(n)}
    todo = [n for n, m in metas.items() if m["record"] is not None and m["record"].get("method") == "mixed"]
    if not todo:
        return None
    kept = store.folder / REPORT
    if all(metas[n].get("tuned") for n in todo) and kept.is_file():  # a resumed run, tuned before it stopped
        return json.loads(kept.read_text())
    t0 = time.perf_counter()
    causal = model_kind(ft.config) == "causal"
    if on == "auto":  # balanced where there are answers to balance
        on = "balanced" if causal and starts is not None and any(s is not None for s in starts) else "all"
        starts = starts if on == "balanced" else None
        log.info("--tune-on auto: tuning on %s", "the answers and the other tokens, half each" if starts
                 else "every token (no calibration sample has an answer)" if causal else "the hidden states")
    if starts is not None and not causal:
        raise DeltacompError(f"--tune-on {on} scores a causal LM's answers; this fine-tune is an encoder")
    if starts is not None and all(s is None for s in starts):
        raise DeltacompError(f"--tune-on {on}: no calibration sample has an answer (give prompt/answer records or "
                             "conversations that end with the assistant's turn, one sample per record)")
    model, _, _, _, names = build_skeleton(ft, device, dtype, whole=True)
    for p in model.parameters():
        p.requires_grad_(False)
    took: dict[str, float] = {}

    def mark(phase: str) -> None:  # the time since the last mark, the device's queued work included
        if str(device).startswith("cuda"):
            torch.cuda.synchronize(device)
        took[phase] = time.perf_counter() - t0 - sum(took.values())

    mark("model")
    every = range(len(samples))
    held = list(every[HOLD_OUT - 1::HOLD_OUT]) if len(samples) >= 2 * HOLD_OUT else []
    train = [i for i in every if not held or i % HOLD_OUT != HOLD_OUT - 1]

    def answers(part: list[int]) -> list[torch.Tensor]:
        return answer_weights([samples[i] for i in part], [starts[i] for i in part])

    def objective(part: list[int]) -> Objective:
        weights = answers(part) if on == "answers" else None
        return Objective(model, causal, batches([samples[i] for i in part]), device, weights)

    fit, check = objective(train), objective(held)
    mark("teacher")
    if missing := [n for n in todo if n not in names]:
        log.warning("%d compressed matrices are not weights of the model %s builds (%s, ...): they keep the "
                    "fine-tune's values while the others are tuned", len(missing), ft.path, missing[0])
    tuned = _students(model, names, base, store, [n for n in todo if n in names], device)
    params = [p for f in tuned.values() for p in f.parameters()]
    if on == "balanced":  # the shares are measured on the compressed model as it starts
        fit.balance(model, answers(train))
        check.balance(model, answers(held), shares=fit)
    mark("students")
    judge = check if held else fit
    best_loss, best_epoch, best = judge.mean(model), 0, [p.detach().clone() for p in params]
    first = best_loss
    if not math.isfinite(first):
        raise DeltacompError(f"--tune: the compressed model's loss on the calibration text is {first}; the "
                             f"compressed factors or the calibration samples are not usable for tuning")
    opt = torch.optim.Adam(params, lr=lr)
    order = torch.Generator().manual_seed(0)
    bar = tqdm(total=epochs * len(fit.data), desc="tune", unit="batch",
               disable=progress is False if progress is not None else None)
    for epoch in range(1, epochs + 1):
        for i in torch.randperm(len(fit.data), generator=order).tolist():
            fit.step(model, i, opt)
            opt.step()
            bar.update()
        loss = judge.mean(model)
        if loss < best_loss:
            best_loss, best_epoch, best = loss, epoch, [p.detach().clone() for p in params]
    bar.close()
    mark("epochs")
    with torch.no_grad():
        for p, b in zip(params, best):
            p.copy_(b)
    for name, factors in tuned.items():
        store.save(name, {tensor_key(name, k): t for k, t in factors.stored().items()}, {**metas[name], "tuned": True})
    report = {"matrices": len(tuned), "epochs": epochs, "kept_epoch": best_epoch, "held_out_samples": len(held),
              "loss": (f"kl_top{TOP_K}" + (f"_{on}" if on != "all" else "")) if causal
              else "hidden_relative_mse", "loss_before": first,
              "loss_after": best_loss}
    kept.write_text(json.dumps(report))
    log.info("tuned S, scales and offsets of %d matrices: %s loss %.4g -> %.4g (epoch %d of %d kept)", len(tuned),
             "held-out" if held else "calibration", first, best_loss, best_epoch, epochs)
    mark("store")
    log.info("tuning took %.1f s (%s)", time.perf_counter() - t0, ", ".join(f"{k} {v:.1f} s" for k, v in took.items()))
    return report
