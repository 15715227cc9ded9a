"""Learning-rate schedules for FFLinear, FFNet (its layers and its head), after torch.optim.lr_scheduler.

A schedule is a multiplier f(step) of each module's base learning rate; ``LRScheduler`` applies it with
``module.configure(lr=base_lr * f(step))``, with LambdaLR's conventions: constructing it sets f(0), each
``.step()`` (call it after each training step) advances the count and sets the next rate.

    sched = LRScheduler(net, linear_cooldown(total_steps))
    for x, y in batches:
        net.ff_step_labeled(x, y, wrong_labels(y, 10), 10)
        sched.step()
"""
from __future__ import annotations

import math
from dataclasses import dataclass


def _check_total(total_steps) -> int:
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
        raise ValueError(f"ffkernels: total_steps must be a positive int, got {total_steps!r}")
    return total_steps


@dataclass(frozen=True)
class Constant:
    """f(step) = 1."""

    def __call__(self, step: int) -> float:
        return 1.0


@dataclass(frozen=True)
class LinearCooldown:
    """1 for the first (1 - cooldown_fraction) of ``total_steps``, then linear to 0 at ``total_steps``.

    f(t) = min(1, (total_steps - t) / (cooldown_fraction * total_steps)), clamped at 0: the last step
    (t = total_steps - 1) still learns, with 1 / (cooldown_fraction * total_steps) of the base rate.
    """

    total_steps: int
    cooldown_fraction: float = 0.5

    def __post_init__(self):
        _check_total(self.total_steps)
        if not 0.0 < float(self.cooldown_fraction) <= 1.0:
            raise ValueError(f"ffkernels: cooldown_fraction must be in (0, 1], got {self.cooldown_fraction!r}")

    def __call__(self, step: int) -> float:
        return max(0.0, min(1.0, (self.total_steps - step) / (self.cooldown_fraction * self.total_steps)))


@dataclass(frozen=True)
class Cosine:
    """f(t) = final + (1 - final) * (1 + cos(pi * t / total_steps)) / 2 for t <= total_steps, then ``final``."""

    total_steps: int
    final: float = 0.0

    def __post_init__(self):
        _check_total(self.total_steps)
        if not 0.0 <= float(self.final) <= 1.0:
            raise ValueError(f"ffkernels: final must be in [0, 1], got {self.final!r}")

    def __call__(self, step: int) -> float:
        t = min(step, self.total_steps) / self.total_steps
        return self.final + (1.0 - self.final) * 0.5 * (1.0 + math.cos(math.pi * t))


def constant(total_steps=None) -> Constant:
    return Constant()


def linear_cooldown(total_steps: int, cooldown_fraction: float = 0.5) -> LinearCooldown:
    return LinearCooldown(total_steps, cooldown_fraction)


def cosine(total_steps: int, final: float = 0.0) -> Cosine:
    return Cosine(total_steps, final)


SCHEDULES = {"constant": constant, "cooldown": linear_cooldown, "cosine": cosine}


def make_schedule(name: str, total_steps: int):
    """The multiplier named ``name`` ("constant", "cooldown" = linear_cooldown, "cosine") over ``total_steps``."""
    if name not in SCHEDULES:
        raise ValueError(f"ffkernels: unknown lr schedule {name!r}; expected one of {', '.join(map(repr, SCHEDULES))}")
    return SCHEDULES[name](total_steps)


def scheduled_modules(target) -> list:
    """What a scheduler drives: an FFNet's layers and its head, or any module with ``config.lr`` and
    ``configure``, or an iterable of those."""
    if hasattr(target, "configure") and hasattr(target, "config"):
        return [target]
    if hasattr(target, "layers"):  # FFNet
        return [*target.layers, *([target.head] if getattr(target, "head", None) is not None else [])]
    mods = list(target)
    bad = [type(m).__name__ for m in mods if not (hasattr(m, "configure") and hasattr(m, "config"))]
    if bad or not mods:
        raise TypeError(f"ffkernels: LRScheduler drives FFLinear, FFNet, SoftmaxHead or an iterable of them; got "
                        f"{', '.join(bad) or 'nothing'}")
    return mods


class LRScheduler:
    """Sets ``lr = base_lr * lr_lambda(step)`` on every module it drives (LambdaLR's conventions).

    ``base_lrs``: each module's ``config.lr`` when the scheduler is made. ``last_epoch`` counts the
    ``.step()`` calls (torch's name; here one per training step). ``state_dict()`` holds the count and the
    base rates (not the function, as in LambdaLR); ``load_state_dict`` restores them and the current rates.
    """

    def __init__(self, target, lr_lambda, last_epoch: int = -1):
        if not callable(lr_lambda):
            raise TypeError(f"ffkernels: lr_lambda must be callable, got {type(lr_lambda).__name__}")
        self.modules = scheduled_modules(target)
        self.lr_lambda = lr_lambda
        self.base_lrs = [m.config.lr for m in self.modules]
        self.last_epoch = last_epoch
        self._last_lr = list(self.base_lrs)
        self.step()

    def get_lr(self) -> list:
        f = float(self.lr_lambda(self.last_epoch))
        return [base * f for base in self.base_lrs]

    def step(self) -> None:
        self.last_epoch += 1
        self._apply(self.get_lr())

    def _apply(self, lrs) -> None:
        for m, lr in zip(self.modules, lrs):
            if m.config.lr != lr:
                m.configure(lr=lr)
        self._last_lr = list(lrs)

    def get_last_lr(self) -> list:
        return list(self._last_lr)

    def state_dict(self) -> dict:
        return {"last_epoch": self.last_epoch, "base_lrs": list(self.base_lrs), "_last_lr": list(self._last_lr)}

    def load_state_dict(self, state: dict) -> None:
        if len(state["base_lrs"]) != len(self.modules):
            raise ValueError(f"ffkernels: this scheduler state drives {len(state['base_lrs'])} modules, this "
                             f"scheduler {len(self.modules)}")
        self.last_epoch = int(state["last_epoch"])
        self.base_lrs = list(state["base_lrs"])
        self._apply(state.get("_last_lr", self.get_lr()))
