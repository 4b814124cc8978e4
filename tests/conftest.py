"""Shared helpers: call the CLI as a user would, in a scratch folder."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ssl_fusion.config import TrainOverrides
from ssl_fusion.data.datasets.synthetic import SyntheticConfig, make_synthetic
from ssl_fusion.models.encoders import SmallCNNConfig
from ssl_fusion.stages.context import StageContext
from ssl_fusion.store.files import ArtifactStore

REPO = Path(__file__).resolve().parent.parent
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)


def in_ci() -> bool:
    """Whether the tests run under CI (``CI=true``, as CI services and ``.ci/run`` set it)."""
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def check_fashion_mnist(folder: Path = FASHION_MNIST_DIR) -> None:
    """Return if Debian's Fashion-MNIST files are in ``folder``. Otherwise fail the test under CI, where the real-data
    tests must run, and skip it elsewhere."""
    missing = [name for name in FASHION_MNIST_FILES if not (folder / name).is_file()]
    if not missing:
        return
    message = (
        f"Debian's Fashion-MNIST is missing ({', '.join(missing)} not in {folder}): install dataset-fashion-mnist "
        "(apt-get install dataset-fashion-mnist; scripts/setup.sh does it when run as root)"
    )
    if in_ci():
        pytest.fail(f"CI=true and the real-data tests cannot run. {message}", pytrace=False)
    pytest.skip(message)


@pytest.fixture
def fashion_mnist_files() -> Path:
    """The folder of Debian's Fashion-MNIST; skips the test without it, or fails it under CI
    (``check_fashion_mnist``)."""
    check_fashion_mnist(FASHION_MNIST_DIR)
    return FASHION_MNIST_DIR


needs_fashion_mnist = pytest.mark.usefixtures("fashion_mnist_files")


def sslfuse(*args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``sslfuse <args>`` in ``cwd`` (its outputs/ lands there); fail loudly with its output."""
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "COLUMNS": "200"}
    proc = subprocess.run(
        [sys.executable, "-m", "ssl_fusion.cli", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"sslfuse {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="session")
def smoke_workspace(tmp_path_factory) -> Path:
    """A folder where ``sslfuse run preset=smoke`` has run once (shared by the CLI tests)."""
    folder = tmp_path_factory.mktemp("smoke")
    sslfuse("run", "preset=smoke", "hydra.run.dir=first_run", cwd=folder)
    return folder


@pytest.fixture(scope="module")
def one_thread():
    """Fusion heads are tiny: on a busy machine extra intra-op threads only spin (a fit took 60x longer with two)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def kill_at_first_checkpoint(args: list[str], cwd: Path, poll_seconds: float = 0.02) -> None:
    """Start ``sslfuse <args>`` (a pretraining) in ``cwd`` and SIGKILL it as soon as its first resume checkpoint
    exists; fail if it ended before it could be killed."""
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "ssl_fusion.cli", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    checkpoints = cwd / "outputs" / "artifacts" / "checkpoints"
    deadline = time.monotonic() + 120
    while not list(checkpoints.glob("*/last.pt")) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(poll_seconds)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "pretraining ended before it could be killed"


def stored_encoder_state(folder: Path, pretext: str = "rotation") -> dict[str, torch.Tensor]:
    """The weights of the one ``pretext`` encoder stored under ``folder``'s ``outputs/artifacts``."""
    (path,) = (folder / "outputs" / "artifacts" / "encoders").glob(f"{pretext}-*/encoder.pt")
    return torch.load(path, weights_only=True)


def synthetic_context(store: Path, n_train: int, n_test: int) -> StageContext:
    """A CPU float32 stage context over ``n_train``/``n_test`` synthetic 16 px images, the small CNN and a store
    at ``store``."""
    cfg = SyntheticConfig(name="synthetic", n_train=n_train, n_test=n_test)
    return StageContext(
        cfg,
        make_synthetic(cfg, root=None),
        SmallCNNConfig(name="small_cnn"),
        torch.device("cpu"),
        torch.float32,
        ArtifactStore(store),
        TrainOverrides(),
        0,
    )
