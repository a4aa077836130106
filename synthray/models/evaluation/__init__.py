"""Offline evaluation of generators."""
