"""Worker of tests/test_fsdp.py (run by ``torchrun`` or plain ``python``; not collected by
pytest): ``mimlab`` with MAE's masking noise made a function of each image (the per-patch
pixel sums) instead of ``torch.rand``, so a run on 2 processes sees the same masks as a run on
one process with the same global batch, then ``mimlab.cli.run(argv[1:])``.

``NAN_AT=R:K`` (environment): the K-th forward (1-based) on rank R returns a NaN loss."""

import os
import sys

import torch

from mimlab.cli import run
from mimlab.methods.masked import MaskedPrediction
from mimlab.nn.ops import patchify

_forward = MaskedPrediction.forward


def _forward_noise_from_pixels(self, images, labels=None, noise=None, mask=None):
    p = self.encoder.patch_size
    with torch.no_grad():
        noise = torch.sin(patchify(images.float(), p).sum(-1) * 12.9898)
    out = _forward(self, images, labels, noise=noise, mask=mask)
    self._calls = getattr(self, "_calls", 0) + 1
    if os.environ.get("NAN_AT") == f"{os.environ.get('RANK', '0')}:{self._calls}":
        out["loss"] = out["loss"] * float("nan")
    return out


MaskedPrediction.forward = _forward_noise_from_pixels

if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
