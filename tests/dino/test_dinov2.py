"""DINOv2-style options (KoLeo, Sinkhorn-Knopp centering, iBOT masked-patch loss) against hand-computed values and
the published formulas; with every option off the training step is bit-identical to the DINO recipe's."""

from __future__ import annotations

import copy
import logging
import math
import random

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from support.tiny_training import TINY_BACKBONE, crop_batches, tiny_dino
from surgenet_ssl.backbones import build_backbone
from surgenet_ssl.config.dirs import CONFIG_DIR
from surgenet_ssl.dino import DINOLoss
from surgenet_ssl.dino.dinov2 import (
    IBOTPatchLoss,
    MaskBatch,
    block_mask,
    block_masks,
    koleo_loss,
    sinkhorn_knopp,
    vit_tokens,
)
from surgenet_ssl.training.module import DINOModule

TINY_VIT = {"name": "timm", "timm_name": "test_vit", "drop_path_rate": 0.0, "dynamic_img_size": True}


def _points(*angles: float) -> torch.Tensor:
    return torch.tensor([[math.cos(a), math.sin(a)] for a in angles])


# ------------------------------------------------------------------------------------------------------- KoLeo
def test_koleo_hand_computed():
    # (1,0), (0,1), (-1,0): every nearest neighbour is sqrt(2) away -> -log(sqrt 2)
    assert float(koleo_loss(_points(0, math.pi / 2, math.pi))) == pytest.approx(-0.5 * math.log(2), abs=1e-6)
    # a close pair (0.1 rad apart), the point at 90 degrees and the one at 180 degrees (scaled: normalised first)
    x = _points(0.0, 0.1, math.pi / 2, math.pi) * torch.tensor([[3.0], [0.5], [2.0], [1.0]])
    d_close, d_mid = 2 * math.sin(0.05), 2 * math.sin((math.pi / 2 - 0.1) / 2)
    expected = -(2 * math.log(d_close) + math.log(d_mid) + math.log(math.sqrt(2))) / 4
    assert float(koleo_loss(x)) == pytest.approx(expected, abs=1e-6)


def test_koleo_spreads_points_and_survives_duplicates():
    x = _points(0.0, 0.1, math.pi).requires_grad_()
    koleo_loss(x).backward()
    assert x.grad[1, 1] < 0 < x.grad[0, 1]  # a step against the gradient pushes the close pair apart
    dup = torch.ones(4, 8, requires_grad=True)
    loss = koleo_loss(dup)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(dup.grad).all()
    assert float(koleo_loss(torch.randn(1, 8))) == 0.0


# ---------------------------------------------------------------------------------------------- Sinkhorn-Knopp
def _published_sinkhorn(t: torch.Tensor, temp: float, iters: int = 3) -> torch.Tensor:
    """DINOv2's sinkhorn_knopp_teacher, single process, written out in float64 (no max subtraction)."""
    q = torch.exp(t.double() / temp).t()
    b, k = q.shape[1], q.shape[0]
    q /= q.sum()
    for _ in range(iters):
        q /= q.sum(dim=1, keepdim=True)
        q /= k
        q /= q.sum(dim=0, keepdim=True)
        q /= b
    return (q * b).t()


def test_sinkhorn_hand_computed_and_published_formula():
    # symmetric 2x2: Q = [[e, 1], [1, e]] is already balanced -> each row is (e, 1) / (e + 1)
    out = sinkhorn_knopp(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), teacher_temp=1.0)
    e = math.e
    assert torch.allclose(out, torch.tensor([[e / (e + 1), 1 / (e + 1)], [1 / (e + 1), e / (e + 1)]]), atol=1e-6)
    torch.manual_seed(0)
    t = torch.randn(12, 7)
    ours = sinkhorn_knopp(t, 0.1)
    assert torch.allclose(ours.double(), _published_sinkhorn(t, 0.1), atol=1e-5)
    assert torch.allclose(ours.sum(dim=1), torch.ones(12), atol=1e-5)  # rows are distributions
    # equipartition: each prototype gets about B/K of the mass (exactly so after many iterations)
    many = sinkhorn_knopp(t, 0.1, n_iterations=200)
    assert torch.allclose(many.sum(dim=0), torch.full((7,), 12 / 7), atol=1e-3)
    # large logits / tiny temperature: exp() of the published float32 form over/underflows to nan; the
    # log-domain iterations do not
    big = t * 50
    assert torch.isfinite(sinkhorn_knopp(big, 0.01)).all()


