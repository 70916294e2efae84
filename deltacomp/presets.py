"""One-flag settings for ``deltacomp compress --preset``, and how options given beside a preset combine with it.

Each preset sets the method, the use of calibration, the bit allocation, the sequential fit and the end-to-end
tuning; options given explicitly on the command line override it. Measured on SmolLM2-135M fine-tunes (the quality
suite) and the MiniLM pair (BENCHMARKS.md, "Everyday text as the default calibration", "The four GPU pairs at 1 and
0.5 bit with the everyday-text default", "The calibration Hessian shrunk by the calibration's size" and "End-to-end
tuning of the stored scales"):

- ``fast``: the fixed 8/3/2 schedule, round-to-nearest: the plain reference method's result, the quickest.
- ``balanced``: the defaults: ``--allocation auto`` (the optimal allocation with noise weight 0.1) and ``--calib
  auto`` (deltacomp's everyday English text where the model can be run): 0.21-0.68x the reference's answer KL on
  the four GPU suite pairs at 1 and 0.5 bit per entry (no calibration: 0.31-1.21x), 0.12-0.68x on three CPU pairs
  (0.26-1.18x); MiniLM mean cosine 0.99978 / 0.99941 / 0.99828 at 1 / 0.5 / 0.25 bit. About 2-3x the compress time
  of no calibration.
- ``best``: calibrated on ``--calib FILE`` (required), text like the fine-tune's, with the optimal allocation and
  three epochs of end-to-end tuning of the stored scales (``--tune 3``, :mod:`deltacomp.tune`; ``--tune-on auto``:
  the answers and the other tokens half each where the records carry answers). With 128 task examples on the four
  GPU suite pairs: 0.37x, 0.36x, 0.26x and 0.20x the reference's answer KL at 0.5 bit (json, arith, piglatin,
  instruct; at least 99.3% of the fine-tune's exact match kept), 0.13x, 0.14x, 0.09x and 0.11x at 0.25 bit (at
  least 98.3% kept); tuned on every token 0.57x, 0.21x, 0.25x, 0.21x at 0.5 bit. A Llama-2-7B-shaped pair: 4.3
  minutes on an H100.
  ``--sequential`` is not part of it: it helped on MiniLM and cost up to 3.8x the KL on a SmolLM2 fine-tune (add it
  explicitly to try it).
  On an encoder (a model without a language-model head) ``best`` also shares one budget among the matrices, each
  one's error weighed by the model's sensitivity to it (``--budget-scope model --sensitivity``): on MiniLM with
  tuning 0.99993 / 0.99977 / 0.99940 at 1 / 0.5 / 0.25 bit against the per-matrix budget's 0.99980 / 0.99943 /
  0.99863. On decoders the shared budget lost (CPU arith and instruct pairs at 0.5 bit: 0.30x and 3.14x the
  reference's answer KL against 0.22x and 0.44x per matrix), so they keep the per-matrix budget.
"""

from __future__ import annotations

from collections.abc import Callable

from deltacomp.config import CALIB_AUTO, CALIB_NONE
from deltacomp.errors import DeltacompError

PRESETS: dict[str, dict] = {
    "fast": {"method": "mixed", "calib": None, "allocation": "schedule", "sequential": False, "tune": 0},
    "balanced": {"method": "mixed", "calib": CALIB_AUTO, "allocation": "auto", "sequential": False, "tune": 0},
    "best": {"method": "mixed", "allocation": "optimal", "sequential": False, "tune": 3},  # and --calib, which it needs
}
NEEDS_CALIB = frozenset({"best"})
# what a preset adds for one kind of model (quality.weights.model_kind), unless one of these options is given
BY_KIND: dict[str, dict[str, dict]] = {"best": {"encoder": {"budget_scope": "model", "sensitivity": True}}}


def settle(options: dict, given: set[str], preset: str | None = None,
           kind: Callable[[], str] | None = None) -> dict:
    """``deltacomp compress``'s option values (by setting name) with ``preset``'s settings for the options not in
    ``given`` (those given explicitly), and an explicit ``--schedule``'s allocation: the schedule. ``kind`` names
    the fine-tune's kind (``causal`` or ``encoder``); it is called only where the preset has settings by kind.

    Raises DeltacompError for ``--preset best`` without ``--calib``, a preset with another method than mixed,
    and ``--schedule`` with ``--allocation optimal``.
    """
    out = dict(options)
    if preset is not None:
        if preset not in PRESETS:
            raise DeltacompError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
        out.update({key: value for key, value in PRESETS[preset].items() if key not in given})
        if out.get("method") != PRESETS[preset]["method"]:
            raise DeltacompError(f"--preset {preset} chooses the settings of the {PRESETS[preset]['method']} method; "
                                 f"leave it out to compress with --method {out.get('method')}")
        if preset in NEEDS_CALIB and out.get("calib") in (None, CALIB_AUTO, CALIB_NONE):
            raise DeltacompError(f"--preset {preset} calibrates: give --calib FILE (text like the text the model "
                                 "will serve; a few hundred lines are enough)")
        if preset in BY_KIND and kind is not None:
            extra = BY_KIND[preset].get(kind(), {})
            if not given & extra.keys():
                out.update(extra)
    if "schedule" in given:
        if "allocation" in given and out.get("allocation") == "optimal":
            raise DeltacompError("--schedule fixes the bits of each singular vector and --allocation optimal chooses "
                                 "them: give one of the two")
        out["allocation"] = "schedule"
    return out
