"""The papers' experiment suite (the commands layer: nothing in the library below
``mimlab.cli`` imports this package): one engine, :mod:`.evidence`, with its arms, stages and
claims declared as data. ``mimlab reproduce --suite evidence`` runs protocol v2 in stages;
``--suite quick`` and ``--suite full`` run the same engine at a profile
(:mod:`.evidence.profiles`: ``smoke``, the CI smoke test that decides nothing, and ``gpu``).
Protocol v1 (``--suite standard``) is retired; its report is kept at
``docs/results/standard/report.md``."""
