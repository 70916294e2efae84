"""A base quantized with bitsandbytes (4-bit NF4, 8-bit) under the deltas, on CPU."""

import pytest
import torch

from deltacomp.fusion import FusionModel

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (pip install 'deltacomp[fusion]')")

pytestmark = pytest.mark.usefixtures("one_thread")


IDS = torch.tensor([[5, 17, 99, 3, 200, 41, 7, 64]])


@pytest.fixture(scope="module")
def setup(llama_tok, tmp_path_factory):
    from deltacomp.compress import compress
    from deltacomp.config import CompressConfig

    base, ft, _ = llama_tok
    pkg = tmp_path_factory.mktemp("fusion_bnb") / "pkg"
    compress(base, ft, pkg, CompressConfig(bits=8.0, schedule=((8, None),)), progress=False)
    full = FusionModel.from_packages(base, [pkg, pkg], gate="token")
    with torch.no_grad():
        want = full.forward(IDS)
    return base, pkg, want


@pytest.mark.parametrize("quantize, tol", [("4bit", 0.35), ("8bit", 0.1)])
def test_quantized_base_under_the_deltas(setup, quantize, tol):
    base, pkg, want = setup
    try:
        fm = FusionModel.from_packages(base, [pkg, pkg], gate="token", quantize=quantize)
    except Exception as e:  # a bitsandbytes build that cannot run here: skip rather than fail
        pytest.skip(f"bitsandbytes cannot load a {quantize} model here ({type(e).__name__}: {e})")
    kinds = {type(s.layer.base_layer).__name__ for s in fm.sites}
    assert kinds <= {"Linear4bit", "Linear8bitLt"} and kinds, kinds
    with torch.no_grad():
        got = fm.forward(IDS)
    assert torch.isfinite(got).all()
    assert float((got - want).norm() / want.norm()) < tol
    # the deltas still matter on the quantized base, and training the gate works through it
    with torch.no_grad(), fm.variant(None):
        plain = fm.forward(IDS)
    assert not torch.allclose(plain, got)
    ids, mask = fm.encode_prompts(["ab", "abc"])
    assert fm.generate_ids(ids, mask, max_new_tokens=3).shape == (2, 3)
