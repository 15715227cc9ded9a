"""Learning-rate schedules: the multipliers, and LRScheduler driving FFLinear/FFNet like torch's LambdaLR."""
import math

import pytest
import torch

from ffkernels import FFLinear, FFNet
from ffkernels.schedules import LRScheduler, constant, cosine, linear_cooldown, make_schedule


def test_multipliers():
    f = linear_cooldown(10, 0.5)
    assert [f(t) for t in range(11)] == [1, 1, 1, 1, 1, 1, 0.8, 0.6, 0.4, 0.2, 0]
    assert f(9) > 0 and f(12) == 0  # the last step still learns; past the end: 0
    c = cosine(4)
    assert [round(c(t), 12) for t in range(5)] == [1, round((1 + math.cos(math.pi / 4)) / 2, 12), 0.5,
                                                    round((1 + math.cos(3 * math.pi / 4)) / 2, 12), 0]
    assert cosine(4, final=0.1)(4) == pytest.approx(0.1) and constant()(123) == 1
    assert make_schedule("cooldown", 10) == linear_cooldown(10)
    for bad in (lambda: linear_cooldown(0), lambda: linear_cooldown(10, 0.0), lambda: cosine(5, final=2),
                lambda: make_schedule("step", 10)):
        with pytest.raises(ValueError):
            bad()


def test_scheduler_follows_lambdalr_conventions():
    net = FFNet([12, 8, 6], head=True, num_classes=3, lr=0.01, head_lr=0.002)
    sched = LRScheduler(net, linear_cooldown(8))
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [p], "lr": 0.01}], lr=0.01)
    ref = torch.optim.lr_scheduler.LambdaLR(opt, linear_cooldown(8))
    assert sched.base_lrs == [0.01, 0.01, 0.002] and sched.last_epoch == 0
    for _ in range(8):
        assert sched.get_last_lr()[0] == pytest.approx(ref.get_last_lr()[0], rel=1e-15)
        assert [m.config.lr for m in (*net.layers, net.head)] == sched.get_last_lr()
        opt.step()
        ref.step()
        sched.step()
    assert sched.last_epoch == ref.last_epoch == 8 and sched.get_last_lr() == [0.0, 0.0, 0.0]


def test_scheduler_state_dict_round_trip():
    a = FFLinear(4, 3, lr=0.1)
    sa = LRScheduler(a, cosine(10))
    for _ in range(4):
        sa.step()
    b = FFLinear(4, 3, lr=0.1)
    sb = LRScheduler(b, cosine(10))
    sb.load_state_dict(sa.state_dict())
    assert b.config.lr == a.config.lr == sa.get_last_lr()[0] and sb.last_epoch == 4
    sa.step()
    sb.step()
    assert b.config.lr == a.config.lr
    with pytest.raises(TypeError):
        LRScheduler([object()], cosine(3))
