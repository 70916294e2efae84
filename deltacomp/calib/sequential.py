"""Sequential calibration (``--sequential``): each matrix is fitted on the inputs the *compressed* model gives it.

Plain calibration (:mod:`deltacomp.calib.activations`) weights every matrix by the fine-tune's own inputs, so each
matrix is compressed as if all the others were exact. Here two streams of hidden states run side by side through
the blocks, in the order the model calls its linear layers:

- the teacher: the fine-tuned model, giving each layer its inputs ``X_t`` (rows are tokens);
- the student: the base plus the deltas as already compressed, giving ``X_s``. Within a block, a layer's inputs
  come after the layers before it (``q, k, v`` -> ``o`` -> ``gate, up`` -> ``down``) have been compressed.

A matrix is then fitted to reproduce the fine-tune's outputs from the student's inputs, shrunk towards the
fine-tune's weight by ``lam`` (a ridge term: the calibration set is finite and small sets overfit)::

    W* = argmin_W ||X_t W_ft^T - X_s W^T||^2 + N lam ||W - W_ft||^2 = (W_ft C + lam W_ft)(H_s + lam I)^-1

with ``C = X_t^T X_s / N`` and ``H_s = X_s^T X_s / N``, ``lam = seq_damp * mean(diag H_s)``. The delta
``W* - W_base`` is compressed with GPTQ under ``H_s``: later layers absorb part of the error of earlier ones. When
nothing upstream is compressed yet (the first layers of block 0), ``X_s = X_t``, ``C = H_s`` and ``W* = W_ft``.

Memory is as for plain calibration plus the second stream (``samples x seqlen x hidden``), one cross moment per
distinct input, the block's compressed weights and one batch's layer inputs per stream; one block is on the
device at a time. Each block runs once per group of layers sharing an input, per stream, and once more per
stream to advance; a forward stops at the layer it was run for.
"""

from __future__ import annotations

import torch
from torch import nn

from deltacomp.calib.activations import LayerwiseHessians, run_through
from deltacomp.stages import timed


@timed("sequential target")
def target_delta(base: torch.Tensor, ft: torch.Tensor, hessian: torch.Tensor, cross: torch.Tensor,
                 seq_damp: float) -> torch.Tensor:
    """``W* - W_base`` (m, n) float32 for student moment ``hessian`` (n, n) and cross moment ``cross`` (n, n)."""
    dev = hessian.device
    w = ft.to(dev, torch.float32)  # (m, n)
    h, c = hessian.float(), cross.to(dev, torch.float32)
    lam = seq_damp * float(h.diagonal().mean()) + 1e-30  # also bounds the condition number: float32 is enough
    chol = torch.linalg.cholesky(h + lam * torch.eye(h.shape[0], device=dev))
    rhs = (c.T @ w.T) + lam * w.T  # (n, m) = (W_ft C + lam W_ft)^T
    w_star = torch.cholesky_solve(rhs, chol).T  # H_s symmetric: (H_s + lam)^-1 applied on the right
    return w_star - base.to(dev, torch.float32)


class _StopAt(Exception):
    pass


