"""Shared fixtures. Real-data tests read the data root from HYBRIDMASK_DATA
(default ../shared/data/faces relative to the repository root) and skip with a clear reason
when it is absent."""
from __future__ import annotations

import os

# OpenMP threads that spin while waiting make every torch op up to 10x slower when the 2 cores are
# shared with other processes (measured here); sleeping waits cost nothing on an idle machine.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def data_root() -> Path:
    return Path(os.environ.get("HYBRIDMASK_DATA", str(REPO.parent / "shared" / "data" / "faces"))).resolve()


@pytest.fixture(scope="session")
def faces_root() -> Path:
    root = data_root()
    if not (root / "lfw_112").is_dir():
        pytest.skip(f"real face data not found at {root} (set HYBRIDMASK_DATA to the folder holding lfw_112/, cfp_112/, celeba_112/)")
    return root


@pytest.fixture(autouse=True)
def _few_threads():
    # CI has 2 cores; keep each test from oversubscribing them
    torch.set_num_threads(2)
    yield


@pytest.fixture(scope="session")
def celeba16(faces_root):
    """16 real CelebA faces (4 identities x 4), uint8, with their labels."""
    from hybridmask.data.celeba import load_uint8
    from hybridmask.data.folder import FaceFolder
    root = faces_root / "celeba_112"
    if not root.is_dir():
        pytest.skip(f"CelebA faces not found at {root}")
    folder = FaceFolder(root)
    by_label = {}
    for p, y in folder.samples:
        by_label.setdefault(y, []).append(p)
    ids = [y for y in sorted(by_label) if len(by_label[y]) >= 4][:4]
    paths = [p for y in ids for p in sorted(by_label[y])[:4]]
    labels = torch.tensor([i for i in range(len(ids)) for _ in range(4)])
    return load_uint8(paths, progress=False), labels


@pytest.fixture(scope="session")
def small_faces_root(faces_root, tmp_path_factory) -> Path:
    """A data root with 10 CelebA identities (symlinks; ARL loads every CelebA identity) and the real LFW / CFP,
    for the tiny-budget benchmark and frontier runs (read-only: shared by every test of the session)."""
    dst = tmp_path_factory.mktemp("small_faces")
    (dst / "celeba_112").mkdir(parents=True)
    for d in sorted(p for p in (faces_root / "celeba_112").iterdir() if p.is_dir())[:10]:
        (dst / "celeba_112" / d.name).symlink_to(d.resolve(), target_is_directory=True)
    for name in ("lfw_112", "cfp_112"):
        (dst / name).symlink_to((faces_root / name).resolve(), target_is_directory=True)
    return dst


@pytest.fixture
def one_thread():
    """One torch thread for the test: training loops of thousands of tiny ops avoid sync stalls on a busy box."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