def test_dino_loss_with_sinkhorn_centering_uses_sk_targets_and_no_center():
    torch.manual_seed(1)
    student, teacher = torch.randn(8, 5), torch.randn(4, 5)  # 4 crops x batch 2, teacher 2 global crops
    loss_fn = DINOLoss(5, centering="sinkhorn_knopp", student_temp=0.1)
    loss = loss_fn(student, teacher, 0.04)
    targets = _published_sinkhorn(teacher, 0.04).float().chunk(2)
    logp = F.log_softmax(student / 0.1, dim=-1).chunk(4)
    pairs = [(-(targets[i] * logp[j]).sum(-1).mean()) for i in range(2) for j in range(4) if i != j]
    assert float(loss) == pytest.approx(float(sum(pairs) / len(pairs)), rel=1e-5)
    loss_fn.update_center()
    assert loss_fn.center.abs().sum() == 0  # the EMA center is not used with Sinkhorn-Knopp
    with pytest.raises(ValueError, match="centering"):
        DINOLoss(5, centering="softmax")


# ------------------------------------------------------------------------------------------------------- iBOT
def test_ibot_patch_loss_hand_computed_and_center_update():
    ts = 0.1
    # 3 images: image 0 has 2 masked patches, image 1 one, image 2 none -> weights 1/2, 1/2, 1; divided by 3
    masks = torch.tensor([[1, 1, 0], [0, 1, 0], [0, 0, 0]], dtype=torch.bool)
    mb = MaskBatch(masks)
    assert mb.index.tolist() == [0, 1, 4] and mb.weights.tolist() == [0.5, 0.5, 1.0] and mb.n_images == 3
    student = torch.tensor([[ts * math.log(3), 0.0], [0.0, 0.0], [0.0, ts * math.log(3)]])  # p = 3/4,1/4 | 1/2 | ...
    teacher = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 0.0]])
    loss_fn = IBOTPatchLoss(2, student_temp=ts, center_momentum=0.9)
    loss = loss_fn(student, teacher, mb.weights, mb.n_images, teacher_temp=1.0)
    pt1 = [e / (e + 1), 1 / (e + 1)] if (e := math.e) else None
    ce0 = -(0.5 * math.log(0.75) + 0.5 * math.log(0.25))
    ce1 = -(pt1[0] * math.log(0.5) + pt1[1] * math.log(0.5))
    ce2 = -(0.5 * math.log(0.25) + 0.5 * math.log(0.75))
    assert float(loss) == pytest.approx((0.5 * ce0 + 0.5 * ce1 + 1.0 * ce2) / 3, rel=1e-6)
    loss_fn.update_center()
    assert torch.allclose(loss_fn.center, 0.1 * teacher.mean(dim=0, keepdim=True))
    loss_fn(student[:0], teacher[:0], mb.weights[:0], 3, 1.0)  # no masked patch this step: the center stays
    loss_fn.update_center()
    assert torch.allclose(loss_fn.center, 0.1 * teacher.mean(dim=0, keepdim=True))


