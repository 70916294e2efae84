"""How closely a compressed model behaves like the fine-tune."""
