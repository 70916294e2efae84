"""Quantizers, bit packing and bit allocation: pure tensor maths."""
