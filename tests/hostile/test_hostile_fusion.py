"""Hostile inputs to the fusion heads and their options: a diverging head, label ids that are not 0..K-1, arrays
that do not fit together, seeds out of range and option names with path characters. Each is refused in one line
(a UserError, or exit code 2 with one line on stderr and nothing written) or, for labels, gives the same task."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import sslfuse
from sklearn.datasets import load_digits

from ssl_fusion.fusion.protocol import fuse_arrays
from ssl_fusion.runtime.errors import UserError

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """scikit-learn's 8x8 digits: the first 1,000 images to train on, the other 797 to test."""
    images, labels = load_digits(return_X_y=True)
    return images[:1000], labels[:1000], images[1000:], labels[1000:]


def one_line_refusal(proc) -> str:
    """The stderr line of a refused command, after checking that it is one line, exit code 2, no traceback."""
    line = proc.stderr.strip()
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "\n" not in line and "Traceback" not in line, line
    return line


# Item 4: a diverging head stops, naming the head and the option to change.


@pytest.mark.parametrize("fusion", ["concat", "attention", "ensemble"])
def test_a_head_whose_loss_is_not_finite_stops_naming_the_head_and_fusion_lr(digits, fusion):
    train, labels, test, test_labels = digits
    with pytest.raises(UserError, match=rf"fusion head {fusion} diverged: .* lower fusion\.lr \(now 1e\+30\)"):
        fuse_arrays({"px": train}, labels, {"px": test}, test_labels, fusion, {"lr": 1e30}, fraction=0.1)


@pytest.mark.slow
def test_fuse_with_a_diverging_lr_exits_in_one_line_and_writes_no_result(smoke_workspace):
    proc = sslfuse("fuse", "preset=smoke", "fusion=concat", "fusion.lr=1e30", "hydra.run.dir=diverged",
                   cwd=smoke_workspace, check=False)
    line = one_line_refusal(proc)
    assert "fusion head concat diverged" in line and "fusion.lr" in line
    assert not list((smoke_workspace / "diverged").glob("results.*"))
