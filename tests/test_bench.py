"""``scripts/bench.py --preset smoke`` runs end to end and writes its table as JSON (timings themselves are not asserted)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

from conftest import REPO

COLUMNS = {"stage", "ours", "reference", "unit", "ratio", "target", "meets"}


def test_smoke_bench_writes_every_row(tmp_path):
    out = tmp_path / "bench.json"
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "COLUMNS": "200"}
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "bench.py"), "--preset", "smoke", "--out", str(out), "--artifacts-dir", str(tmp_path / "store")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1200,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert [r["stage"] for r in rows][:4] == ["cache", "pretrain rotation", "pretrain simclr", "fuse attention"]
    assert rows[4]["stage"] in (f"sweep (16 runs, {os.cpu_count()} at a time)", "sweep (16 runs, one at a time)")
    for r in rows:
        assert set(r) == COLUMNS, r
        for key in ("ours", "reference", "ratio", "target"):
            assert isinstance(r[key], (int, float)) and math.isfinite(r[key]) and r[key] > 0, (r["stage"], key, r[key])
        assert isinstance(r["meets"], bool) and r["meets"] == (r["ratio"] >= r["target"])
