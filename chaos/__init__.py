"""Fault injection and history checkers for testing floe under failure."""
