"""A user's own image data and model, end to end through the real Simulation Engine."""

import csv
import json

import pytest

from experiments.local_run import local_superlink
from tests.image_folders import write_image_folder


def run(tmp_path, config: str, name: str) -> tuple[list[dict], dict]:
    with local_superlink(tmp_path / "flwr-home") as link:
        done = link.run(
            f"{config} num-server-rounds=2 ip-max-iterations=40 ip-interval=20 "
            f"cost-profile='paper-uniform' output-dir='{tmp_path}' run-name='{name}'",
            num_supernodes=2,
            timeout_s=300,
            capture=True,
        )
    log = done.stdout + done.stderr
    assert done.returncode == 0 and (tmp_path / name / "summary.json").exists(), log[-3000:]
    rows = list(csv.DictReader((tmp_path / name / "metrics.csv").open()))
    return rows, json.loads((tmp_path / name / "summary.json").read_text())


def test_a_grayscale_folder_with_its_own_test_split_and_a_model_by_import_path(tmp_path):
    folder = write_image_folder(tmp_path / "digits", 10, (1, 28, 28), per_class=30, with_test=True)
    rows, summary = run(
        tmp_path,
        f"dataset='local' data-source='{folder}' model='tests.tiny_model:build'",
        "gray",
    )
    assert [int(r["replies"]) for r in rows[1:]] == [2, 2]
    weights = {k: v for k, v in summary.items() if k == "layer_densities"}["layer_densities"]
    assert weights["5.weight"] <= 1.0  # the import-path model's Linear layer, 10 outputs
    assert summary["parameters"] == 4 * 9 + 4 + 4 + 4 + 64 * 10 + 10
    # Its own test split: 5 images per class.
    assert summary["final_accuracy"] * 50 == round(summary["final_accuracy"] * 50)


# In the slow suite, which CI runs (about 90 s on 2 cores): the grayscale test above keeps
# the local-data route in the default suite.
@pytest.mark.slow
def test_a_colour_folder_of_64x64_images_split_by_test_fraction(tmp_path):
    folder = write_image_folder(tmp_path / "colour", 3, (3, 64, 64), per_class=40)
    rows, summary = run(
        tmp_path, f"dataset='local' data-source='{folder}' model='small-cnn'", "colour"
    )
    # small-cnn for 3x64x64 and 3 classes: fc1 sees 16 x 16 x 16, fc2 has 3 outputs.
    assert summary["parameters"] == (8 * 3 * 25 + 8) + (16 * 8 * 25 + 16) + (4096 * 64 + 64) + (
        64 * 3 + 3
    )
    assert float(rows[-1]["accuracy"]) > 1 / 3  # three classes: beats chance
