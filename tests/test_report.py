"""`python -m experiments.report`: RESULTS.md's tables are what the committed summary.csv
files give (mean ± standard deviation over seeds, goals computed, never typed)."""

import csv

import pytest

from experiments import report

COLUMNS = ["method", "seed", "rounds", "key", "commit", "final_accuracy", "final_density",
           "total_bytes", "total_sim_time_s", "total_device_time_s", "wall_time_s",
           "time_to_0.9_s", "device_time_to_0.9_s", "bytes_to_0.9"]  # fmt: skip


def row(method, seed, acc, t, d, b, density="0.0400"):
    values = [method, seed, 30, "k", "c0ffee", acc, density, 1_000_000, 100.0, 10.0, 60.0, t, d, b]
    return dict(zip(COLUMNS, values, strict=True))


def write(tmp_path, rows):
    folder = tmp_path / "results" / "default"
    folder.mkdir(parents=True)
    with (folder / "summary.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return tmp_path / "results"


def test_tables_give_mean_and_std_over_seeds_and_say_who_never_reached(tmp_path):
    rows = [
        row("prunefl", 0, 0.94, 2.0, 0.5, 3e6),
        row("prunefl", 1, 0.92, 4.0, 0.7, 5e6),
        row("prunefl", 2, 0.93, 3.0, 0.6, 4e6),
        row("fedavg-warm", 0, 0.935, 30.0, 1.0, 6e7, "1.0000"),
        row("fedavg-warm", 1, 0.935, 60.0, 2.0, 9e7, "1.0000"),
        row("fedavg-warm", 2, 0.935, "", "", "", "1.0000"),
        row("snip-warm", 0, 0.80, "", "", ""),
    ]
    text = report.render(write(tmp_path, rows))
    assert text.startswith(report.BEGIN) and text.rstrip().endswith(report.END)
    line = next(x for x in text.splitlines() if x.startswith("| prunefl |"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[1] == "3"
    assert cells[2] == "0.9300 ± 0.0100"  # mean and sample std of 0.94, 0.92, 0.93
    assert cells[7] == "3.0 ± 1.0"  # modelled seconds to 0.9
    assert cells[9] == "4.0 ± 1.0"  # MB to 0.9
    fedavg = next(x for x in text.splitlines() if x.startswith("| fedavg-warm |"))
    assert "45.0 ± 21.2 (2/3)" in fedavg  # two of three seeds reached 0.9
    snip = next(x for x in text.splitlines() if x.startswith("| snip-warm |"))
    assert "never" in snip
    # Goals: 3.0 / 45.0 = 0.0667 of FedAvg's modelled time (at most 1/3: met); accuracy
    # -0.5 points (at most 0.5 below: met); PruneFL reached 0.9, snip never did.
    assert "| 0.9 | 0.0667 | 0.4 | met (not every seed reached it) |" in text
    assert "-0.50 points (met)" in text
    assert "| snip-warm | only PruneFL reached it (met) |" in text


def test_a_missed_goal_says_by_how_much(tmp_path):
    rows = [row("prunefl", s, 0.90, 20.0, 1.0, 1e6) for s in (0, 1, 2)] + [
        row("fedavg-warm", s, 0.92, 30.0, 1.0, 1e7) for s in (0, 1, 2)
    ]
    text = report.render(write(tmp_path, rows))
    assert "missed: 2.00x the allowed time" in text
    assert "-2.00 points (missed by 1.50 points)" in text


def test_splice_keeps_the_prose_around_the_markers():
    doc = f"intro\n{report.BEGIN}\nold\n{report.END}\noutro\n"
    new = report.splice(doc, f"{report.BEGIN}\nnew\n{report.END}\n")
    assert new == f"intro\n{report.BEGIN}\nnew\n{report.END}\noutro\n"
    with pytest.raises(SystemExit, match="markers"):
        report.splice("no markers", "x")


def test_the_committed_tables_are_what_the_committed_csvs_give():
    assert report.presets(), "no summary.csv committed under experiments/results"
    assert report.main(["--check"]) == 0


def test_reconfiguration_is_judged_against_initial_pruning_alone_paired_by_seed(tmp_path):
    rows = [row("prunefl", s, acc, 10.0 + s, 1.0, 1e6) for s, acc in ((0, 0.95), (1, 0.93))]
    rows += [row("prunefl-ip-only", s, acc, 12.0, 1.0, 1e6) for s, acc in ((0, 0.94), (1, 0.94))]
    text = report.render(write(tmp_path, rows))
    # Seed 0: +1 point, seed 1: -1 point; time 10 - 12 and 11 - 12 seconds.
    assert "final accuracy 0.00 ± 1.41 points" in text
    assert "0.9: -1.5 ± 0.7 s" in text


def test_a_reference_already_at_the_target_is_said_not_divided_by(tmp_path):
    rows = [row("prunefl", s, 0.95, 5.0, 1.0, 1e6) for s in (0, 1, 2)] + [
        row("fedavg-warm", s, 0.95, 0.0, 0.0, 0) for s in (0, 1, 2)
    ]
    text = report.render(write(tmp_path, rows))
    assert "| 0.9 | – | – | missed: `fedavg-warm` starts at or above it |" in text
