"""A harness stopped mid-run leaves nothing behind: SIGTERM unwinds `local_superlink` as
Ctrl-C does, and leaving it stops the `flwr run` in progress (experiments.compare runs it
in a thread) before the SuperLink. Before, a SIGTERMed `experiments.compare` left its
SuperLink, the run and its Ray simulation running; and a `flwr run` that outlived its
SuperLink could start Flower's managed one, which nobody stopped."""

import os
import signal
import subprocess
import sys
import time

import pytest

from experiments.local_run import PROJECT_DIR, _alive, descendants

pytestmark = pytest.mark.slow  # a real simulation, stopped in its rounds (about 40 s)

PRESET = """
model = "small-cnn"
cost-profile = "paper-uniform"
num-server-rounds = 400
clients-per-round = 2
ip-max-iterations = 20

[harness]
num-supernodes = 2
seeds = [0]
targets = [0.9]
methods = ["prunefl"]
"""


def test_a_sigtermed_comparison_stops_every_process_it_started(tmp_path):
    preset = tmp_path / "long.toml"
    preset.write_text(PRESET)
    out = tmp_path / "out"
    log = (tmp_path / "compare.log").open("w")
    cmd = [sys.executable, "-m", "experiments.compare", "--preset", str(preset), "--out", str(out)]
    compare = subprocess.Popen(
        cmd, cwd=PROJECT_DIR, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    seen: set[int] = set()
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and compare.poll() is None:
            seen.update(descendants(compare.pid))
            if any("[fedprune] round   2" in p.read_text() for p in out.glob("runs/*.log")):
                break
            time.sleep(0.5)
        else:
            pytest.fail("the run never reached round 2: " + (tmp_path / "compare.log").read_text())
        seen.update(descendants(compare.pid))
        compare.send_signal(signal.SIGTERM)
        assert compare.wait(timeout=60) != 0
        time.sleep(1)
        left = [pid for pid in seen if _alive(pid)]
        assert not left, f"left running: {left}"
    finally:  # whatever the outcome, this test leaves nothing either
        for pid in [*descendants(compare.pid), *seen, compare.pid]:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        compare.wait(timeout=10)