class SequentialCalibration:
    """Moments ``(H_s, C)`` per matrix, in the model's call order, following the compression as it goes.

    Use: ``order`` lists the calibrated names in the order they must be compressed; for each, :meth:`moments`
    gives ``(H_s, C)`` and :meth:`done` takes its compressed delta before the next name is asked for.
    """

    @timed("calibration")
    def __init__(self, ft, samples: list[torch.Tensor], wanted: set[str], device: str = "cpu",
                 dtype: torch.dtype = torch.float32, max_tokens: int = 16384):
        self.layers = LayerwiseHessians(ft, samples, wanted, device, dtype, max_tokens)
        self.layer_of = self.layers.layer_of
        self.block = self.layers.block
        self.teacher = self.layers.block_inputs()
        self.student = [(h.clone(), a, k) for h, a, k in self.teacher]
        self._load(0)
        self.groups = self._discover_groups()  # [[local names sharing one input], ...] in call order
        rank = {local: i for i, g in enumerate(self.groups) for local in g}
        self.order = sorted(self.layer_of, key=lambda n: (self.layer_of[n], rank.get(self.layers.local[n], 1 << 20), n))

    def _linear(self, local: str) -> nn.Linear:
        return self.block.get_submodule(local)

    def _discover_groups(self) -> list[list[str]]:
        """Locals of the calibrated linears grouped by shared input, in block 0's call order (block 0 loaded)."""
        locals_ = sorted(set(self.layers.local.values()))
        seen: dict[int, int] = {}
        held: list[torch.Tensor] = []  # keeps each input alive, so that its address is not reused meanwhile
        groups: list[list[str]] = []

        def hook(local):
            def f(module, inputs, output):
                ptr = inputs[0].data_ptr()
                if ptr not in seen:
                    seen[ptr] = len(groups)
                    groups.append([])
                    held.append(inputs[0])
                if local not in groups[seen[ptr]]:
                    groups[seen[ptr]].append(local)
            return f

        handles = [self._linear(loc).register_forward_hook(hook(loc)) for loc in locals_
                   if isinstance(self._linear(loc), nn.Linear)]
        try:
            with torch.no_grad():
                h, a, k = self.teacher[0]
                self.block(h, *a, **k)
        finally:
            for hd in handles:
                hd.remove()
        return groups

    def _set(self, weights: dict[str, torch.Tensor]) -> None:
        for local, w in weights.items():
            self._linear(local).weight.data = w

    def _capture(self, item: tuple, local: str, weights: dict[str, torch.Tensor]) -> torch.Tensor:
        """Input (tokens, n) of ``local`` for one batch ``item`` of a stream, with ``weights``; stops there."""
        self._set(weights)
        got: list[torch.Tensor] = []

        def hook(module, inputs):
            x = inputs[0]
            got.append(x.reshape(-1, x.shape[-1]).float())
            raise _StopAt

        handle = self._linear(local).register_forward_pre_hook(hook)
        h, a, k = item
        try:
            self.block(h, *a, **k)
        except _StopAt:
            pass
        finally:
            handle.remove()
        return got[0]

    def _advance(self, stream: list, weights: dict[str, torch.Tensor]) -> None:
        self._set(weights)
        run_through(self.block, stream)

    def _load(self, i: int) -> None:
        """Block i's fine-tuned weights into the one block; its calibrated matrices start as the fine-tune's."""
        self.layers.load_block(i)
        locals_ = {self.layers.local[n] for n, b in self.layer_of.items() if b == i}
        self.ft_weights = {loc: self._linear(loc).weight.data for loc in locals_}
        self.st_weights = dict(self.ft_weights)  # replaced by base + compressed delta as they come
        self.current, self.cache = i, {}

    def _enter_block(self, i: int) -> None:
        while self.current < i:  # both streams through the current block, then the next one loaded
            self._advance(self.teacher, self.ft_weights)
            self._advance(self.student, self.st_weights)
            self._load(self.current + 1)

    @torch.no_grad()
    @timed("calibration")
    def moments(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(H_s, C)`` (n, n) float32 of ``name``, which must come in :attr:`order`."""
        i, local = self.layer_of[name], self.layers.local[name]
        self._enter_block(i)
        if local not in self.cache:
            self.cache = {}
            h = c = None
            tokens = 0
            for teacher, student in zip(self.teacher, self.student):  # one batch of each stream at a time
                xt = self._capture(teacher, local, self.ft_weights)
                xs = self._capture(student, local, self.st_weights)
                if h is None:
                    h = torch.zeros(xs.shape[1], xs.shape[1], device=xs.device)
                    c = torch.zeros_like(h)
                h.addmm_(xs.T, xs)
                c.addmm_(xt.T, xs)
                tokens += xs.shape[0]
            moments = (h / tokens, c / tokens)
            group = next((g for g in self.groups if local in g), [local])
            self.cache = {loc: moments for loc in group}
        return self.cache[local]

    @torch.no_grad()
    @timed("calibration")
    def done(self, name: str, base: torch.Tensor, delta: torch.Tensor) -> None:
        """The base weight and compressed delta (m, n) of ``name``: the student uses ``base + delta`` from now on."""
        local = self.layers.local[name]
        w = self.ft_weights[local]
        self.st_weights[local] = (base.to(w.device, torch.float32) + delta.to(w.device)).to(w.dtype)
