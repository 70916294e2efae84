"""The on-disk delta package: manifest, tensor files, model card."""
