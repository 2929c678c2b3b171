"""`bench/scale.py`'s loop rows still measure what they say after the code they time moves: a two-round run of
the bare loop and of the train flow reports seconds a round and a training time taken by hooking the clients'
trainer (a moved `run_client` made the bench crash, or would leave the training time at zero)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("way", ["bare", "flow"])
def test_a_two_round_loop_reports_its_rounds_and_the_clients_training_time(way):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "scale.py"), "--one", "loop", way, "tiny", "10", "2",
                          "2", "1"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    row = json.loads(out.stdout.strip().splitlines()[-1])
    assert row["s_per_round"] > 0
    assert 0 < row["train_s_per_round"] <= row["s_per_round"]
