"""hybridmask.data: face folders, restricted .bin files, protocol readers, synthetic faces,
make-bin and alignment."""
from __future__ import annotations

import io
import os
import pickle
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hybridmask.data import (BinPairs, FaceFolder, SyntheticFaces, UnsafePickleError, read_bin, read_cfp_pairs,
                             read_lfw_pairs, synthetic_pairs, write_bin)
from hybridmask.data.image import decode_image, load_image


def _jpeg(seed: int, size: int = 112, fmt: str = "JPEG") -> bytes:
    rng = np.random.default_rng(seed)
    arr = (rng.uniform(0, 255, (size // 8, size // 8, 3))).astype(np.uint8)
    img = Image.fromarray(arr).resize((size, size), Image.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def _make_tree(root: Path, counts: dict) -> None:
    for ident, n in counts.items():
        d = root / ident
        d.mkdir(parents=True)
        for j in range(n):
            (d / f"{ident}_{j + 1:04d}.jpg").write_bytes(_jpeg(hash((ident, j)) % 10_000))


# ---------------------------------------------------------------- FaceFolder
def test_face_folder_layout_and_labels(tmp_path):
    _make_tree(tmp_path, {"zed": 2, "amy": 3, "bob": 1})
    (tmp_path / "amy" / "notes.txt").write_text("not an image")
    ds = FaceFolder(tmp_path)
    assert ds.classes == ["amy", "bob", "zed"]
    assert len(ds) == 6 and ds.num_classes == 3
    x, y = ds[0]
    assert x.shape == (3, 112, 112) and x.dtype == torch.float32
    assert -1.0 <= float(x.min()) and float(x.max()) <= 1.0 and y == 0
    assert Counter(ds.targets) == {0: 3, 1: 1, 2: 2}
    sub = FaceFolder(tmp_path, identities=["zed", "bob"])
    assert sub.classes == ["bob", "zed"] and sub.targets == [0, 1, 1]
    assert FaceFolder(tmp_path, min_images=2).classes == ["amy", "zed"]
    flipped = FaceFolder(tmp_path, transform=lambda t: t.flip(-1))
    assert torch.equal(flipped[0][0], x.flip(-1))


def test_face_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        FaceFolder(tmp_path / "missing")
    (tmp_path / "empty_identity").mkdir()
    with pytest.raises(ValueError, match="no identity folders"):
        FaceFolder(tmp_path)
    _make_tree(tmp_path, {"amy": 2})
    with pytest.raises(KeyError, match="carl"):
        FaceFolder(tmp_path, identities=["amy", "carl"])
    bad = tmp_path / "amy" / "amy_0003.jpg"
    bad.write_bytes(b"\xff\xd8\xff garbage, not a jpeg")
    ds = FaceFolder(tmp_path)
    with pytest.raises(ValueError, match="amy_0003.jpg"):
        ds[2]
    Image.new("RGB", (64, 80)).save(tmp_path / "amy" / "amy_0004.png")
    with pytest.raises(ValueError, match="align"):
        ds = FaceFolder(tmp_path)
        ds[3]


def test_face_folder_real_celeba(faces_root):
    ds = FaceFolder(faces_root / "celeba_112", min_images=20)
    assert ds.num_classes >= 100
    assert ds.classes == sorted(ds.classes)
    for i in (0, len(ds) // 2, len(ds) - 1):
        x, y = ds[i]
        assert x.shape == (3, 112, 112) and 0 <= y < ds.num_classes
        assert float(x.std()) > 0.1  # a real photo, not a blank
    assert min(Counter(ds.targets).values()) >= 20


# ---------------------------------------------------------------- .bin files
def test_bin_round_trip(tmp_path):
    imgs = [_jpeg(i) for i in range(6)]
    imgs[5] = _jpeg(5, fmt="PNG")
    same = [True, False, True]
    path = tmp_path / "tiny.bin"
    write_bin(path, imgs, same)
    got_imgs, got_same = read_bin(path)
    assert got_imgs == imgs and got_same == same
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # atomic: no leftovers
    bp = BinPairs(path)
    assert len(bp) == 3 and bp.num_images == 6
    a, b, s = bp[1]
    assert s is False and a.shape == b.shape == (3, 112, 112)
    assert torch.equal(a, decode_image(imgs[2]))
    vs = bp.verification_set()
    assert vs.pairs.tolist() == [[0, 1], [2, 3], [4, 5]] and vs.folds is None


def test_bin_reads_python2_style_and_old_protocols(tmp_path):
    imgs, same = [_jpeg(0), _jpeg(1)], [True]
    for proto in (0, 2):  # protocols 0-2 encode bytes via _codecs.encode(str, 'latin1')
        p = tmp_path / f"p{proto}.bin"
        p.write_bytes(pickle.dumps((imgs, same), protocol=proto))
        assert read_bin(p) == (imgs, same)
    # a Python 2 pickle: str images as SHORT_BINSTRING / BINSTRING opcodes, bools as NEWTRUE
    body = b"\x80\x02(]q\x00(" + b"".join(b"T" + len(b).to_bytes(4, "little") + b for b in imgs) + b"e]q\x01\x88at."
    p = tmp_path / "py2.bin"
    p.write_bytes(body)
    assert read_bin(p) == (imgs, same)


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_bin_refuses_code_execution(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.bin"
    path.write_bytes(pickle.dumps(([_Evil(marker), b"x"], [True])))
    with pytest.raises(UnsafePickleError, match="refusing to unpickle") as ei:
        read_bin(path)
    assert "system" in str(ei.value)
    assert not marker.exists()
    path.write_bytes(pickle.dumps((["a"], np.zeros(1))))
    with pytest.raises(UnsafePickleError, match="refusing to unpickle numpy"):
        read_bin(path)


def test_bin_corrupt_and_malformed(tmp_path):
    good = pickle.dumps(([_jpeg(0), _jpeg(1)], [True]), protocol=4)
    p = tmp_path / "trunc.bin"
    p.write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        read_bin(p)
    p.write_bytes(os.urandom(64))
    with pytest.raises(ValueError):
        read_bin(p)
    p.write_bytes(pickle.dumps({"images": []}))
    with pytest.raises(ValueError, match="expected a pickled"):
        read_bin(p)
    p.write_bytes(pickle.dumps(([_jpeg(0)], [True])))
    with pytest.raises(ValueError, match="2 images per pair"):
        read_bin(p)
    with pytest.raises(FileNotFoundError):
        read_bin(tmp_path / "nope.bin")
    with pytest.raises(ValueError, match="image 1"):
        write_bin(tmp_path / "w.bin", [_jpeg(0), b"not an image"], [False])
    assert not (tmp_path / "w.bin").exists()
    p.write_bytes(pickle.dumps(([_jpeg(0), b"\x00junk"], [True])))
    with pytest.raises(ValueError, match="image 1"):
        BinPairs(p)[0]


# ---------------------------------------------------------------- protocols
def test_lfw_reader_small(tmp_path):
    _make_tree(tmp_path, {"Ann": 3, "Bob": 1, "Cy": 2})
    (tmp_path / "pairs.txt").write_text("2\t1\nAnn\t1\t3\nAnn\t2\tBob\t1\nCy\t1\t2\nBob\t1\tCy\t2\n")
    pairs = read_lfw_pairs(tmp_path)
    assert [(Path(a).name, Path(b).name, s, f) for a, b, s, f in pairs] == [
        ("Ann_0001.jpg", "Ann_0003.jpg", True, 0), ("Ann_0002.jpg", "Bob_0001.jpg", False, 0),
        ("Cy_0001.jpg", "Cy_0002.jpg", True, 1), ("Bob_0001.jpg", "Cy_0002.jpg", False, 1)]
    (tmp_path / "pairs.txt").write_text("1\t1\nAnn\t1\t9\nAnn\t2\tBob\t1\n")
    with pytest.raises(FileNotFoundError, match="Ann_0009"):
        read_lfw_pairs(tmp_path)
    (tmp_path / "pairs.txt").write_text("1\t1\nAnn\t1\nAnn\t2\tBob\t1\n")
    with pytest.raises(ValueError, match="line 2"):
        read_lfw_pairs(tmp_path)
    with pytest.raises(FileNotFoundError):
        read_lfw_pairs(tmp_path, tmp_path / "missing.txt")


def test_lfw_reader_real(faces_root):
    pairs = read_lfw_pairs(faces_root / "lfw_112", faces_root / "lfw_112" / "pairs.txt")
    assert len(pairs) == 6000
    folds = Counter(f for *_, f in pairs)
    assert sorted(folds) == list(range(10)) and set(folds.values()) == {600}
    for k in range(10):
        assert sum(s for _, _, s, f in pairs if f == k) == 300
    a, b, s, _ = pairs[0]
    assert s and Path(a).parent == Path(b).parent
    a, b, s, _ = pairs[300]
    assert not s and Path(a).parent != Path(b).parent


@pytest.mark.parametrize("proto", ["FP", "FF"])
def test_cfp_reader_real(faces_root, proto):
    pairs = read_cfp_pairs(faces_root / "cfp_112", proto)
    assert len(pairs) == 7000
    assert set(Counter(f for *_, f in pairs).values()) == {700}
    assert sum(s for _, _, s, _ in pairs) == 3500
    for a, b, s, _ in pairs[:: 97]:
        assert Path(a).parent.name == "frontal"
        assert Path(b).parent.name == ("profile" if proto == "FP" else "frontal")
        assert (Path(a).parents[1].name == Path(b).parents[1].name) == s


def test_cfp_reader_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="Protocol"):
        read_cfp_pairs(tmp_path, "FP")
    with pytest.raises(ValueError, match="FP"):
        read_cfp_pairs(tmp_path, "XY")


# ---------------------------------------------------------------- synthetic faces
def test_synthetic_faces_deterministic_and_identity_structure():
    ds = SyntheticFaces(6, 4, size=64, seed=3)
    assert len(ds) == 24 and ds.num_classes == 6 and ds.targets[5] == 1
    x, y = ds[5]
    assert x.shape == (3, 64, 64) and y == 1 and float(x.min()) >= -1 and float(x.max()) <= 1
    assert torch.equal(x, SyntheticFaces(6, 4, size=64, seed=3)[5][0])
    assert not torch.equal(x, SyntheticFaces(6, 4, size=64, seed=4)[5][0])
    imgs = torch.stack([ds[i][0] for i in range(len(ds))]).flatten(1)
    labels = torch.tensor(ds.targets)
    d = torch.cdist(imgs, imgs)
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(len(ds), dtype=torch.bool)
    intra, inter = d[same & ~eye].mean(), d[~same].mean()
    assert intra < inter  # identities are learnable ...
    assert d[same & ~eye].min() > 0  # ... but every image is different


def test_synthetic_pairs():
    vs = synthetic_pairs(40, num_identities=10, images_per_identity=3, size=32, seed=1)
    assert len(vs) == 40 and vs.issame.sum() == 20 and vs.folds is None
    assert vs.image(0).shape == (3, 32, 32)
    with pytest.raises(ValueError):
        synthetic_pairs(1)


# ---------------------------------------------------------------- make-bin
def test_make_bin_cli(tmp_path):
    from hybridmask.cli import main
    root = tmp_path / "lfw_112"
    _make_tree(root, {"Ann": 3, "Bob": 1, "Cy": 2})
    (root / "pairs.txt").write_text("2\t1\nAnn\t1\t3\nAnn\t2\tBob\t1\nCy\t1\t2\nBob\t1\tCy\t2\n")
    out = tmp_path / "lfw.bin"
    assert main(["make-bin", "--target", "lfw", "--data", str(tmp_path), "--out", str(out), "--quiet"]) == 0
    imgs, same = read_bin(out)
    assert same == [True, False, True, False]
    assert imgs[0] == (root / "Ann" / "Ann_0001.jpg").read_bytes()  # stored bytes, not re-encoded
    assert main(["make-bin", "--target", "cfp_fp", "--data", str(tmp_path), "--out", str(out), "--quiet"]) == 1


# ---------------------------------------------------------------- alignment
def test_align_real_faces_and_blank(faces_root, tmp_path, capsys):
    cv2 = pytest.importorskip("cv2")
    pytest.importorskip("insightface")
    from hybridmask.data.align import align_folder
    src = tmp_path / "src"
    names = ["Aaron_Peirsol/Aaron_Peirsol_0001.jpg", "Abel_Pacheco/Abel_Pacheco_0001.jpg"]
    for n in names:
        img = cv2.imread(str(faces_root / "lfw_112" / n))
        big = cv2.copyMakeBorder(cv2.resize(img, (200, 200)), 120, 80, 150, 50, cv2.BORDER_CONSTANT, value=(40, 90, 30))
        (src / Path(n).parent).mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(src / n), big)
    cv2.imwrite(str(src / "Abel_Pacheco" / "blank.png"), np.full((300, 400, 3), 128, np.uint8))
    summary = align_folder(src, tmp_path / "dst", progress=False)
    out = capsys.readouterr().out
    assert summary["aligned"] == 2 and summary["failed"] == 1
    assert "blank.png" in out and "no face" in out
    report = (tmp_path / "dst" / "align_report.tsv").read_text()
    assert "Abel_Pacheco/blank.png\tno face detected" in report
    for n in names:
        aligned = load_image(tmp_path / "dst" / n)  # 112x112 or load_image raises
        original = load_image(faces_root / "lfw_112" / n)
        # re-aligning an aligned face lands on the same template: close to the original crop
        other = load_image(faces_root / "lfw_112" / names[1 - names.index(n)])
        assert (aligned - original).abs().mean() < 0.6 * (aligned - other).abs().mean()
