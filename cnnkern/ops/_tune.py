"""Run-time tuning of a kernel choice: ``torch.backends.cudnn.benchmark`` for cnnkern's CUDA C++ ops.

A :class:`Tuner` holds, per key (what makes two calls the same problem for the kernels: shapes,
strides, dtype, arguments, device), the fastest of the candidate configurations it was given. The
first call with a new key runs every candidate on the call's own tensors (each writes the same
outputs, so the last run, of the winner, leaves the result), times each with CUDA events on the
current stream (the median of ``REPS`` runs after one warm-up run), and keeps the fastest for the
rest of the process; later calls with that key launch it at once (a dictionary lookup).

A candidate that runs out of memory (a zero-padded copy or a split-K workspace the device cannot
hold) is left out of the race, as cudnn.benchmark leaves out an algorithm whose workspace cannot
be allocated; only if every candidate does is the error raised.

It does not time, and launches the op's own default choice instead (without remembering it), when
the result would then depend on timing noise or the timing is not possible:

- under ``torch.use_deterministic_algorithms(True)``: two runs of a program must choose the same
  kernels (as PyTorch asks of cudnn.benchmark, which it turns off for reproducibility);
- while the current stream is being captured into a CUDA graph (nothing may synchronise; warm the
  layers up before the capture, as CUDA graphs need anyway, and the capture replays the winners).

Choices are kept for the process only (nothing is written to disk). The ``cnnkern.tune`` logger
reports each choice with every candidate's time at INFO level; ``CNNKERN_TUNE_LOG=1`` sends those
lines to stderr without configuring logging (for the benchmark's worker processes).
"""

from __future__ import annotations

import logging
import os
import statistics
import time
from typing import Any, Callable, Hashable, Sequence

import torch

log = logging.getLogger("cnnkern.tune")
if os.environ.get("CNNKERN_TUNE_LOG", "0") not in ("", "0"):
    _handler = logging.StreamHandler()
    _handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    log.addHandler(_handler)
    log.setLevel(logging.INFO)

REPS = 5  # timed runs per candidate (after one warm-up run)


def tensor_key(t: torch.Tensor | None) -> Hashable:
    """What of a tensor the kernels' speed depends on: shape, strides, dtype, device, and whether
    its data starts on 16 bytes (the tensor-core kernels copy a tensor that does not)."""
    if t is None:
        return None
    return tuple(t.shape), t.stride(), t.dtype, t.device, t.data_ptr() % 16 == 0


def measure(run: Callable[[], Any], device: torch.device) -> float:
    """Median milliseconds of ``run()`` on ``device`` over :data:`REPS` runs after a warm-up run:
    CUDA events on the current stream on a GPU, the host clock elsewhere (the CPU emulator of the
    CUDA kernels, where only which candidate wins is meaningful, not its time)."""
    run()
    if device.type == "cuda":
        stream = torch.cuda.current_stream(device)
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(REPS)]
        for start, end in events:
            start.record(stream)
            run()
            end.record(stream)
        events[-1][1].synchronize()
        return statistics.median(start.elapsed_time(end) for start, end in events)
    times = []
    for _ in range(REPS):
        t0 = time.perf_counter()
        run()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def can_tune(device: torch.device) -> bool:
    """False under deterministic algorithms and during a CUDA graph capture (see the module doc)."""
    if torch.are_deterministic_algorithms_enabled():
        return False
    return not (device.type == "cuda" and torch.cuda.is_current_stream_capturing())


class Tuner:
    """The fastest candidate per key; ``choices[key]`` is the winner, ``timings[key]`` the median
    milliseconds of every candidate that was timed for it."""

    def __init__(self, name: str):
        self.name = name
        self.choices: dict[Hashable, Any] = {}
        self.timings: dict[Hashable, dict[Any, float]] = {}

    def run(self, key: Hashable, candidates: Callable[[], Sequence[Any]], launch: Callable[[Any], Any], default: Any,
            device: torch.device) -> Any:
        """``launch(choice)`` with the key's winner, timing each of ``candidates()`` first if the
        key is new (``default`` instead where :func:`can_tune` says no). Returns the last launch's
        result."""
        choice = self.choices.get(key)
        if choice is not None:
            return launch(choice)
        candidates = candidates()
        if not candidates:
            raise ValueError(f"{self.name}: no candidate to tune")
        if len(candidates) == 1:  # nothing to choose: no timing
            self.choices[key] = candidates[0]
            return launch(candidates[0])
        if not can_tune(device):
            return launch(default)
        times = {}
        for c in candidates:
            try:
                times[c] = measure(lambda c=c: launch(c), device)
            except torch.OutOfMemoryError:  # (a padded copy or a split-K workspace too large here: skip it)
                log.info("%s %s: %s skipped, out of memory", self.name, key, c)
        if not times:
            raise torch.OutOfMemoryError(f"{self.name}: every candidate ran out of memory ({list(candidates)})")
        best = min(times, key=times.get)
        self.choices[key] = best
        self.timings[key] = times
        if log.isEnabledFor(logging.INFO):
            ranked = ", ".join(f"{c}: {t:.4g} ms" for c, t in sorted(times.items(), key=lambda kv: kv[1]))
            log.info("%s %s: %s (%s)", self.name, key, best, ranked)
        return launch(best)
