"""Experiment suites built on mimlab's commands (the commands layer: nothing in the library
below ``mimlab.cli`` imports this package), each declared as data at the top of its module:

* ``standard``: the papers' claims at a budget that decides them, with seeds and confidence
  intervals (``mimlab reproduce --suite standard``; arms, stages, claims);
* ``quick``: Figure 1 and Tables 1-8 of Kong & Zhang plus MaskDistill in one resumable run at
  the scale of a profile (``mimlab reproduce --suite quick | full``; the papers' numbers,
  profiles); ``quick`` is a smoke test that decides nothing;
* ``common``: what both share (reading a sub-run's result file, last-block CKA)."""
