"""Chargeback for finance: periods, columns, exports and monthly statements (FORMAT.md)."""
