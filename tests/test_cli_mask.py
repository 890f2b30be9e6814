"""The top-level CLI and `hybridmask mask`."""
import numpy as np
import pytest
from PIL import Image

from hybridmask.cli import main


def test_help_and_unknown_command(capsys):
    assert main([]) == 2
    assert "COMMAND" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["frobnicate"])


def test_mask_command_writes_views_and_reports_bad_images(tmp_path, capsys):
    src = tmp_path / "src" / "alice"
    src.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (112, 112, 3), dtype=np.uint8)).save(src / f"{i}.jpg")
    assert main(["mask", str(tmp_path / "src"), str(tmp_path / "out"), "--seed", "0"]) == 0
    outs = sorted((tmp_path / "out" / "alice").glob("*.png"))
    assert [o.name for o in outs] == ["0.png", "1.png"]
    assert Image.open(outs[0]).size == (112, 112)
    assert not list((tmp_path / "out").rglob("*.tmp"))  # nothing half-written
    (src / "broken.jpg").write_bytes(b"not a jpeg")
    assert main(["mask", str(tmp_path / "src"), str(tmp_path / "out2")]) == 1
    err = capsys.readouterr().err
    assert "cannot read image" in err and "broken.jpg" in err
    assert not (tmp_path / "out2" / "alice" / "broken.png").exists()
    assert main(["mask", str(tmp_path / "missing"), str(tmp_path / "o")]) == 1


def test_mask_command_takes_the_issue14_maskings(tmp_path, capsys):
    src = tmp_path / "src" / "bob"
    src.mkdir(parents=True)
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (112, 112, 3), dtype=np.uint8)).save(src / "0.jpg")
    assert main(["mask", str(tmp_path / "src"), str(tmp_path / "o1"), "--mix", "orthogonal", "--shuffle", "key",
                 "--subset", "60", "--seed", "0"]) == 0
    assert (tmp_path / "o1" / "bob" / "0.png").is_file()
    assert main(["mask", str(tmp_path / "src"), str(tmp_path / "o2"), "--subset", "0"]) == 1
    assert "subset" in capsys.readouterr().err
