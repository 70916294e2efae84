"""Exports of a delta package into formats other tools load: a PEFT LoRA adapter, a merged checkpoint."""
