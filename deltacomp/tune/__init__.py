"""End-to-end tuning of a compressed model's stored scales: the last stage of a calibrated compression.

Each compressed matrix's delta is stored as integer codes of U and V, their per-group scales and offsets, and the
singular values S (:mod:`deltacomp.quant.factors`). The codes are chosen one matrix at a time, against that
matrix's own error; the errors of all matrices then meet in the model. ``--tune N`` runs the whole model with
every delta as its stored factors (:mod:`deltacomp.tune.student`), keeps the codes, and fits S, the scales and the
offsets for N epochs over the calibration text to the fine-tune's own outputs (:mod:`deltacomp.tune.fit`): the
KL of its next-token distributions for a causal LM, its last hidden states for an encoder. The package keeps its
size (the tuned values replace the stored fp16 ones).
"""
