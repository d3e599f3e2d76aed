"""QuantConfig: what the quantization pass does, validated when it is built.

`QuantConfig.parse("w4g128")` reads the CLI's short form: w<bits>[g<group>|c] (c: per
channel), e.g. w8c, w4g32.
"""

from __future__ import annotations

import dataclasses
import re

from meshweave.ir.packing import SUPPORTED_BITS

GROUP_SIZES = (32, 64, 128)
METHODS = ("rtn", "gptq")


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """Weight-only quantization of linear (and matmul-with-parameter) layers.

    bits: 2, 3, 4 or 8.
    group_size: 32, 64 or 128 input features share a scale (and zero point); None quantizes
        per output channel (one group spanning all of K).
    method: "rtn" (round to nearest) or "gptq" (needs CompileOptions.calibration).
    symmetric: True stores no zero points (the zero point is 2**(bits-1), as GPTQ's sym
        mode); False stores one integer zero point per group and channel.
    act_order: GPTQ only: quantize columns by decreasing Hessian diagonal. Groups stay
        contiguous along K (their scales are fixed from the unquantized weight first, AutoGPTQ's
        `static_groups`), so the packed layout and the kernels do not change.
    damp: GPTQ dampening, a fraction of the mean Hessian diagonal added to it.
    block_size: GPTQ's lazy batch: columns updated together before the trailing update.
    skip: parameter names (substrings) to leave in floating point, e.g. ("lm_head",).
    """

    bits: int = 4
    group_size: int | None = 128
    method: str = "rtn"
    symmetric: bool = False
    act_order: bool = False
    damp: float = 0.01
    block_size: int = 128
    skip: tuple[str, ...] = ()

    def __post_init__(self):
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"QuantConfig.bits={self.bits!r}: expected one of "
                             f"{', '.join(map(str, SUPPORTED_BITS))}")
        if self.group_size is not None and self.group_size not in GROUP_SIZES:
            raise ValueError(f"QuantConfig.group_size={self.group_size!r}: expected one of "
                             f"{', '.join(map(str, GROUP_SIZES))} or None (per channel)")
        if self.method not in METHODS:
            raise ValueError(f"QuantConfig.method={self.method!r}: expected one of {METHODS}")
        if not 0 <= self.damp < 1:
            raise ValueError(f"QuantConfig.damp={self.damp!r}: expected a fraction in [0, 1)")
        if self.block_size <= 0 or (self.group_size and self.block_size % self.group_size):
            raise ValueError(f"QuantConfig.block_size={self.block_size}: expected a positive "
                             f"multiple of group_size={self.group_size}")
        if self.act_order and self.method != "gptq":
            raise ValueError("QuantConfig.act_order=True orders GPTQ's columns; it needs "
                             "method='gptq'")
        if not isinstance(self.skip, tuple):
            object.__setattr__(self, "skip", tuple(self.skip))

    @property
    def tag(self) -> str:
        return f"w{self.bits}" + (f"g{self.group_size}" if self.group_size else "c")

    def group_for(self, k: int) -> int:
        """The group along a K of `k`: a group wider than K is all of K (one group, as
        AutoGPTQ does for narrow layers); a smaller one must divide K (checked by the pass)."""
        return k if self.group_size is None or self.group_size >= k else self.group_size

    @classmethod
    def parse(cls, text: str, **overrides) -> QuantConfig:
        m = re.fullmatch(r"w(\d+)(?:g(\d+)|(c))?", text.strip().lower())
        if not m:
            raise ValueError(f"--quantize {text!r}: expected w<bits>g<group> or w<bits>c "
                             f"(per channel), e.g. w4g128, w8c")
        group = None if m.group(3) else int(m.group(2) or 128)
        return cls(bits=int(m.group(1)), group_size=group, **overrides)