def test_block_masks_follow_the_dinov2_collate():
    rng = random.Random(0)
    for _ in range(20):
        m = block_mask(14, 14, 60, rng, max_patches=98)
        assert 0 < int(m.sum()) <= 60
    batch = block_masks(16, (14, 14), probability=0.5, ratio=(0.1, 0.5), rng=random.Random(1))
    counts = batch.masks.sum(dim=1)
    assert int((counts > 0).sum()) == 8 and batch.masks.shape == (16, 196)
    assert int(counts.max()) <= 0.5 * 196 and int(counts[counts > 0].min()) >= 4
    assert torch.equal(batch.index, batch.masks.flatten().nonzero().flatten())
    assert torch.allclose(torch.zeros(16).index_add_(0, batch.index // 196, batch.weights)[counts > 0], torch.ones(8))
    assert int(block_masks(3, (2, 2), 0.5).masks.sum(dim=1).gt(0).sum()) <= 1


def test_vit_tokens_and_the_mask_token():
    torch.manual_seed(0)
    vit = build_backbone("timm", timm_name="test_vit", dynamic_img_size=True).eval()
    x = torch.randn(2, 3, 48, 32)  # 3 x 2 patches of 16 px
    pooled, patches = vit_tokens(vit, x)
    assert torch.equal(pooled, vit(x)) and patches.shape == (2, 6, vit.num_features)
    token = torch.zeros(1, vit.num_features, requires_grad=True)
    none = torch.zeros(2, 6, dtype=torch.bool)
    assert torch.equal(vit_tokens(vit, x, none, token)[0], pooled)
    masks = none.clone()
    masks[0, 2] = True
    m_pooled, m_patches = vit_tokens(vit, x, masks, token)
    assert not torch.allclose(m_pooled[0], pooled[0]) and torch.allclose(m_pooled[1], pooled[1], atol=1e-6)
    # Not .sum(): the final LayerNorm starts at weight 1 / bias 0, so the sum over features of its output is 0 for
    # any input and its gradient vanishes. A fixed random projection depends on the token.
    probe = torch.randn(vit.num_features, generator=torch.Generator().manual_seed(1))
    (m_patches[0, 2] * probe).sum().backward()
    assert token.grad is not None and token.grad.abs().sum() > 0
    assert len(vit.patch_embed._forward_hooks) == 0  # the masking hook is removed again


# ------------------------------------------------------------------------------------------- the training step
def _options(**loss) -> dict:
    cfg = tiny_dino()
    cfg["loss"] = {**cfg["loss"], **loss}
    return cfg


OFF = {
    "centering": "centering",
    "sinkhorn_iterations": 3,
    "koleo_weight": 0.0,
    "ibot_weight": 0.0,
    "ibot_mask_probability": 0.5,
    "ibot_mask_ratio": [0.1, 0.5],
}


def _batch(seed: int = 0) -> dict:
    return next(iter(crop_batches(1, batch_size=4, seed=seed)))


def test_all_options_off_is_bit_identical_to_the_dino_step():
    torch.manual_seed(0)
    module = DINOModule(TINY_BACKBONE, _options(**OFF), batch_size=4, diagnostics_every_n_steps=0)
    module.build_schedules(10, 5, 4)
    reference = copy.deepcopy(module)
    batch = _batch()
    # the DINO recipe's step, written out: teacher on the 2 global crops, student on all, DINOLoss
    with torch.no_grad():
        t = reference.teacher(batch["crops"][:2])
    ref_loss = reference.dino_loss(reference.student(batch["crops"]), t, float(reference.schedules["teacher_temp"][0]))
    ref_loss.backward()
    loss = module.training_step(batch, 0)
    loss.backward()
    assert torch.equal(loss.detach(), ref_loss.detach())
    for (name, p), q in zip(module.student.named_parameters(), reference.student.parameters(), strict=True):
        assert (p.grad is None and q.grad is None) or torch.equal(p.grad, q.grad), name
    assert set(module.state_dict()) == set(DINOModule(TINY_BACKBONE, tiny_dino(), 4).state_dict())  # no new state


def test_koleo_step_keeps_the_dino_part_and_adds_the_weighted_koleo():
    torch.manual_seed(0)
    plain = DINOModule(TINY_BACKBONE, _options(**OFF), batch_size=4, diagnostics_every_n_steps=0)
    koleo = copy.deepcopy(plain)
    koleo._init_dinov2_options({**koleo.dino_cfg["loss"], "koleo_weight": 0.1}, "test_resnet", 0, 32)
    for m in (plain, koleo):
        m.build_schedules(10, 5, 4)
    batch = _batch()
    base = plain.training_step(batch, 0)
    loss, _, _, parts = koleo._dinov2_forward(batch["crops"], float(koleo.schedules["teacher_temp"][0]))
    assert torch.equal(parts["dino_loss"], base.detach())
    with torch.no_grad():
        feats = koleo.student.backbone(torch.cat(batch["crops"][:2])).chunk(2)
    expected = base + 0.1 * sum(koleo_loss(f) for f in feats)
    assert torch.allclose(loss, expected, atol=1e-6)


def test_dinov2_recipe_trains_a_tiny_vit_and_ibot_is_refused_on_cnns(tmp_path, caplog):
    torch.manual_seed(0)
    cfg = _options(
        centering="sinkhorn_knopp",
        koleo_weight=0.1,
        ibot_weight=1.0,
        ibot_mask_probability=0.5,
        ibot_mask_ratio=[0.1, 0.5],
    )
    module = DINOModule(TINY_VIT, cfg, batch_size=4, diagnostics_every_n_steps=1)
    assert module.ibot_loss is not None and module.student.mask_token.shape == (1, 64)
    # 32-px global crops: 2 x 2 patches; 4 images x 2 crops, half of them masked
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    token_before = module.student.mask_token.detach().clone()
    trainer.fit(module, train_dataloaders=crop_batches(3, batch_size=4))
    logged = trainer.callback_metrics
    assert all(torch.isfinite(logged[k]) for k in ("train/loss", "train/koleo_loss", "train/ibot_loss"))
    assert not torch.equal(module.student.mask_token, token_before)  # the mask token learns
    assert module.dino_loss.center.abs().sum() == 0  # Sinkhorn-Knopp: no EMA center
    assert "head.last_layer.weight_v" in dict(module.teacher.named_parameters())

    with caplog.at_level(logging.WARNING, logger="surgenet_ssl"):
        cnn = DINOModule(TINY_BACKBONE, cfg, batch_size=4)
    assert cnn.ibot_loss is None and cnn.koleo_weight == 0.1 and "needs a ViT backbone" in caplog.text


@pytest.mark.slow
def test_two_ranks_with_different_row_counts_match_one_process():
    import socket

    import torch.multiprocessing as mp

    from support.dinov2_workers import rank_rows, sinkhorn_worker

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=sinkhorn_worker, args=(r, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = {r: (t, c) for r, t, c in (queue.get(timeout=120) for _ in procs)}
    for p in procs:
        p.join(timeout=60)
    rows = torch.cat([rank_rows(0), rank_rows(1)])
    single = sinkhorn_knopp(rows, 0.1)
    assert torch.allclose(torch.tensor(results[0][0] + results[1][0]), single, atol=1e-6)
    # official DINOv2 (ibot_patch_loss.reduce_center_update): all_reduce(each rank's mean) / world_size, not the
    # mean over all 8 masked patches of both ranks (3 on rank 0, 5 on rank 1)
    center = 0.1 * (rank_rows(0).mean(dim=0) + rank_rows(1).mean(dim=0)).unsqueeze(0) / 2
    assert torch.allclose(torch.tensor(results[0][1]), center, atol=1e-6) and results[0][1] == results[1][1]
    assert not torch.allclose(center, 0.1 * rows.mean(dim=0, keepdim=True), atol=1e-3)  # the two really differ


def _two_gloo_ranks(target) -> dict:
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=target, args=(r, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = {r: rest for r, *rest in (queue.get(timeout=120) for _ in procs)}
    for p in procs:
        p.join(timeout=60)
    return results


@pytest.mark.slow
def test_ibot_and_drop_path_masks_differ_across_two_gloo_ranks_and_repeat():
    """Issue 29 item 4: with the same seed on both ranks (seed_everything), the iBOT masks (mask_rng: seed, step,
    micro-batch, rank) and the drop-path masks (seed_rank_streams: seed + rank, DINOv2's fix_random_seeds) differ
    between the ranks, and each rank draws the same again from the same seed."""
    from support.dinov2_workers import randomness_worker

    results = _two_gloo_ranks(randomness_worker)
    (gathered, repeat0), (_, repeat1) = results[0], results[1]
    masks0, masks1 = torch.tensor(gathered[0][: 8 * 64]), torch.tensor(gathered[1][: 8 * 64])
    drop0, drop1 = torch.tensor(gathered[0][8 * 64 :]), torch.tensor(gathered[1][8 * 64 :])
    assert masks0.sum() > 0 and masks1.sum() > 0 and not torch.equal(masks0, masks1)
    assert not torch.equal(drop0, drop1)
    assert repeat0 and repeat1


def test_mask_rng_is_a_function_of_seed_step_micro_batch_and_rank():
    from surgenet_ssl.dino.dinov2 import mask_rng

    draw = [mask_rng(*key).random() for key in [(0, 5, 0, 0), (0, 5, 0, 0), (0, 5, 0, 1), (0, 6, 0, 0), (0, 5, 1, 0)]]
    assert draw[0] == draw[1] and len(set(draw)) == 4
    assert mask_rng(1, 5, 0, 0).random() != draw[0]


def test_dinov2_recipe_composes_with_the_dinov2_values_and_default_is_off():
    """The full recipe (a real mixture) has every DINOv2 option off; the demo's small-data preset adds KoLeo only."""

    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        v2 = compose("train", overrides=["dataset=surgenetxl", "dino=dinov2"]).dino.loss
        v1 = compose("train", overrides=["dataset=surgenetxl"]).dino.loss
        demo = compose("train").dino.loss
    assert (v2.centering, v2.koleo_weight, v2.ibot_weight, v2.sinkhorn_iterations) == ("sinkhorn_knopp", 0.1, 1.0, 3)
    assert list(v2.ibot_mask_ratio) == [0.1, 0.5] and v2.ibot_mask_probability == 0.5 and v2.teacher_temp == 0.07
    assert (v1.centering, v1.koleo_weight, v1.ibot_weight) == ("centering", 0.0, 0.0)
    assert (demo.centering, demo.koleo_weight, demo.ibot_weight) == ("centering", 0.3, 0.0)
