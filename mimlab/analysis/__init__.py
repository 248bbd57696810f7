"""Layer 7, analysis tools: representation similarity (CKA), reconstruction quality (PSNR) and
training FLOPs.

* :mod:`.metrics` -- linear CKA, the mini-batch CKA accumulator, PSNR;
* :mod:`.cka` -- ``mimlab analyze cka``: block-wise CKA between full and masked images (Fig. 1
  of Kong & Zhang 2022);
* :mod:`.recon` -- reconstructions of MAE / R-MAE checkpoints: ``mimlab visualize`` and
  ``mimlab analyze psnr`` (Tab. 1's PSNR);
* :mod:`.flops` -- analytic training FLOPs per method (``mimlab flops``);
* :mod:`.cli` -- the argument parsers of the ``analyze`` / ``visualize`` commands.
"""


class AnalysisError(Exception):
    """A request the analysis tools cannot serve (e.g. reconstructing with a contrastive
    checkpoint); the CLI prints its message as one line."""
