"""The extra state FFLinear and SoftmaxHead keep in their state_dict beside their tensors: the number of updates
taken (the next one is step + 1, so Adam's bias correction resumes exactly) and the options they were trained with."""
from __future__ import annotations

STATE_VERSION = 1


def extra_state(module) -> dict:
    return {"version": STATE_VERSION, "step": module.step_count, "config": module.config.to_dict()}


def load_extra_state(module, state: dict, what: str) -> None:
    """Restore the step count; refuse a state trained with another optimizer kind (its state tensors differ)."""
    saved = state.get("config", {})
    if saved.get("optimizer", module.config.optimizer) != module.config.optimizer:
        raise ValueError(f"ffkernels: this state_dict was trained with optimizer {saved['optimizer']!r} but the {what} "
                         f"uses {module.config.optimizer!r}; construct the {what} with the same optimizer")
    module.step_count = int(state["step"])
