"""Modules: a frozen 4-bit Linear and its LoRA-adapted form."""

from .linear import Linear4bit, LoraLinear4bit, tile_order_, tile_order_pays

__all__ = ["Linear4bit", "LoraLinear4bit", "tile_order_", "tile_order_pays"]
