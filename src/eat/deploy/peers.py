"""Peers in every benchmark: the static model (and EAT's tuned point) deployed the ways a CPU user would.

A user who wants a faster encoder on a CPU quantizes the static model to int8 or runs it in ONNX Runtime; EAT is
worth picking only if its savings multiply with those. So a benchmark table gets, beside its fp32 eager rows,
the same checkpoint and knobs on other backends, each its own operating point timed in the same interleaved run
on the same rows (accuracy from the same calls):

- ``static:torch-int8``, ``static:ort-fp32``, ``static:ort-int8`` beside ``static`` (Hugging Face-style eager fp32);
- ``eat:tuned:torch-int8``, ``eat:tuned:ort-fp32``, ``eat:tuned:ort-int8`` beside ``eat:tuned`` (and the batch
  tuners' ``eat:tuned-bN`` points likewise).

The report then states speedups against the fastest static peer as well as against static fp32.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from .onnx_export import INSTALL_HINT, ExportError

# peer name -> (backend, precision)
PEERS: dict[str, tuple[str, str]] = {
    "torch-int8": ("torch", "int8"),
    "torch-bf16": ("torch", "bf16"),
    "ort-fp32": ("onnxruntime", "fp32"),
    "ort-int8": ("onnxruntime", "int8"),
}
DEFAULT_PEERS: tuple[str, ...] = ("torch-int8", "ort-fp32", "ort-int8")


def parse_peers(text: str | Sequence[str] | None) -> list[str]:
    """``"torch-int8,ort-int8"`` (or a list) -> peer names; ``"none"`` or empty -> []; ``None`` -> the defaults.
    An unknown name is a ValueError listing the known ones."""
    if text is None:
        return list(DEFAULT_PEERS)
    names = [p.strip() for p in (text.split(",") if isinstance(text, str) else text) if p.strip()]
    if names in (["none"], []):
        return []
    unknown = [name for name in names if name not in PEERS]
    if unknown:
        raise ValueError(f"--peers: unknown {', '.join(unknown)}; choose from {', '.join(PEERS)} (or none)")
    return names


def available_peers(peers: Sequence[str], *, explicit: bool) -> tuple[list[str], list[str]]:
    """(peers this machine can run, notes on those left out). ONNX Runtime peers need ``onnxruntime``: asked for
    explicitly, its absence is an :class:`ExportError` with the install hint; by default they are left out with a
    note. bf16 needs native CPU support (left out with a note, or a ValueError when asked for)."""
    kept, notes = [], []
    for name in peers:
        backend, precision = PEERS[name]
        if backend == "onnxruntime":
            try:
                import onnxruntime  # noqa: F401
            except ImportError:
                if explicit:
                    raise ExportError(f"peer {name}: onnxruntime is not installed; install it with: {INSTALL_HINT}")
                notes.append(f"{name} left out: onnxruntime is not installed ({INSTALL_HINT})")
                continue
        if precision == "bf16":
            from ..training import cpu_has_native_bf16

            if not cpu_has_native_bf16():
                if explicit:
                    raise ValueError(f"peer {name}: this CPU has no native bf16")
                notes.append(f"{name} left out: this CPU has no native bf16")
                continue
        kept.append(name)
    return kept, notes


def peer_points(points, peers: Sequence[str],
                tuned_at: dict[str, dict[str, dict]] | None = None) -> tuple[list, list[str]]:
    """The peer operating points of ``points``: every ``static`` and ``eat:tuned*`` point (fp32, torch) on each of
    ``peers``. ``tuned_at``: peer name -> {tuned point name: knobs} chosen by a tuner of that peer's precision or
    backend (`eat tune --precision int8` saves ``tuned_<task>_int8.json``, with ``--backend onnxruntime``
    ``tuned_<task>_ort-int8.json``; :func:`eat.pipeline.peer_tuned_points`): that peer runs that point (its exits
    chosen on the outputs of the model as it is deployed) instead of the fp32 knobs. Returns (new points, notes: a
    point a peer cannot have, e.g. a windowed point on ONNX Runtime, and which peers run another tuner's point)."""
    new, notes = [], []
    tuned_at = tuned_at or {}
    for point in points:
        if point.name != "static" and not point.name.startswith("eat:tuned"):
            continue
        if getattr(point, "backend", "torch") != "torch" or getattr(point, "precision", "fp32") != "fp32":
            continue
        for peer in peers:
            backend, precision = PEERS[peer]
            knobs = point.knobs
            if point.name != "static" and point.name in tuned_at.get(peer, {}):
                knobs = tuned_at[peer][point.name]
                notes.append(f"{point.name}:{peer} runs the point tuned for {peer}: {knobs}")
            if backend == "onnxruntime" and knobs.get("attention_window") is not None:
                notes.append(f"{point.name}:{peer} left out: attention_window has no ONNX segment form")
                continue
            new.append(dataclasses.replace(point, name=f"{point.name}:{peer}", backend=backend, precision=precision,
                                           knobs=knobs))
    return new, notes


__all__ = ["DEFAULT_PEERS", "PEERS", "available_peers", "parse_peers", "peer_points"]
