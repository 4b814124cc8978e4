"""Names and pictures people read: results carry the dataset's class names, the per-class table and the pretext-weight
heatmap show them (results written before the names were kept show class numbers), the report's figures keep their
titles inside the figure, and the command line answers ``--version`` and ``report --help``."""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest
from conftest import sslfuse
from matplotlib.backends.backend_agg import FigureCanvasAgg
from test_transfer import folder_contents

import ssl_fusion
from ssl_fusion.data.datasets.torchvision_sets import TorchvisionConfig, load_torchvision
from ssl_fusion.evaluation.result import FuseResult, Predictions
from ssl_fusion.report import figures
from ssl_fusion.report.figures import paired_figure, save_figure
from ssl_fusion.report.results import results_frame
from ssl_fusion.report.tables import write_report
from ssl_fusion.stages.fuse import write_result

PETS = ["owl", "cat", "dog"]  # a dataset's order, not the alphabet's
TRUE = np.array([0, 0, 1, 1, 2, 2, 2, 2])  # two owls, two cats, four dogs


def pet_result(seed: int, predicted: list[int], classes: list[str] = PETS, **fields) -> FuseResult:
    """A concat result on the eight ``TRUE`` images with its predictions kept."""
    predicted = np.array(predicted)
    return FuseResult(
        method="concat(a+b)",
        title="concat",
        family="concat",
        options={},
        pretexts=["a", "b"],
        labels={"regime": "1%", "seed": seed, "labeled_indices_sha256": f"subset{seed}"},
        metrics={"test_accuracy": float((predicted == TRUE).mean())},
        dataset="pets",
        pretraining_dataset="pets",
        encoder="small_cnn",
        encoder_seed=0,
        data_fingerprint="d" * 16,
        pretraining_fingerprint="p" * 16,
        classes=classes,
        evaluation={"evaluation_size": len(TRUE), "evaluation_sha256": "e" * 16},
        predictions=Predictions(predicted, TRUE),
        **fields,
    )


def test_the_per_class_table_names_the_classes_and_averages_each_over_seeds(tmp_path):
    """Known truth: seed 0 misses one dog of four, seed 1 one owl of two; per class, over the two seeds, owl
    (100 + 50) / 2, cat 100, dog (75 + 100) / 2."""
    write_result(tmp_path / "seed0", pet_result(0, [0, 0, 1, 1, 2, 2, 2, 0]))
    write_result(tmp_path / "seed1", pet_result(1, [0, 1, 1, 1, 2, 2, 2, 2]))
    write_report(tmp_path)
    table = pd.read_csv(tmp_path / "per_class_accuracy.csv").set_index("class")
    assert table.index.tolist() == PETS
    assert table["accuracy"].to_dict() == pytest.approx({"owl": 75.0, "cat": 100.0, "dog": 87.5})
    assert (table["seeds"] == 2).all() and set(table["method"]) == {"concat(a+b)"}
    markdown = (tmp_path / "report.md").read_text()
    assert "Per-class accuracy" in markdown and re.search(r"\|\s+owl\s+\|\s+cat\s+\|\s+dog\s+\|", markdown)


def test_a_result_written_before_the_names_were_kept_names_its_classes_by_number(tmp_path):
    """A results.json without ``classes`` (or with the class indices the protocol used to list) still reports."""
    write_result(tmp_path / "seed0", pet_result(0, [0, 0, 1, 1, 2, 2, 2, 0]))
    record = json.loads((tmp_path / "seed0" / "results.json").read_text())
    del record["classes"]
    (tmp_path / "seed0" / "results.json").write_text(json.dumps(record))
    write_result(tmp_path / "seed1", pet_result(1, [0, 1, 1, 1, 2, 2, 2, 2], classes=[]))
    record = json.loads((tmp_path / "seed1" / "results.json").read_text())
    (tmp_path / "seed1" / "results.json").write_text(json.dumps({**record, "classes": [0, 1, 2]}))
    write_report(tmp_path)
    table = pd.read_csv(tmp_path / "per_class_accuracy.csv", dtype={"class": str})
    assert table["class"].tolist() == ["0", "1", "2"]
    assert FuseResult.from_record({**record, "classes": [0, 1, 2]}).classes == ["0", "1", "2"]


def heatmap_labels(monkeypatch, results: list[FuseResult]) -> list[str]:
    """The row labels of the pretext-weight heatmap of ``results`` (the figure kept instead of written)."""
    drawn = []
    monkeypatch.setattr(figures, "save_figure", lambda figure, path: drawn.append(figure))
    assert figures.plot_pretext_weights(results_frame(results), None)
    return [label.get_text() for label in drawn[0].axes[0].get_yticklabels()]


def test_the_heatmap_rows_are_the_class_names_in_class_order(monkeypatch):
    weights = {"dog": {"a": 0.9, "b": 0.1}, "cat": {"a": 0.2, "b": 0.8}, "owl": {"a": 0.5, "b": 0.5}}
    named = pet_result(0, TRUE.tolist(), details={"pretext_weights_per_class": weights})
    assert heatmap_labels(monkeypatch, [named]) == PETS
    by_number = {"0": weights["owl"], "1": weights["cat"], "2": weights["dog"]}
    earlier = pet_result(0, TRUE.tolist(), classes=[], details={"pretext_weights_per_class": by_number})
    assert heatmap_labels(monkeypatch, [earlier]) == ["0", "1", "2"]


