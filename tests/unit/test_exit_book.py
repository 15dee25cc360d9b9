"""The shares an exit may sell, from the broker's fills (services.executor.placement)."""

from __future__ import annotations

from services.executor.placement import ExitBook, filled_quantity


def _order(status: str, quantity: int, filled: int | None) -> dict[str, object]:
    return {"status": status, "quantity": quantity, "filled_quantity": filled}


def test_filled_quantity_counts_what_traded_even_when_the_order_was_cancelled() -> None:
    assert filled_quantity(_order("CANCELLED", 8, 5)) == 5
    assert filled_quantity(_order("REJECTED", 8, 0)) == 0
    assert filled_quantity(_order("COMPLETE", 8, None)) == 8  # a COMPLETE order filled all it asked


def test_held_is_entry_fills_minus_ended_exit_fills_and_never_negative() -> None:
    book = ExitBook(entry_filled=5, exit_filled=3, live=None, last_filled=None, known=frozenset())
    assert book.held(hint=8) == 2  # the book wins over runtime's count
    assert ExitBook(0, 0, None, None, frozenset()).held(hint=4) == 4  # no entry in the book: runtime's
    assert ExitBook(5, 7, None, None, frozenset()).held(hint=5) == 0
