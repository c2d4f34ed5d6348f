"""The EMA of the weights against LitEma's rule (taming-transformers, SimVQ):
shadow <- shadow - (1 - d_n) (shadow - param), d_n = min(decay, (1 + n) / (10 + n))."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from vqtrain.ema import WeightEMA


def test_shadows_follow_litema_recursion_and_swap_restores_both():
    torch.manual_seed(0)
    net = nn.Linear(3, 2)
    frozen = nn.Parameter(torch.ones(2), requires_grad=False)
    ema = WeightEMA([*net.parameters(), frozen], decay=0.75)
    assert len(ema.shadows()) == 2  # the frozen parameter is the model's own, not averaged
    expected = [p.detach().clone().double() for p in net.parameters()]
    for n in range(1, 31):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
        ema.update()
        decay = min(0.75, (1 + n) / (10 + n))  # the warm-up until n = 26, then 0.75: both regimes run
        expected = [e - (1 - decay) * (e - p.detach().double()) for e, p in zip(expected, net.parameters())]
    for shadow, e in zip(ema.shadows(), expected):
        torch.testing.assert_close(shadow.double(), e, rtol=1e-5, atol=1e-6)

    trained = [p.detach().clone() for p in net.parameters()]
    averaged = [s.clone() for s in ema.shadows()]
    ema.swap()
    assert ema.swapped and all(torch.equal(p, a) for p, a in zip(net.parameters(), averaged))
    ema.swap()
    assert not ema.swapped and all(torch.equal(p, t) for p, t in zip(net.parameters(), trained))
    assert all(torch.equal(s, a) for s, a in zip(ema.shadows(), averaged))


@pytest.mark.parametrize("decay", [0.0, 1.0, -0.5])
def test_decay_outside_the_open_unit_interval_is_refused(decay):
    with pytest.raises(ValueError, match="model.ema_decay"):
        WeightEMA(nn.Linear(2, 2).parameters(), decay=decay)
