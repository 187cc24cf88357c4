"""Sparsity schedules: when pruning masks are updated during fine-tuning, and to what sparsity.

A schedule step ``t`` counts *completed optimizer steps*: ``t = 0`` is before the first step
(what ``apply`` does), and the fine-tuning hook called after optimizer step ``i`` (0-based)
evaluates the schedule at ``t = i + 1``, i.e. it sets the masks the next batch trains with (as
TF Model Optimization does). Every schedule answers :meth:`sparsity_at` ``(t, final)``: the
target sparsity at step ``t`` for a layer whose final sparsity is ``final``, or ``None`` when no
update is due at ``t``.

- :class:`OneShot`: prune to ``final`` at ``t = 0``, never again.
- :class:`Polynomial`: Zhu & Gupta 2017, ``s_t = s_f + (s_i - s_f)(1 - (t - t0)/(t1 - t0))^p``,
  updated every ``frequency`` steps from ``begin_step`` and always at ``end_step`` (so the final
  sparsity is reached even when ``end_step - begin_step`` is not a multiple of ``frequency``).
- :class:`Iterative`: Han et al. 2015's prune → retrain rounds, ``rounds`` of them tiling
  ``[begin_step, end_step]``; round ``r`` (1-based) prunes at
  ``begin_step + (r - 1)·(end_step - begin_step) // rounds`` to kept fraction
  ``(1 - s_f)^(r / rounds)``. The kept fraction is geometric because every round removes the same
  share of the *surviving* weights; the last round's prune is followed by retraining up to
  ``end_step``.

Outside ``[begin_step, end_step]`` a schedule is inactive (``None``): masks are not touched
before ``begin_step`` and stay frozen after ``end_step``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


def polynomial_sparsity(
    step: int,
    initial: float,
    final: float,
    begin_step: int,
    end_step: int,
    power: float = 3.0,
) -> float:
    """Zhu & Gupta's polynomial decay from ``initial`` to ``final`` sparsity.

    Clamped: ``initial`` for ``step <= begin_step``, ``final`` for ``step >= end_step``. (Whether
    anything is pruned before ``begin_step`` is the schedule's business: :class:`Polynomial`
    makes no update there.)
    """
    if step >= end_step:
        return final
    if step <= begin_step:
        return initial
    progress = (step - begin_step) / (end_step - begin_step)
    return final + (initial - final) * (1.0 - progress) ** power


class _ScheduleBase(BaseModel, ABC):
    model_config = ConfigDict(extra="forbid", frozen=True)

    @property
    def end(self) -> int:
        """The last step at which the schedule may update masks."""
        return 0

    @abstractmethod
    def due(self, step: int) -> bool:
        """Whether masks are updated at ``step``; O(1)."""

    @abstractmethod
    def sparsity_at(self, step: int, final: float) -> float | None:
        """The target sparsity at ``step`` for final sparsity ``final``, or ``None``."""


class OneShot(_ScheduleBase):
    """Prune to the target at once (before fine-tuning)."""

    kind: Literal["one-shot"] = "one-shot"

    def due(self, step: int) -> bool:
        return step == 0

    def sparsity_at(self, step: int, final: float) -> float | None:
        return final if step == 0 else None


class Polynomial(_ScheduleBase):
    """Gradual pruning with polynomial decay (Zhu & Gupta 2017; TF MOT ``PolynomialDecay``).

    ``initial_sparsity`` is capped at each layer's final sparsity: a layer whose target is below
    it is pruned to its target at ``begin_step`` and left alone afterwards.
    """

    kind: Literal["polynomial"] = "polynomial"
    initial_sparsity: float = Field(0.0, ge=0, lt=1, description="sparsity at begin_step")
    begin_step: int = Field(0, ge=0)
    end_step: int = Field(..., ge=1, description="step at which the final sparsity is reached")
    frequency: int = Field(100, ge=1, description="steps between mask updates")
    power: float = Field(3.0, gt=0, description="exponent of the decay (3 in the paper)")

    @model_validator(mode="after")
    def _check_range(self) -> Polynomial:
        if self.end_step <= self.begin_step:
            raise ValueError(
                f"end_step ({self.end_step}) must be greater than begin_step ({self.begin_step}); "
                "use the one-shot schedule to prune at a single step"
            )
        return self

    @property
    def end(self) -> int:
        return self.end_step

    def due(self, step: int) -> bool:
        if step < self.begin_step or step > self.end_step:
            return False
        return step == self.end_step or (step - self.begin_step) % self.frequency == 0

    def sparsity_at(self, step: int, final: float) -> float | None:
        if not self.due(step):
            return None
        initial = min(self.initial_sparsity, final)
        return polynomial_sparsity(step, initial, final, self.begin_step, self.end_step, self.power)


class Iterative(_ScheduleBase):
    """``rounds`` prune → retrain rounds spread evenly over ``[begin_step, end_step]`` (Han 2015).

    After round ``r`` the kept fraction is ``(1 - final)^(r / rounds)``.
    """

    kind: Literal["iterative"] = "iterative"
    rounds: int = Field(..., ge=1)
    begin_step: int = Field(0, ge=0)
    end_step: int = Field(..., ge=1, description="end of the last round's retraining")

    @model_validator(mode="after")
    def _check_range(self) -> Iterative:
        if self.end_step - self.begin_step < self.rounds:
            raise ValueError(
                f"{self.rounds} rounds need at least {self.rounds} steps between begin_step "
                f"({self.begin_step}) and end_step ({self.end_step})"
            )
        return self

    @property
    def end(self) -> int:
        return self.end_step

    def round_steps(self) -> list[int]:
        """The step at which each round prunes (round 1 first)."""
        span = self.end_step - self.begin_step
        return [self.begin_step + r * span // self.rounds for r in range(self.rounds)]

    def round_at(self, step: int) -> int | None:
        """The 1-based round pruning at ``step``, or ``None``."""
        if step < self.begin_step or step >= self.end_step:
            return None
        span = self.end_step - self.begin_step
        offset = step - self.begin_step
        # smallest r with r * span // rounds >= offset; a round starts here iff it equals offset
        r = -(-offset * self.rounds // span)
        return r + 1 if r < self.rounds and r * span // self.rounds == offset else None

    def due(self, step: int) -> bool:
        return self.round_at(step) is not None

    def sparsity_at(self, step: int, final: float) -> float | None:
        r = self.round_at(step)
        if r is None:
            return None
        return 1.0 - (1.0 - final) ** (r / self.rounds)


Schedule = Annotated[OneShot | Polynomial | Iterative, Field(discriminator="kind")]
"""Any schedule, told apart in recipes by ``kind``: ``{kind: polynomial, end_step: 2000}``."""

SCHEDULE_KINDS: tuple[str, ...] = ("one-shot", "polynomial", "iterative")
