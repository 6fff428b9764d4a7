"""isolated(): a check's run of user code leaves RNG, logging, modes, requires_grad and .grad as they were."""

import torch

from lightning_debug.demos.digits import DigitsMLP
from lightning_debug.isolation import isolated


def test_everything_a_check_may_touch_is_restored():
    module = DigitsMLP()
    module.train()
    first, second = list(module.parameters())[:2]
    second.requires_grad_(False)
    grad = torch.ones_like(first)
    first.grad = grad
    rng = torch.get_rng_state()
    with isolated(module):
        torch.rand(3)
        module.eval()
        first.requires_grad_(False)
        second.requires_grad_(True)
        first.grad = None
        module(torch.randn(2, 64)).sum().backward()  # a gradient for `second` that must not survive
        module.log("leak", 1.0)  # a no-op inside
    assert torch.equal(torch.get_rng_state(), rng), "global torch RNG advanced"
    assert all(m.training for m in module.modules()), "train mode not restored"
    assert first.requires_grad and not second.requires_grad, "requires_grad not restored"
    assert first.grad is grad and second.grad is None, ".grad not restored"
    assert "log" not in module.__dict__, "self.log not restored"
