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
  kernels (as PyTorch asks of cudnn.benchmark, which it turns off for reproducibility), so the
  cache file below is not used there either;
- while the current stream is being captured into a CUDA graph (nothing may synchronise; warm the
  layers up before the capture, as CUDA graphs need anyway, and the capture replays the winners;
  a choice recorded in the cache below is used there too).

Choices are kept for the process, and, with ``CNNKERN_TUNE_CACHE=<file>``, in a JSON file that
later processes start from (:class:`TuneCache`): a layer found there is not timed again. The file
records what built the kernels (``fingerprint``: versions and a digest of the compiled extension);
a file written by another build is ignored and replaced, an entry recorded for another device kind
(the GPU's name, compute capability and SM count are part of its key) is not used, and a recorded
choice that is no longer among the layer's candidates is timed anew. Every candidate computes the
same result to rounding (they differ in summation order), so a cache can only cost speed. The ``cnnkern.tune`` logger
reports each choice with every candidate's time at INFO level; ``CNNKERN_TUNE_LOG=1`` sends those
lines to stderr without configuring logging (for the benchmark's worker processes).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import statistics
import tempfile
import time
import warnings
from typing import Any, Callable, Hashable, Sequence

import torch

from . import _common

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


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


# ---------------------------------------------------------------------------------------------
# the choices on disk
# ---------------------------------------------------------------------------------------------
CACHE_FORMAT = 1


def device_kind(device: torch.device) -> str:
    """What a recorded choice holds for: a GPU's name, compute capability and SM count (two GPUs
    of one kind share their choices; a MIG slice, with fewer SMs, is another kind), else the
    device type."""
    if device.type != "cuda":
        return device.type
    p = torch.cuda.get_device_properties(device)
    return f"{p.name} sm_{p.major}{p.minor} {p.multi_processor_count} SMs"


def portable(obj: Any) -> Any:
    """A key or a choice as JSON values: tuples as lists, dtypes as their names, devices as
    :func:`device_kind`."""
    if isinstance(obj, torch.device):
        return device_kind(obj)
    if isinstance(obj, torch.dtype):
        return str(obj)
    if isinstance(obj, (tuple, list)):
        return [portable(o) for o in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cnnkern tuning: cannot record {obj!r} ({type(obj).__name__})")


def _as_choice(obj: Any) -> Any:  # a recorded choice as the candidates hold it (lists back to tuples)
    return tuple(_as_choice(o) for o in obj) if isinstance(obj, list) else obj


def _text(obj: Any) -> str:
    return json.dumps(portable(obj), separators=(",", ":"))


def file_digest(path: str) -> str:
    """SHA-256 of a file (the compiled kernels, for a cache's fingerprint)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def _locked(path: str):
    """An exclusive lock on ``path + ".lock"`` where the platform has one (POSIX), so that two
    processes adding choices to one file do not lose each other's."""
    try:
        import fcntl
    except ImportError:  # (no fcntl: the last writer's view of the file wins)
        yield
        return
    with open(path + ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


class TuneCache:
    """Tuned choices in a JSON file, shared by the processes that use it: ``{"format", "fingerprint",
    "tuners": {tuner: {key: {"choice", "ms": {candidate: median ms}}}}}``, keys and candidates as
    compact JSON text of :func:`portable`. ``fingerprint()`` says what built the kernels; a file
    whose fingerprint differs is ignored, and replaced on the first store. A file that cannot be
    read or written is a warning, once, and tuning goes on in the process alone."""

    def __init__(self, path: str, fingerprint: Callable[[], dict]):
        self.path = os.path.abspath(os.path.expanduser(path))
        self._fingerprint_fn = fingerprint
        self._fingerprint: dict | None = None
        self._entries: dict[str, dict] | None = None  # tuner name -> key text -> entry
        self._warned = False

    def fingerprint(self) -> dict:
        if self._fingerprint is None:
            self._fingerprint = json.loads(json.dumps(self._fingerprint_fn()))  # (as it reads back)
        return self._fingerprint

    def _warn(self, what: str, exc: Exception) -> None:
        if not self._warned:
            self._warned = True
            warnings.warn(
                f"CNNKERN_TUNE_CACHE={self.path}: cannot {what} it ({exc}); tuned choices are kept for "
                "this process only",
                RuntimeWarning,
                stacklevel=4,
            )

    def _read(self) -> dict[str, dict]:
        """The file's entries for this build ({} for a missing file or another build's)."""
        try:
            with open(self.path) as f:
                data = json.load(f)
        except FileNotFoundError:
            return {}
        if not isinstance(data, dict) or data.get("format") != CACHE_FORMAT or not isinstance(data.get("tuners"), dict):
            raise ValueError("not a cnnkern tuning cache of format 1")
        if data.get("fingerprint") != self.fingerprint():
            log.info(
                "%s: written by another build (%s, here %s); not used",
                self.path,
                data.get("fingerprint"),
                self.fingerprint(),
            )
            return {}
        return data["tuners"]

    def lookup(self, tuner: str, key: Hashable) -> Any | None:
        """The recorded choice for ``key``, or None."""
        if self._entries is None:
            try:
                self._entries = self._read()
            except (OSError, ValueError) as exc:
                self._entries = {}
                self._warn("read", exc)
        entry = self._entries.get(tuner, {}).get(_text(key))
        return None if entry is None else _as_choice(entry.get("choice"))

    def store(self, tuner: str, key: Hashable, choice: Any, times: dict[Any, float]) -> None:
        """Adds (or replaces) the choice for ``key``, merged with what other processes wrote."""
        entry = {"choice": portable(choice), "ms": {_text(c): t for c, t in times.items()}}
        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            with _locked(self.path):
                try:
                    entries = self._read()
                except ValueError:  # (a damaged file: replaced)
                    entries = {}
                entries.setdefault(tuner, {})[_text(key)] = entry
                data = {"format": CACHE_FORMAT, "fingerprint": self.fingerprint(), "tuners": entries}
                fd, tmp = tempfile.mkstemp(dir=os.path.dirname(self.path), prefix=".tune-", suffix=".json")
                try:
                    with os.fdopen(fd, "w") as f:
                        json.dump(data, f, indent=1, sort_keys=True)
                    os.replace(tmp, self.path)
                except BaseException:
                    os.unlink(tmp)
                    raise
            self._entries = entries
        except OSError as exc:
            if self._entries is not None:
                self._entries.setdefault(tuner, {})[_text(key)] = entry
            self._warn("write", exc)


def cache_from_env(fingerprint: Callable[[], dict]) -> TuneCache | None:
    """The :class:`TuneCache` at ``CNNKERN_TUNE_CACHE`` (None when it is unset or empty)."""
    path = os.environ.get("CNNKERN_TUNE_CACHE", "")
    return TuneCache(path, fingerprint) if path else None


class Tuner:
    """The fastest candidate per key; ``choices[key]`` is the winner, ``timings[key]`` the median
    milliseconds of every candidate that was timed for it in this process; ``cache``, when given,
    holds the choices across processes."""

    def __init__(self, name: str, cache: TuneCache | None = None):
        self.name = name
        self.cache = cache
        self.choices: dict[Hashable, Any] = {}
        self.timings: dict[Hashable, dict[Any, float]] = {}

    def run(
        self,
        key: Hashable,
        candidates: Callable[[], Sequence[Any]],
        launch: Callable[[Any], Any],
        default: Any,
        device: torch.device,
    ) -> Any:
        """``launch(choice)`` with the key's winner, timing each of ``candidates()`` first if the
        key is new, neither chosen in this process nor recorded in the cache (``default`` instead
        under deterministic algorithms, and when a capture forbids timing). Returns the last
        launch's result."""
        choice = self.choices.get(key)
        if choice is not None:
            return launch(choice)
        _common.record_miss(again=True)  # timed, or a choice for now only: the next call records
        candidates = candidates()
        if not candidates:
            raise ValueError(f"{self.name}: no candidate to tune")
        if len(candidates) == 1:  # nothing to choose: no timing
            self.choices[key] = candidates[0]
            return launch(candidates[0])
        if torch.are_deterministic_algorithms_enabled():
            return launch(default)
        if self.cache is not None:
            recorded = self.cache.lookup(self.name, key)
            if recorded in candidates:
                self.choices[key] = recorded
                return launch(recorded)
            if recorded is not None:
                log.info("%s %s: recorded choice %s is not a candidate now; timing again", self.name, key, recorded)
        if _capturing(device):
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
        if self.cache is not None:
            self.cache.store(self.name, key, best, times)
        if log.isEnabledFor(logging.INFO):
            ranked = ", ".join(f"{c}: {t:.4g} ms" for c, t in sorted(times.items(), key=lambda kv: kv[1]))
            log.info("%s %s: %s (%s)", self.name, key, best, ranked)
        return launch(best)
