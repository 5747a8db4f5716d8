"""Issue 29 item 7 (CPU part): backbone.grad_checkpointing gives the same gradients as without."""

from __future__ import annotations

import pytest
import torch

from surgenet_ssl.backbones import build_backbone


@pytest.mark.parametrize("name", ["vit_small", "dinov2_vits14_reg4"])
def test_grad_checkpointing_gives_identical_gradients(name):
    size = 32 if name == "vit_small" else 28
    kwargs = {"img_size": size, "depth": 3, "embed_dim": 32, "num_heads": 2}
    torch.manual_seed(0)
    plain = build_backbone(name, **kwargs).train()
    ckpt = build_backbone(name, grad_checkpointing=True, **kwargs).train()
    ckpt.load_state_dict(plain.state_dict())
    assert ckpt.grad_checkpointing and not plain.grad_checkpointing
    x = torch.randn(4, 3, size, size)
    for model in (plain, ckpt):
        (model(x) ** 2).sum().backward()
    grads = {n: p.grad for n, p in plain.named_parameters()}
    for n, p in ckpt.named_parameters():
        assert torch.equal(p.grad, grads[n]), n
