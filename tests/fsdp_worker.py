"""Worker of tests/test_fsdp.py (run by ``torchrun`` or plain ``python``; not collected by
pytest): ``mimlab`` with MAE's masking noise (drawn by ``sample_inputs``) made a function of
each image (the per-patch pixel sums) instead of ``torch.rand``, so a run on 2 processes sees
the same masks as a run on one process with the same global batch, then
``mimlab.cli.run(argv[1:])``.

``NAN_AT=R:K`` (environment): the K-th forward (1-based) on rank R returns a NaN loss."""

import os
import sys

import torch

from mimlab.cli import run
from mimlab.methods.masked import MaskedPrediction
from mimlab.nn.ops import patchify

_forward = MaskedPrediction.forward
_sample = MaskedPrediction.sample_inputs


def _sample_noise_from_pixels(self, images, generator=None, noise=None, mask=None):
    p = self.encoder.patch_size
    noise = torch.sin(patchify(images.float(), p).sum(-1) * 12.9898)
    return _sample(self, images, generator, noise=noise, mask=mask)


def _forward_with_nan(self, images, labels=None, **inputs):
    out = _forward(self, images, labels, **inputs)
    self._calls = getattr(self, "_calls", 0) + 1
    if os.environ.get("NAN_AT") == f"{os.environ.get('RANK', '0')}:{self._calls}":
        out["loss"] = out["loss"] * float("nan")
    return out


MaskedPrediction.sample_inputs = _sample_noise_from_pixels
MaskedPrediction.forward = _forward_with_nan

if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
