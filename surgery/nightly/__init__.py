"""Nightly runs: dated report folders and the history over nights."""
