"""The runnable example of docs/protocol.md runs as written and gives a sensible result."""

from __future__ import annotations

import contextlib
import io
import re

from conftest import REPO


def python_blocks(markdown: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", markdown, re.S)


def test_the_fuse_arrays_example_of_the_protocol_page_runs_and_learns():
    """The last Python block of docs/protocol.md (two views of scikit-learn's digits, 10% labels) runs unchanged; its
    attention head lands far above chance (10 classes: 0.10). About 540 test images: 0.7 is over 20 standard
    errors above chance, and a linear model on these features reaches about 0.9."""
    example = python_blocks((REPO / "docs" / "protocol.md").read_text())[-1]
    scope: dict = {}
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        exec(compile(example, "docs/protocol.md", "exec"), scope)
    result = scope["result"]
    assert result["method"] == "attention[steps=100](pixels+pca)"  # options changed from the YAML are named
    assert result["test_accuracy"] > 0.7, result["test_accuracy"]
    assert result["folds"] == 5 and 120 <= result["n_labeled"] <= 130
    assert printed.getvalue().startswith("attention[steps=100](pixels+pca) ")


def test_the_checkpoint_example_of_the_own_encoders_page_runs_and_loads_every_weight(tmp_path, monkeypatch):
    """The Python block of docs/own_encoders.md runs unchanged (in a scratch folder): the checkpoint it writes loads
    into
    the backbone, and the saved features have the backbone's width."""
    monkeypatch.chdir(tmp_path)
    (example,) = python_blocks((REPO / "docs" / "own_encoders.md").read_text())
    scope: dict = {}
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        exec(compile(example, "docs/own_encoders.md", "exec"), scope)
    assert scope["width"] == 512 and tuple(scope["features"].shape) == (8, 512)
    assert (tmp_path / "resnet18_train.npy").is_file()
    assert scope["found"] == "state dict" and printed.getvalue().startswith("state dict 512 ")
