"""Presets: one named object per size of run, holding how it trains, measures and tunes.

``smoke`` runs in seconds (tests, a first look), ``demo`` is the main job in about ten minutes on two CPU cores,
``paper`` the full protocol. Every command that takes ``--preset`` (train, bench, tune, run) reads the same
:class:`Preset`: its :class:`TrainSettings` become a :class:`~eat.training.TrainConfig`
(:func:`eat.training.train_config_from_preset`), its :class:`BenchSettings` a :class:`~eat.bench.BenchConfig`
(:func:`eat.bench.bench_config_from_preset`), and ``max_drop`` is what the main job's tuner may lose. A setting
left None is the config's own default; flags override any of them.

Nothing here imports torch: ``eat --help`` lists the presets from this module.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


def _set_fields(settings: Any) -> dict[str, Any]:
    """The fields of a settings object that are not None (tuples as lists, as the configs hold them)."""
    return {name: list(value) if isinstance(value, tuple) else value
            for name, value in dataclasses.asdict(settings).items() if value is not None}


@dataclass(frozen=True)
class TrainSettings:
    """How a preset trains (fields of :class:`~eat.training.TrainConfig`; None: the config's default)."""

    train_limit: int | None = None  # seeded subset of the training rows (None: all of them)
    epochs: float | None = None
    batch_size: int | None = None
    max_length: int | None = None
    calibration_rows: int | None = None  # held out of training for `eat tune`
    eval_limit: int | None = None
    checkpoint_every: int | None = None

    def overrides(self) -> dict[str, Any]:
        """The settings this preset sets, as TrainConfig keyword arguments."""
        return _set_fields(self)


@dataclass(frozen=True)
class BenchSettings:
    """How a preset measures (fields of :class:`~eat.bench.BenchConfig`; None: the config's default)."""

    rows: int | None = None  # seeded sample of the dev split timed at batch 1 (None: every row)
    warmup: int | None = None
    throughput_repeats: int | None = None
    batch_size: int | None = None
    tau_latency_points: tuple[float, ...] | None = None  # thresholds timed as sweep points
    keep_sweep: tuple[float, ...] | None = None
    window_sweep: tuple[int, ...] | None = None
    tau_grid: tuple[float, ...] | None = None  # thresholds of the cached sweep (None: steps of 0.01)

    def overrides(self) -> dict[str, Any]:
        """The settings this preset sets, as BenchConfig keyword arguments."""
        return _set_fields(self)


@dataclass(frozen=True)
class Preset:
    """A named size of run: how it trains, how it measures, and (``max_drop``) how many points of the primary
    metric the main job's tuned point may lose against the static model on the calibration split. ``eat tune``
    reports its point on dev with the preset's bench settings."""

    name: str
    purpose: str
    train: TrainSettings
    bench: BenchSettings
    max_drop: float


PRESETS: dict[str, Preset] = {
    "smoke": Preset("smoke", "seconds on 2 CPU cores: CLI and quickstart tests",
                    TrainSettings(train_limit=64, eval_limit=64, epochs=1.0, batch_size=16, max_length=48,
                                  calibration_rows=32, checkpoint_every=1000),
                    BenchSettings(rows=24, warmup=2, throughput_repeats=1, batch_size=8, tau_latency_points=(0.9,),
                                  keep_sweep=(0.7,), window_sweep=(8,), tau_grid=(0.5, 0.9, 1.0)),
                    max_drop=5.0),
    "demo": Preset("demo", "about 10 minutes for the whole main job on 2 CPU cores",
                   TrainSettings(train_limit=6000, epochs=1.0, batch_size=32, max_length=64, calibration_rows=500),
                   BenchSettings(warmup=10, throughput_repeats=1, tau_latency_points=(0.8, 0.95), keep_sweep=(0.8, 0.6),
                                 window_sweep=(16,)),
                   max_drop=0.5),
    "paper": Preset("paper", "the full protocol",
                    TrainSettings(epochs=2.0, batch_size=32, max_length=128, calibration_rows=2000),
                    BenchSettings(warmup=20, throughput_repeats=3),
                    max_drop=0.5),
}

def get_preset(name: str) -> Preset:
    """The :class:`Preset` called ``name``; ValueError naming the presets otherwise."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}") from None


__all__ = ["Preset", "TrainSettings", "BenchSettings", "PRESETS", "get_preset"]
