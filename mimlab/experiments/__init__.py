"""Experiment suites built on mimlab's commands (the top layer: nothing in the library imports
this package). ``standard``: the papers' claims at a budget that decides them, with seeds and
confidence intervals (``mimlab reproduce --suite standard``)."""
