"""Robustness cards: a versioned JSON card per evaluated model (schema) and its builder (from an evaluation)."""

from robustseg.cards.build import build_card, write_cards
from robustseg.cards.schema import FORMAT, Card, CardError, json_schema, load_card, validate_card

__all__ = ["FORMAT", "Card", "CardError", "build_card", "json_schema", "load_card", "validate_card", "write_cards"]
