"""The evidence suite, protocol v2 (``mimlab reproduce --suite evidence``).

Protocol v1 (retired; its report is ``docs/results/standard/report.md``) gave every claim a
verdict from 2-epoch fine-tunes, single pretraining runs and intervals that borrowed MAE's
spread. Protocol v2 is written down before its runs (``docs/results/standard/protocol.md``
and ``protocol.json``, :mod:`.protocol`): fine-tuning long enough to rank initialisations,
several pretraining runs per arm (the run is the unit), Welch's t on per-run means, Holm across
a claim's sub-tests, margins relative to MAE's gain over random init.

* :mod:`.protocol` -- the machine-readable protocol (budgets, seeds, test, margins);
* :mod:`.arms` -- the arms, stages and claims, as data;
* :mod:`.runner` -- the sub-runs (pretraining, fine-tunes, probes, CKA, PSNR, early stop), each
  one small result file (:mod:`.files`);
* :mod:`.verdicts` -- Welch and Holm on the result files (:mod:`mimlab.core.stats`);
* :mod:`.report` -- the report writer;
* :mod:`.ftbudget` -- pilot P1, the fine-tuning budget from learning curves on the held-out
  split (its numbers choose ``ft_epochs`` and never enter a verdict);
* :mod:`.profiles` -- the same engine at other scales: ``smoke`` (``--suite quick``, the CI
  smoke test) and ``gpu`` (``--suite full``);
* :mod:`.suite` -- the stages of ``mimlab reproduce``.
"""
