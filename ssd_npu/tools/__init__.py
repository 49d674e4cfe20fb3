"""Offline tools used by scripts/: shape audit + op recorder, data report + recommendation + rendering.

The training path never imports this package.
"""
