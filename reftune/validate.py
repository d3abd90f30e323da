"""Range checks for config fields, so each config's `validate()` is a short declarative list.

Every check raises `ConfigError` (a ValueError) with one line naming the key (with its section
prefix, e.g. `sft.epochs`), the value given and what is allowed:

    sft.epochs=0: must be an integer >= 1

Types are checked earlier, when the config is loaded (`reftune.config`); these checks also
re-check them, because the Python API builds configs without going through the loader.
"""

from __future__ import annotations

import math
import re

from reftune.config import ConfigError


class Checks:
    """Checks of one config object's fields; `prefix` is its section (`""`, `"sft."`, `"data."`)."""

    def __init__(self, cfg, prefix: str = ""):
        self.cfg, self.prefix = cfg, prefix

    def fail(self, key: str, allowed: str) -> None:
        raise ConfigError(f"{self.prefix}{key}={getattr(self.cfg, key)!r}: {allowed}")

    def _value(self, key: str, kind: type):
        value = getattr(self.cfg, key)
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
            self.fail(key, f"must be {'an integer' if kind is int else 'a number' if kind is float else kind.__name__}")
        if kind is float and not math.isfinite(value):
            self.fail(key, "must be a finite number")
        return value

    def int(self, key: str, lo: int | None = None, hi: int | None = None, note: str = "") -> Checks:
        value = self._value(key, int)
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            self.fail(key, "must be an integer " + _bounds(lo, hi) + (f" ({note})" if note else ""))
        return self

    def float(self, key: str, lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
              hi_open: bool = False, note: str = "") -> Checks:
        value = self._value(key, float)
        bad = ((lo is not None and (value <= lo if lo_open else value < lo))
               or (hi is not None and (value >= hi if hi_open else value > hi)))
        if bad:
            self.fail(key, "must be a number " + _bounds(lo, hi, lo_open, hi_open) + (f" ({note})" if note else ""))
        return self

    def choice(self, key: str, allowed, note: str = "") -> Checks:
        value = getattr(self.cfg, key)
        if value not in allowed:
            self.fail(key, f"must be one of {', '.join(map(str, allowed))}" + (f" ({note})" if note else ""))
        return self

    def bool(self, *keys: str) -> Checks:
        for key in keys:
            if not isinstance(getattr(self.cfg, key), bool):
                self.fail(key, "must be true or false")
        return self

    def str(self, *keys: str, nonempty: bool = False) -> Checks:
        for key in keys:
            value = getattr(self.cfg, key)
            if not isinstance(value, str):
                self.fail(key, "must be a string")
            if "\x00" in value:
                self.fail(key, "must not contain NUL bytes")
            if nonempty and not value.strip():
                self.fail(key, "must not be empty")
        return self

    def out_dir(self, key: str = "out_dir") -> Checks:
        self.str(key, nonempty=True)
        return self

    def device(self, key: str = "device") -> Checks:
        check_device(getattr(self.cfg, key), self.prefix + key)
        return self

    def dtype(self, key: str = "dtype") -> Checks:
        return self.choice(key, DTYPES)

    def engine(self, key: str = "engine") -> Checks:
        # The registry decides (a registered name, or package.module:Class); imported here only, when
        # a config that has an engine is checked.
        from reftune.engines import check_engine

        try:
            check_engine(getattr(self.cfg, key), self.prefix + key)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        return self

    def derived(self, section: str, allowed: dict, by: str) -> Checks:
        """Fields of a nested section that the command sets itself (e.g. `sft.model` in offline-st):
        a value there other than the default (or the one the command would set) would be ignored,
        so it is refused. `allowed`: key -> the values that are fine."""
        sub = getattr(self.cfg, section)
        for key, fine in allowed.items():
            if all(getattr(sub, key) != v for v in fine):
                raise ConfigError(f"{self.prefix}{section}.{key}={getattr(sub, key)!r}: set by {by}, so a value "
                                  f"here would be ignored; leave it out")
        return self

    def temperature(self, key: str = "temperature") -> Checks:
        return self.float(key, 0.0, lo_open=True, note="sampling needs a temperature > 0; for greedy decoding "
                                                       "use `reftune eval`")

    def top_p(self, key: str = "top_p") -> Checks:
        return self.float(key, 0.0, 1.0, lo_open=True)


DTYPES = ("auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16")
MIXED_PRECISION = ("no", "bf16", "auto")
_DEVICE_RE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def _bounds(lo, hi, lo_open: bool = False, hi_open: bool = False) -> str:
    if lo is not None and hi is not None:
        return f"in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    if lo is not None:
        return f"{'>' if lo_open else '>='} {lo}"
    return f"{'<' if hi_open else '<='} {hi}"


def check_device(device, key: str = "device") -> None:
    """auto | cpu | cuda | cuda:N | mps, and the device must exist on this machine."""
    if not isinstance(device, str) or not _DEVICE_RE.match(device):
        raise ConfigError(f"{key}={device!r}: must be auto, cpu, cuda, cuda:N or mps")
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(f"{key}={device!r}: CUDA is not available on this machine (torch.cuda.is_available() "
                              f"is False: no GPU, or a CPU-only torch build); use device=cpu or device=auto")
        index = int(device.split(":")[1]) if ":" in device else 0
        if index >= torch.cuda.device_count():
            raise ConfigError(f"{key}={device!r}: this machine has {torch.cuda.device_count()} CUDA device(s) "
                              f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})")
    if device == "mps":
        import torch

        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise ConfigError(f"{key}='mps': the MPS backend is not available on this machine; use device=cpu")
