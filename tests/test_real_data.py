"""Real images (a Fashion-MNIST subset): a short pretraining beats random init; the whole run works."""

from __future__ import annotations

import json

import pandas as pd
from conftest import needs_fashion_mnist, sslfuse

SUBSET = ["dataset.max_train=4000", "dataset.max_test=1000", "probe.max_test=1000"]


def encoder_metrics(folder) -> dict[str, dict]:
    paths = (folder / "outputs" / "artifacts" / "encoders").glob("*/manifest.json")
    return {m["config"]["pretext"]["name"]: m["metrics"] for m in map(json.loads, (p.read_text() for p in paths))}


@needs_fashion_mnist
def test_short_rotation_pretraining_beats_random_init_on_knn(tmp_path):
    short = [*SUBSET, "train.epochs=2", "train.batch_size=64", "pretext.lr=0.005"]
    sslfuse("pretrain", "pretext=rotation", *short, "hydra.run.dir=rot", cwd=tmp_path)
    sslfuse("pretrain", "pretext=random", *SUBSET, "hydra.run.dir=rand", cwd=tmp_path)
    metrics = encoder_metrics(tmp_path)
    losses = metrics["rotation"]["epoch_losses"]
    assert len(losses) == 2 and losses[1] < losses[0] < 1.386  # below chance level ln(4)
    # Measured on these 1000 test images: kNN 0.758 vs 0.745 (random) and linear probe 0.829 vs 0.800 in
    # fp32 (precision=auto on a CPU without native bf16); kNN 0.773 vs 0.744 with bf16 autocast.
    rotation, random = metrics["rotation"], metrics["random"]
    assert rotation["knn_accuracy"] > random["knn_accuracy"] + 0.01, metrics
    assert rotation["linear_accuracy"] > random["linear_accuracy"] + 0.015, metrics


@needs_fashion_mnist
def test_whole_run_on_real_images(tmp_path):
    sslfuse(
        "run", "dataset.max_train=2000", "dataset.max_test=1000", "probe.max_test=500", "train.epochs=1",
        "pretexts=[rotation,random]", "fusions=[attention,single]", "seeds=[0,1]", "labels.fraction=0.05",
        "hydra.run.dir=real", cwd=tmp_path,
    )
    report = pd.read_csv(tmp_path / "real" / "report.csv").set_index("method")
    assert set(report.index) == {"attention(rotation+random)", "single(rotation)", "single(random)"}
    assert (report["seeds"] == 2).all() and (report["regime"] == "5%").all()
    assert (report["mean"] > 50).all()  # ten classes: chance is 10%
