"""The fusion runtime: one base model, k compressed deltas attached through ``delta_linear``, and a gate.

Every adapted linear layer computes ``base(x) + sum_i w_i(x) dW_i x`` with the packed factors (never a dense dW);
the gate sets ``w``. Tensors the packages store whole follow the rule of :mod:`deltacomp.fusion.stored`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path

import torch

from deltacomp.errors import DeltacompError, MismatchError
from deltacomp.fusion.bank import DeltaSet, source_name
from deltacomp.fusion.config import FusionConfig, FusionError, TrainConfig
from deltacomp.fusion.folder import read_gate, read_weights, render_card, write_gate
from deltacomp.fusion.gates import Gate, get_gate
from deltacomp.fusion.loading import load_base
from deltacomp.fusion.sites import Sites
from deltacomp.fusion.stored import StoredTensors, stored_coeffs
from deltacomp.io.checkpoint import Checkpoint
from deltacomp.io.output import atomic_dir, check_output
from deltacomp.kernels import attach
from deltacomp.package.fingerprint import fingerprint

log = logging.getLogger(__name__)


def load_tokenizer(base: Checkpoint, deltas: DeltaSet):
    """The base's tokenizer, else the first package's copy of the fine-tune's (None when there is none)."""
    from transformers import AutoTokenizer

    from deltacomp.quality.weights import tokenizer_source

    try:
        folder = tokenizer_source(base.path, *(p.path / "model" for p in deltas.packages))
    except DeltacompError:
        return None
    tok = AutoTokenizer.from_pretrained(str(folder))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


