"""Conversions (in progress)."""
