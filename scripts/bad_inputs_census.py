"""Count how the mimlab on ``PYTHONPATH`` answers the bad-input cases of
``tests/test_bad_inputs.py`` (issue 26): clean (the expected exit code and one ``mimlab:``
line), other one-line answers, several lines (argparse usage), tracebacks (an exception
escaped), wrong successes (exit 0), cases that changed an earlier run's files (lost or mixed
data) and cases that left a new folder behind.

    PYTHONPATH=<checkout> OMP_NUM_THREADS=1 python scripts/bad_inputs_census.py DATA [--json F]

DATA: labelled images (e.g. ../shared/data/cifar10). Runs every case in this process on tiny
runs (a few seconds each, after one tiny pretraining run).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]


def _cases():
    spec = importlib.util.spec_from_file_location(
        "bad_inputs", HERE / "tests" / "test_bad_inputs.py"
    )
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bad_inputs"] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    bi = _cases()
    from mimlab.cli import run  # the mimlab under test (PYTHONPATH)

    root = Path(tempfile.mkdtemp(prefix="census-"))
    out, files, pristine = root / "runs", root / "files", root / "pristine"
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = run(["pretrain", f"--data={a.data}", f"--out={out}", "--name=done", *bi.TINY.split()])
    assert rc == 0, err.getvalue()[-2000:]
    files.mkdir()
    (files / "zero.pt").write_bytes(b"")
    (files / "garbage.pt").write_bytes(os.urandom(300))
    (files / "text.pt").write_text("not a checkpoint\n")
    (files / "other.pt").write_bytes(b"an existing file")
    (files / "dir").mkdir()
    (files / "dir" / "keep.txt").write_text("keep")
    (files / "tag.yaml").write_text("x: !!python/object/apply:os.system ['true']\n")
    busy = out / "busy"
    busy.mkdir()
    (busy / "config.yaml").write_text("run: {}\n")
    (busy / ".lock").write_text(json.dumps({"pid": os.getppid(), "host": os.uname().nodename}))
    shutil.copytree(root, pristine, ignore=shutil.ignore_patterns("pristine"))
    world = {"data": a.data, "out": str(out), "files": str(files)}
    rows = []
    counts = dict.fromkeys(
        ("clean", "other one line", "several lines", "traceback", "wrong success", "lost"), 0
    )
    counts["left behind"] = 0

    def earlier() -> dict:  # the earlier run, the locked folder and the odd files
        return {k: bi._digest(root / k) for k in ("runs/done", "runs/busy", "files")}

    for case in bi.CASES:
        before = earlier()
        err = io.StringIO()
        escaped = None
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                rc = run(bi._fill(case.args, world))
            except SystemExit as e:
                rc = e.code
            except BaseException as e:  # noqa: BLE001 - what a user would see as a traceback
                rc, escaped = None, f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
        lines = bi.error_lines(err.getvalue())
        lost = earlier() != before
        left = sorted(p.name for p in out.iterdir() if p.name not in ("busy", "done"))
        if escaped or "Traceback" in err.getvalue():
            kind = "traceback"
        elif rc == 0:
            kind = "wrong success"
        elif rc == case.rc and len(lines) == 1 and case.message in lines[0]:
            kind = "clean"
        else:
            kind = "other one line" if len(lines) == 1 else "several lines"
        counts[kind] += 1
        counts["lost"] += int(lost)
        counts["left behind"] += int(bool(left))
        said = escaped or (lines[0][:160] if lines else "")
        rows.append(
            {"case": case.id, "rc": rc, "kind": kind, "lost": lost, "left": left, "said": said}
        )
        flags = ("LOST/MIXED " if lost else "") + (f"LEFT {left} " if left else "")
        print(f"{case.id:36s} rc={rc!s:4s} {kind:14s} {flags}{said}", flush=True)
        if lost or left:  # restore the earlier run and the odd files for the next case
            shutil.rmtree(out)
            shutil.rmtree(files)
            shutil.copytree(pristine / "runs", out)
            shutil.copytree(pristine / "files", files)
    counts["cases"] = len(bi.CASES)
    print(json.dumps(counts))
    if a.json:
        Path(a.json).write_text(json.dumps({"counts": counts, "rows": rows}, indent=2))
    shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