class FusionModel:
    """A base model with k deltas mixed by a gate. Build with :meth:`from_packages` or :meth:`load`."""

    def __init__(self, model, tokenizer, kind: str, deltas: DeltaSet, config: FusionConfig, base_source: str):
        if config.num_deltas != len(deltas):
            raise FusionError(f"the fusion config is for {config.num_deltas} deltas; {len(deltas)} were given")
        self.model, self.tokenizer, self.kind = model, tokenizer, kind
        self.deltas, self.config, self.base_source = deltas, config, base_source
        self.device = next(model.parameters()).device
        self.stored = StoredTensors(model, deltas.packages)  # resolved by name before the layers are wrapped
        self.layers = attach(model, deltas.packages, stored_from=None, dense_from=None)
        self.sites = Sites(model)
        self.gate: Gate = get_gate(config.gate)(self.sites, config).to(self.device).eval()
        self.gate.attach()
        self.training: dict | None = None
        self._coeffs: list[float] | None = None
        self.apply_stored()

    # -- construction ------------------------------------------------------------------------------------------
    @classmethod
    def from_packages(cls, base: str | os.PathLike, deltas: Sequence[str | os.PathLike],
                      gate: str | FusionConfig = "token", device: str = "cpu", dtype: torch.dtype | None = None,
                      quantize: str | None = None, **options) -> FusionModel:
        """Load ``base`` (folder or Hub id), attach the delta packages, build a fresh gate.

        ``options`` are :class:`FusionConfig` fields (weights, top_k, top_p, temperature, stored, ...);
        ``quantize`` is None, ``4bit`` (NF4) or ``8bit`` (bitsandbytes).
        """
        config = gate if isinstance(gate, FusionConfig) else FusionConfig(gate=gate, num_deltas=len(deltas), **options)
        ckpt = Checkpoint(base)
        dset = DeltaSet(deltas, ckpt)
        kind, model = load_base(ckpt, device, dtype, quantize)
        return cls(model, load_tokenizer(ckpt, dset), kind, dset, config, source_name(base))

    @classmethod
    def load(cls, folder: str | os.PathLike, base: str | os.PathLike | None = None,
             deltas: Sequence[str | os.PathLike] | None = None, device: str = "cpu", dtype: torch.dtype | None = None,
             quantize: str | None = None) -> FusionModel:
        """Open a gate folder (verified) over its base and deltas; ``base``/``deltas`` replace the recorded ones."""
        folder = Path(folder)
        doc = read_gate(folder)
        want_fp = doc["base"]["fingerprint"]
        ckpt = Checkpoint(base if base is not None else doc["base"]["source"])
        if fingerprint(ckpt) != want_fp:
            raise MismatchError(f"{folder} is a gate for another base: it was made over {doc['base']['source']}, "
                                f"and {ckpt.source} has different weights (fingerprint differs)")
        sources = list(deltas) if deltas else [d["source"] for d in doc["deltas"]]
        if len(sources) != len(doc["deltas"]):
            raise FusionError(f"{folder} mixes {len(doc['deltas'])} deltas; {len(sources)} were given")
        dset = DeltaSet(sources)
        if dset.fingerprint != want_fp:
            raise MismatchError(f"the deltas were made from another base than the one {folder} was made for")
        for i, (got, rec) in enumerate(zip(dset.manifest_sha256, doc["deltas"])):
            if got != rec["manifest_sha256"]:
                raise MismatchError(f"delta {i} ({dset.sources[i]}) is not the package {folder} was made with: its "
                                    f"manifest sha256 {got[:12]}... differs from the recorded "
                                    f"{rec['manifest_sha256'][:12]}... (the package changed since)")
        kind, model = load_base(ckpt, device, dtype, quantize)
        fm = cls(model, load_tokenizer(ckpt, dset), kind, dset, doc["config"], source_name(ckpt.source))
        state = read_weights(folder, doc)
        try:
            fm.gate.load_state_dict({k: v.to(fm.device) for k, v in state.items()})
        except RuntimeError as e:
            first = str(e).strip().splitlines()
            raise FusionError(f"{folder}: the gate's weights do not fit this model and config "
                              f"({' '.join(first[:2])[:300]})") from None
        fm.training = doc.get("training")
        fm.apply_stored()
        return fm

    def save(self, folder: str | os.PathLike, overwrite: bool = False) -> dict:
        """Write the gate folder atomically (nothing half-written on error); return its ``fusion.json``."""
        inputs = [p.path for p in self.deltas.packages]
        check_output(folder, overwrite, kind="gate", inputs=inputs)
        base = {"source": self.base_source, "fingerprint": self.deltas.fingerprint}
        deltas = [{"source": s, "manifest_sha256": h} for s, h in zip(self.deltas.sources, self.deltas.manifest_sha256)]
        with atomic_dir(folder, overwrite, kind="gate", inputs=inputs) as tmp:
            doc = write_gate(tmp, self.config, self.gate.state_dict(), base, deltas, self.training)
            (tmp / "README.md").write_text(render_card(doc))
        return doc

    # -- running -----------------------------------------------------------------------------------------------
    @property
    def num_deltas(self) -> int:
        return len(self.deltas)

    def apply_stored(self) -> None:
        """Set the whole-stored tensors by the config's rule and the gate's current static weights."""
        self._set_stored(stored_coeffs(self.config.stored, self.num_deltas, self.gate.static_weights()))

    def _set_stored(self, coeffs: list[float] | None) -> None:
        self.stored.set(coeffs)
        self._coeffs = coeffs

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                prompt_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T) ids -> logits (B, T, V) for a causal LM, last hidden state (B, T, d) for an encoder.

        The gate reads the prompt (``prompt_mask``, default the attention mask) before the forward pass.
        """
        input_ids = input_ids.to(self.device)
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(self.device)
        self.gate.begin(input_ids, mask if prompt_mask is None else prompt_mask.to(self.device))
        out = self.model(input_ids=input_ids, attention_mask=mask)
        return out.logits if self.kind == "causal" else out.last_hidden_state

    __call__ = forward

    @contextmanager
    def variant(self, weights: Sequence[float] | None):
        """Inside, every layer mixes the deltas with fixed ``weights`` (None: the base alone), and the whole-stored
        tensors follow the same weights; the gate is back on exit."""
        k = self.num_deltas
        w = torch.zeros(k) if weights is None else torch.tensor([float(x) for x in weights])
        if w.numel() != k:
            raise FusionError(f"{w.numel()} weights for {k} deltas")
        fields = ("router", "weights", "only", "index")
        saved = [[getattr(s.layer, f) for f in fields] for s in self.sites]
        saved_coeffs = self._coeffs
        for s in self.sites:
            s.layer.router, s.layer.weights, s.layer.only, s.layer.index = None, w.to(self.device), None, None
        self._set_stored(None if weights is None else w.tolist())
        try:
            yield self
        finally:
            for s, values in zip(self.sites, saved):
                for f, v in zip(fields, values):
                    setattr(s.layer, f, v)
            self._set_stored(saved_coeffs)

    def _need_causal(self, what: str) -> None:
        if self.kind != "causal":
            raise FusionError(f"{what} needs a causal LM; this base is an encoder")
        if self.tokenizer is None:
            raise FusionError(f"{what} needs a tokenizer; the base folder and the packages have none")

    @torch.no_grad()
    def generate_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int = 64,
                     use_cache: bool = True, **kwargs) -> torch.Tensor:
        """Greedy decoding through transformers' ``generate``: (B, T) left-padded prompts -> (B, new) tokens.

        The gate runs at every decode step (token, topk); the sentence router reads the prompt once here and keeps
        its weights for every generated token.
        """
        self._need_causal("generation")
        ids, mask = input_ids.to(self.device), attention_mask.to(self.device)
        self.gate.begin(ids, mask)
        tok = self.tokenizer
        out = self.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                  do_sample=False, use_cache=use_cache, pad_token_id=tok.pad_token_id, **kwargs)
        return out[:, ids.shape[1]:]

    def encode_prompts(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded (B, T) ids and attention mask."""
        self._need_causal("generation")
        tok = self.tokenizer
        side, tok.padding_side = tok.padding_side, "left"
        try:
            enc = tok(list(prompts), padding=True, return_tensors="pt")
        finally:
            tok.padding_side = side
        return enc["input_ids"], enc["attention_mask"]

    def generate(self, prompts: str | Sequence[str], max_new_tokens: int = 64, use_cache: bool = True,
                 batch_size: int = 16) -> list[str]:
        """Greedy continuations of ``prompts`` (batched, KV cache), decoded without special tokens."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        out = []
        for i in range(0, len(prompts), batch_size):
            ids, mask = self.encode_prompts(prompts[i:i + batch_size])
            new = self.generate_ids(ids, mask, max_new_tokens, use_cache)
            out += self.tokenizer.batch_decode(new, skip_special_tokens=True)
        return out

    def train_gate(self, examples, config: TrainConfig | None = None, progress: bool | None = None) -> dict:
        """Train the gate's parameters on ``examples`` (:class:`~deltacomp.fusion.data.Example`); see
        :func:`deltacomp.fusion.train.train_gate`."""
        from deltacomp.fusion.train import train_gate

        return train_gate(self, examples, config or TrainConfig(), progress)

    def evaluate(self, examples, batch_size: int = 8, exact: bool = True) -> dict:
        """Loss and exact match of the fused model, each delta alone and the base; see
        :func:`deltacomp.fusion.evaluate.compare`."""
        from deltacomp.fusion.evaluate import compare

        return compare(self, examples, batch_size=batch_size, exact=exact)