def long_paired_table() -> pd.DataFrame:
    """Three references, the third with a long name, and rows with long method labels, as a study's report has."""
    methods = [
        "attention[screen=False](rotation+simclr+shuffled_labels+jigsaw+random)",
        "concat[screen=False](rotation+simclr+shuffled_labels+jigsaw+random)",
        "logreg_cv(rotation+simclr+random)",
    ]
    references = ["concat", "select[by=val]", "best single on validation (rotation+simclr+shuffled_labels+jigsaw)"]
    rows = [
        {
            "reference": reference,
            "method": method,
            "dataset": "fashion_mnist",
            "encoder": "small_cnn",
            "regime": regime,
            "pairs": "25 (5×5)",
            "role": "exploratory",
            "difference": 1.0 + number,
            "low": 0.5 + number,
            "high": 1.5 + number,
        }
        for reference in references
        for number, method in enumerate(methods)
        for regime in ("1%", "5/class")
    ]
    return pd.DataFrame(rows)


def title_boxes(figure) -> list:
    """Each title's extent, measured on a renderer of the figure's own resolution (a text keeps the renderer it was
    last drawn with: here the PNG's)."""
    renderer = FigureCanvasAgg(figure).get_renderer()
    return [axis.title.get_window_extent(renderer) for axis in figure.axes if axis.title.get_text()]


def inside(box, frame) -> bool:
    return frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1


def test_every_title_of_the_paired_figure_lies_inside_it(tmp_path):
    """Paired comparison: laid out as before (``tight_layout`` alone), the third panel's title sticks out of the
    figure; laid out by ``save_figure``, every title lies inside it, on more than one line where it must."""
    before = paired_figure(long_paired_table())
    before.tight_layout()
    assert not all(inside(box, before.bbox) for box in title_boxes(before))
    figure = paired_figure(long_paired_table())
    save_figure(figure, tmp_path / "paired_differences.png")
    boxes = title_boxes(figure)
    assert len(boxes) == 3 and all(inside(box, figure.bbox) for box in boxes)
    assert "\n" in figure.axes[2].title.get_text()
    assert (tmp_path / "paired_differences.png").stat().st_size > 0


def test_version_prints_the_package_version(tmp_path):
    proc = sslfuse("--version", cwd=tmp_path)
    assert proc.stdout.strip() == f"sslfuse {ssl_fusion.__version__}" and proc.stderr == ""


def test_report_help_prints_its_usage_and_succeeds(tmp_path):
    proc = sslfuse("report", "--help", cwd=tmp_path)
    assert proc.stdout.startswith("usage: sslfuse report <folder>") and "--primary" in proc.stdout
    assert proc.stderr == "" and not list(tmp_path.iterdir())  # nothing read or written


class StandIn:
    """What a torchvision dataset gives the loader: images, labels and, in most, ``classes``."""

    def __init__(self, classes: list[str] | None = None) -> None:
        self.data = np.zeros((4, 8, 8, 3), dtype=np.uint8)
        if classes is None:
            self.labels = [0, 1, 0, 1]  # SVHN's way: labels and no class names
        else:
            self.targets, self.classes = [0, 1, 0, 1], classes


def test_a_torchvision_dataset_is_named_by_its_classes_or_else_by_its_labels(tmp_path):
    cfg = TorchvisionConfig(name="stand_in", download=False)
    named = load_torchvision("stand_in", lambda root, train, download: StandIn(["plane", "car"]), cfg, tmp_path)
    assert named.classes == ["plane", "car"]
    unnamed = load_torchvision("stand_in", lambda root, train, download: StandIn(), cfg, tmp_path)
    assert unnamed.classes == ["0", "1"]


FOLDERS = ["cat", "dog", "owl"]  # an image folder's classes: its class folders, sorted


def write_named_folder(folder, names: list[str], per_class: int = 6, size: int = 12) -> None:
    """``per_class`` PNGs in a folder per class name, each class its own colour with seeded noise."""
    from PIL import Image

    generator = np.random.default_rng(0)
    for number, name in enumerate(names):
        (folder / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = np.clip(80 * number + generator.integers(0, 60, (size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / name / f"{i}.png")


@pytest.mark.slow
def test_an_image_folders_class_names_reach_the_results_and_the_per_class_table(tmp_path):
    """``sslfuse run`` on a folder of cat, dog and owl pictures: the results name the classes by their folders, the
    attention head's per-class weights are keyed by them, and the report's per-class table shows them."""
    folder, work = tmp_path / "pets", tmp_path / "work"
    write_named_folder(folder, FOLDERS)
    work.mkdir()
    before = folder_contents(folder)
    sslfuse(
        "run",
        "dataset=image_folder",
        f"data_dir={folder}",
        "dataset.image_size=12",
        "dataset.test_fraction=0.5",
        "pretexts=[rotation,random]",
        "fusions=[attention]",
        "seeds=[0]",
        "labels.per_class=2",
        "train.epochs=1",
        "train.max_steps_per_epoch=2",
        "train.num_workers=0",
        "cache.num_workers=0",
        "probe.max_train=100",
        "probe.max_test=50",
        "hydra.run.dir=run",
        cwd=work,
    )
    assert folder_contents(folder) == before
    (result,) = [json.loads(path.read_text()) for path in (work / "run").rglob("results.json")]
    assert result["classes"] == FOLDERS and sorted(result["pretext_weights_per_class"]) == FOLDERS
    table = pd.read_csv(work / "run" / "per_class_accuracy.csv")
    assert table["class"].tolist() == FOLDERS
    assert re.search(r"\|\s+cat\s+\|\s+dog\s+\|\s+owl\s+\|", (work / "run" / "report.md").read_text())
