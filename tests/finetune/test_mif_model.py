"""mIF generator (MIPHEI-ViT style): LoRA on q/v, ViTMatte / UNETR decoders, weighted MSE, LR schedule."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from torch import nn

from common.errors import InputError
from finetune.encoders import load_encoder
from finetune.lora import LoRALinear, apply_lora, lora_parameters, lora_state_dict, merge_lora
from finetune.mif.model import MIFUNet, build_mif_model, make_optimizer, tap_indices, weighted_mse
from finetune.synthetic import write_tiny_export
from finetune.training import miphei_lr_lambda

torch.set_num_threads(1)
ARCH = "vit_tiny_patch16_224"


def tiny_vit(patch: int = 8, img: int = 32, depth: int = 2, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return timm.create_model(
        ARCH, img_size=img, patch_size=patch, depth=depth, embed_dim=32, num_heads=2, num_classes=0
    ).eval()


def images(n: int = 2, img: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, img, img, generator=torch.Generator().manual_seed(seed))


def train_steps(model: nn.Module, x: torch.Tensor, n_steps: int = 3, seed: int = 2) -> None:
    target = (
        torch.rand(x.shape[0], model.n_markers, *x.shape[-2:], generator=torch.Generator().manual_seed(seed)) * 1.8
        - 0.9
    )
    opt = make_optimizer(model, lr=1e-2)
    model.train()
    for _ in range(n_steps):
        opt.zero_grad()
        weighted_mse(model(x), target, [0.5] * model.n_markers).backward()
        opt.step()


def base_params(model: MIFUNet) -> dict[str, torch.Tensor]:
    """Every encoder tensor that is not a LoRA adapter, cloned."""
    return {k: v.detach().clone() for k, v in model.backbone.named_parameters() if ".lora_" not in k}


# ---------------------------------------------------------------------------------------------
# LoRA
# ---------------------------------------------------------------------------------------------


def test_lora_at_init_is_the_base_model_and_freezes_everything_else():
    vit = tiny_vit()
    x = images()
    with torch.no_grad():
        before = vit.forward_features(x)
    names = apply_lora(vit, rank=4, alpha=2.0)
    assert names == ["blocks.0.attn.qkv", "blocks.1.attn.qkv"]
    with torch.no_grad():
        after = vit.forward_features(x)
    assert torch.equal(before, after)  # B = 0 → exactly the base computation
    trainable = {n for n, p in vit.named_parameters() if p.requires_grad}
    assert trainable == {f"blocks.{b}.attn.qkv.lora_{m}.{i}" for b in (0, 1) for m in "AB" for i in (0, 1)}
    qkv = vit.blocks[0].attn.qkv
    assert qkv.out_slices == ((0, 32), (64, 96))  # q and v thirds; k = 32..64 untouched
    assert qkv.scale == pytest.approx(2.0 / 4)
    assert all(b.abs().sum() == 0 for b in qkv.lora_B) and all(a.abs().sum() > 0 for a in qkv.lora_A)
    # Sizes: A (rank × in), B (width × rank), per adapted slice.
    assert [tuple(a.shape) for a in qkv.lora_A] == [(4, 32)] * 2 and [tuple(b.shape) for b in qkv.lora_B] == [
        (32, 4)
    ] * 2
    assert len(lora_parameters(vit)) == 8
    assert set(lora_state_dict(vit)) == trainable


def test_lora_training_changes_only_adapters_and_q_v_slices():
    model = build_mif_model(tiny_vit(), 2, finetune="lora")
    x = images()
    frozen_before = base_params(model)
    lora_before = [p.detach().clone() for p in lora_parameters(model)]
    decoder_before = [p.detach().clone() for p in model.decoder.parameters()]
    qkv = model.backbone.blocks[0].attn.qkv
    base_w = qkv.base.weight.detach().clone()

    train_steps(model, x)

    for name, value in base_params(model).items():  # qkv base weight/bias, patch embed, norms, mlp ...
        assert torch.equal(value, frozen_before[name]), name
        assert model.backbone.get_parameter(name).grad is None, name
    assert all(not torch.equal(a, b) for a, b in zip(lora_before, lora_parameters(model)))
    assert all(not torch.equal(a, b) for a, b in zip(decoder_before, model.decoder.parameters()))

    # Effective weight probed through the layer itself: f(e_i) − f(0) is column i of W_eff.
    with torch.no_grad():
        eye = torch.eye(qkv.in_features)
        w_eff = (qkv(eye) - qkv(torch.zeros(1, qkv.in_features))).t()  # (out, in)
    d = qkv.in_features
    torch.testing.assert_close(w_eff, qkv.effective_weight().detach(), rtol=0, atol=1e-5)
    torch.testing.assert_close(w_eff[d : 2 * d], base_w[d : 2 * d], rtol=0, atol=1e-6)  # k: unchanged
    assert torch.equal(qkv.effective_weight()[d : 2 * d], base_w[d : 2 * d])
    for rows in (slice(0, d), slice(2 * d, 3 * d)):  # q and v: adapted
        assert (w_eff[rows] - base_w[rows]).abs().max() > 1e-4


def test_merge_lora_gives_the_same_outputs_and_a_stock_timm_model():
    model = build_mif_model(tiny_vit(), 2, finetune="lora")
    x = images()
    train_steps(model, x, n_steps=2)
    model.eval()
    with torch.no_grad():
        out_lora = model(x)
        tokens_lora = model.backbone.forward_features(x)
    merge_lora(model.backbone)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert isinstance(model.backbone.blocks[0].attn.qkv, nn.Linear)
    with torch.no_grad():
        torch.testing.assert_close(model(x), out_lora, rtol=0, atol=1e-5)
    fresh = tiny_vit(seed=9)
    fresh.load_state_dict(model.backbone.state_dict(), strict=True)  # exportable as plain timm weights
    with torch.no_grad():
        torch.testing.assert_close(fresh.forward_features(x), tokens_lora, rtol=0, atol=1e-5)


def test_lora_linear_slices_and_separate_projections():
    torch.manual_seed(0)
    base = nn.Linear(6, 9)
    layer = LoRALinear(base, rank=2, alpha=4.0, out_slices=[(6, 9), (0, 3)])
    with torch.no_grad():
        for b in layer.lora_B:
            b.normal_()
    x = torch.randn(5, 6)
    expected = base(x).detach().clone()
    for (start, stop), a, b in zip(layer.out_slices, layer.lora_A, layer.lora_B):
        expected[:, start:stop] += 2.0 * (x @ a.t() @ b.t()).detach()  # scale = 4 / 2
    torch.testing.assert_close(layer(x).detach(), expected)
    torch.testing.assert_close(layer.merged()(x).detach(), expected, rtol=0, atol=1e-6)
    with pytest.raises(InputError):
        LoRALinear(nn.Linear(4, 4), out_slices=[(0, 3), (2, 4)])  # overlapping

    class SepAttn(nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj, self.k_proj, self.v_proj = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.self_attn = SepAttn()
            self.mlp = nn.Linear(4, 4)

    block = Block()
    assert apply_lora(block) == ["self_attn.q_proj", "self_attn.v_proj"]
    assert isinstance(block.self_attn.k_proj, nn.Linear) and not isinstance(block.self_attn.k_proj, LoRALinear)
    assert not block.mlp.weight.requires_grad


def test_lora_on_eva_with_separate_qkv_biases_stays_in_the_path():
    torch.manual_seed(0)
    eva = timm.create_model(
        "eva02_tiny_patch14_224", img_size=28, depth=1, embed_dim=32, num_heads=2, num_classes=0
    ).eval()
    x = images(1, 28)
    with torch.no_grad():
        before = eva.forward_features(x)
        apply_lora(eva)
        torch.testing.assert_close(eva.forward_features(x), before, rtol=0, atol=1e-6)
        for b in eva.blocks[0].attn.qkv.lora_B:
            b.normal_()
        assert (eva.forward_features(x) - before).abs().max() > 1e-6  # adapter reached (not bypassed)


# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["vitmatte", "unetr"])
@pytest.mark.parametrize("patch,img", [(8, 32), (16, 32), (32, 64)])
def test_variants_output_shape_range_and_backprop(variant, patch, img):
    model = build_mif_model(tiny_vit(patch=patch, img=img), 3, variant=variant, finetune="lora")
    x = images(2, img)
    sizes = []
    hooks = [blk.register_forward_hook(lambda m, i, o: sizes.append(tuple(o.shape[-2:]))) for blk in model.decoder]
    model.train()
    out = model(x)
    for h in hooks:
        h.remove()
    assert out.shape == (2, 3, img, img)
    assert out.abs().max() < 1.0
    assert sizes == [(img // 8,) * 2, (img // 4,) * 2, (img // 2,) * 2, (img,) * 2]  # H/8, H/4, H/2, H
    out.square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in lora_parameters(model))
    # At init B = 0, so the loss reaches B (not yet A) through the adapters of every block.
    for module in (m for m in model.modules() if isinstance(m, LoRALinear)):
        assert all(b.grad.abs().sum() > 0 for b in module.lora_B)
    assert all(p.grad is not None for p in model.heads.parameters())


def test_unetr_taps_intermediate_blocks():
    assert tap_indices(12, 4) == [2, 5, 8, 11]
    assert tap_indices(24, 4) == [5, 11, 17, 23]
    assert tap_indices(2, 4) == [0, 0, 1, 1]
    vit = tiny_vit(depth=4)
    model = build_mif_model(vit, 1, variant="unetr", finetune="frozen")
    assert model.tap_blocks == [0, 1, 2]
    x = images()
    with torch.no_grad():
        bottleneck, taps = model.encode(x)
        reference = vit.forward_intermediates(
            x, indices=[0, 1, 2], norm=False, output_fmt="NCHW", intermediates_only=True
        )
        final = vit.forward_features(x)[:, vit.num_prefix_tokens :].transpose(1, 2).reshape(2, 32, 4, 4)
    for got, want in zip(taps, reference):
        torch.testing.assert_close(got, want)
    torch.testing.assert_close(bottleneck, final)


def test_frozen_and_full_modes():
    x = images()
    frozen = build_mif_model(tiny_vit(), 2, finetune="frozen")
    frozen.train()
    assert not frozen.backbone.training and frozen.decoder[0].training
    frozen(x).mean().backward()
    assert all(p.grad is None and not p.requires_grad for p in frozen.backbone.parameters())
    assert all(p.grad is not None for p in frozen.decoder.parameters())
    s = frozen.trainable_summary()
    assert s["encoder"]["trainable"] == 0 and s["lora"]["total"] == 0
    assert s["all"]["trainable"] == s["detail_stream"]["total"] + s["decoder"]["total"] + s["heads"]["total"]

    full = build_mif_model(tiny_vit(), 2, finetune="full")
    full.train()
    full(x).mean().backward()
    assert all(p.requires_grad and p.grad is not None for p in full.backbone.parameters())
    s = full.trainable_summary()
    assert s["encoder"]["trainable"] == s["encoder"]["total"] == sum(p.numel() for p in tiny_vit().parameters())
    assert s["all"]["trainable"] == s["all"]["total"]


def test_lora_summary_counts_and_optimizer_groups():
    model = build_mif_model(tiny_vit(), 4, finetune="lora", lora_rank=8)
    s = model.trainable_summary()
    # 2 blocks × (q, v) × (A: 8 × 32 + B: 32 × 8)
    assert s["lora"] == {"trainable": 2 * 2 * (8 * 32 + 32 * 8), "total": 2 * 2 * (8 * 32 + 32 * 8)}
    assert s["encoder"]["trainable"] == 0
    assert s["heads"]["total"] == 4 * (32 * 9 + 1)  # conv3×3 32 → 1 per marker
    opt = make_optimizer(model)
    in_opt = {id(p) for group in opt.param_groups for p in group["params"]}
    assert in_opt == {id(p) for p in model.parameters() if p.requires_grad}
    assert opt.param_groups[0]["lr"] == 2e-4 and opt.param_groups[0]["weight_decay"] == 1e-5
    with pytest.raises(InputError):
        make_optimizer(nn.Linear(2, 2).requires_grad_(False))


def test_export_encoder_is_copied_not_modified(tmp_path):
    export = write_tiny_export(
        tmp_path / "export",
        kwargs={"img_size": 32, "patch_size": 8, "depth": 1, "embed_dim": 32, "num_heads": 2},
        proj_dim=16,
    )
    encoder = load_encoder({"source": "export", "path": str(export)})
    model = build_mif_model(encoder, 2, variant="vitmatte")
    rgb = np.random.default_rng(0).integers(0, 256, size=(2, 40, 40, 3), dtype=np.uint8)
    x = encoder.preprocess(rgb)  # resized to the encoder's 32 px input
    assert model(x).shape == (2, 2, 32, 32)
    assert not any(isinstance(m, LoRALinear) for m in encoder.modules())
    assert model.input_size_px == (32, 32)


def test_bad_backbones_and_inputs_raise():
    with pytest.raises(InputError):
        build_mif_model(nn.Sequential(nn.Conv2d(3, 8, 3)), 2)
    torch.manual_seed(0)
    with pytest.raises(InputError):
        build_mif_model(timm.create_model("resnet10t", num_classes=0), 2)
    with pytest.raises(InputError):
        apply_lora(nn.Sequential(nn.Linear(4, 4)))
    vit = tiny_vit()
    for kwargs in ({"variant": "unet"}, {"finetune": "partial"}, {"decoder_channels": (64, 32)}):
        with pytest.raises(InputError):
            build_mif_model(vit, 2, **kwargs)
    with pytest.raises(InputError):
        build_mif_model(vit, 0)
    model = build_mif_model(vit, 2)
    with pytest.raises(InputError):
        apply_lora(model.backbone)  # already adapted
    for bad in (torch.randn(2, 3, 48, 48), torch.randn(2, 1, 32, 32), torch.randn(3, 32, 32)):
        with pytest.raises(InputError):
            model(bad)


# ---------------------------------------------------------------------------------------------
# Loss and schedule
# ---------------------------------------------------------------------------------------------


def hand_weighted_mse(pred, target, std, mask=None):
    b, c, h, w = pred.shape
    inv = [1.0 / s for s in std]
    weights = [v * c / sum(inv) for v in inv]
    total = 0.0
    for ch in range(c):
        num = den = 0.0
        for i in range(b):
            for y in range(h):
                for x in range(w):
                    m = 1.0 if mask is None else float(mask[i, ch, y, x] if mask.ndim == 4 else mask[i, y, x])
                    num += m * (pred[i, ch, y, x] - target[i, ch, y, x]) ** 2
                    den += m
        total += weights[ch] * (num / den if den > 0 else 0.0)
    return total / c


def test_weighted_mse_matches_hand_computation():
    rng = np.random.default_rng(0)
    pred, target = rng.uniform(-1, 1, (2, 3, 3, 4)), rng.uniform(-1, 1, (2, 3, 3, 4))
    std = [0.5, 1.0, 4.0]
    got = weighted_mse(torch.from_numpy(pred), torch.from_numpy(target), std)
    assert got.item() == pytest.approx(hand_weighted_mse(pred, target, std), rel=1e-12)

    mask = rng.random((2, 3, 4)) > 0.4
    got = weighted_mse(torch.from_numpy(pred), torch.from_numpy(target), torch.tensor(std), mask=torch.from_numpy(mask))
    assert got.item() == pytest.approx(hand_weighted_mse(pred, target, std, mask), rel=1e-12)
    got_b1 = weighted_mse(torch.from_numpy(pred), torch.from_numpy(target), std, mask=torch.from_numpy(mask[:, None]))
    assert got_b1.item() == pytest.approx(got.item(), rel=1e-12)

    per_marker = rng.random((2, 3, 3, 4)) > 0.5
    per_marker[:, 2] = False  # marker 2 has no valid pixel → contributes 0
    got = weighted_mse(torch.from_numpy(pred), torch.from_numpy(target), std, mask=torch.from_numpy(per_marker))
    assert got.item() == pytest.approx(hand_weighted_mse(pred, target, std, per_marker), rel=1e-12)

    equal = weighted_mse(torch.from_numpy(pred), torch.from_numpy(target), [2.0, 2.0, 2.0])
    assert equal.item() == pytest.approx(float(np.mean((pred - target) ** 2)), rel=1e-12)  # plain MSE


def test_weighted_mse_rejects_bad_input():
    p = torch.zeros(1, 2, 4, 4)
    with pytest.raises(InputError):
        weighted_mse(p, torch.zeros(1, 3, 4, 4), [1, 1])
    with pytest.raises(InputError):
        weighted_mse(p, p, [1.0, 0.0])
    with pytest.raises(InputError):
        weighted_mse(p, p, [1.0, -2.0])
    with pytest.raises(InputError):
        weighted_mse(p, p, [1.0, 1.0, 1.0])
    with pytest.raises(InputError):
        weighted_mse(p, p, [1.0, 1.0], mask=torch.ones(1, 5, 5))


def test_miphei_lr_lambda_key_steps_and_with_lambdalr():
    f = miphei_lr_lambda(4000, warmup_steps=400)
    expected = {0: 0.0, 200: 0.5, 400: 1.0, 1999: 1.0, 2000: 1.0, 3000: 0.5, 3500: 0.25, 4000: 0.0, 4500: 0.0}
    for step, value in expected.items():
        assert f(step) == pytest.approx(value), step
    short = miphei_lr_lambda(100, warmup_steps=400)  # warmup cut to the first half: a triangle
    assert [short(s) for s in (0, 25, 50, 75, 100)] == pytest.approx([0.0, 0.5, 1.0, 0.5, 0.0])
    assert miphei_lr_lambda(10, warmup_steps=0)(0) == 1.0

    param = nn.Parameter(torch.zeros(1))
    opt = torch.optim.Adam([param], lr=2e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, miphei_lr_lambda(40, warmup_steps=8))
    lrs = []
    for _ in range(40):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[4] == pytest.approx(1e-4) and lrs[8] == pytest.approx(2e-4) and lrs[30] == pytest.approx(1e-4)
    for bad in ((0, 10), (100, -1)):
        with pytest.raises(InputError):
            miphei_lr_lambda(*bad)
