"""The one entry to matplotlib: ``pyplot()`` returns ``matplotlib.pyplot`` on the
non-interactive Agg backend (figures are written to files, also on machines without a display).
"""

from __future__ import annotations

from types import ModuleType


def pyplot() -> ModuleType:
    """``matplotlib.pyplot`` with the Agg backend."""
    import matplotlib  # lazy: ~0.5 s to import, only when a figure is drawn (CLI start-up)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: as above

    return plt
