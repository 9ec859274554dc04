"""Feature levels of a backbone, described as timm describes them: `FeatureInfo` (`channels()`,
`reduction()`, `module_name()`) and the `indices` rule of `forward_intermediates`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import overload

from cthub.errors import ConfigError


class FeatureInfo:
    """What each feature level of a model is, with timm's FeatureInfo semantics: `info[i]` is a dict with
    `num_chs`, `reduction` and `module`; `channels()`, `reduction()` and `module_name()` give the values for
    the output levels (`out_indices`, all by default), for one level index, or for a list of level indices."""

    def __init__(
        self, info: Sequence[dict[str, int | str]], out_indices: Sequence[int] | None = None
    ) -> None:
        self.info = [dict(level) for level in info]
        self.out_indices = list(range(len(self.info)) if out_indices is None else out_indices)

    def get(self, key: str, idx: int | Sequence[int] | None = None) -> int | str | list[int | str]:
        """Value `key` of each output level, of level `idx`, or of the levels listed in `idx`."""
        if isinstance(idx, int):
            return self.info[idx][key]
        return [self.info[i][key] for i in (self.out_indices if idx is None else idx)]

    @overload
    def channels(self, idx: int) -> int: ...
    @overload
    def channels(self, idx: Sequence[int] | None = None) -> list[int]: ...
    def channels(self, idx: int | Sequence[int] | None = None) -> int | list[int]:
        """Channels of each output level (or of level `idx`)."""
        return self._ints("num_chs", idx)

    @overload
    def reduction(self, idx: int) -> int: ...
    @overload
    def reduction(self, idx: Sequence[int] | None = None) -> list[int]: ...
    def reduction(self, idx: int | Sequence[int] | None = None) -> int | list[int]:
        """Stride of each output level relative to the input (or of level `idx`)."""
        return self._ints("reduction", idx)

    def module_name(self, idx: int | Sequence[int] | None = None) -> str | list[str]:
        """Name of the module that outputs each level (or level `idx`)."""
        value = self.get("module", idx)
        return [str(v) for v in value] if isinstance(value, list) else str(value)

    def _ints(self, key: str, idx: int | Sequence[int] | None) -> int | list[int]:
        value = self.get(key, idx)
        return [int(v) for v in value] if isinstance(value, list) else int(value)

    def __getitem__(self, i: int) -> dict[str, int | str]:
        return self.info[i]

    def __len__(self) -> int:
        return len(self.info)

    def __repr__(self) -> str:
        return f"FeatureInfo({self.info!r}, out_indices={self.out_indices!r})"


def take_indices(num_levels: int, indices: int | Sequence[int] | None) -> list[int]:
    """Level indices to return, ascending (timm's rule): None = all, n = the last n, a list = those levels
    (negative ones count from the end)."""
    if indices is None:
        return list(range(num_levels))
    if isinstance(indices, int):
        if not 0 < indices <= num_levels:
            raise ConfigError(f"indices={indices}: take the last 1..{num_levels} levels")
        return list(range(num_levels - indices, num_levels))
    taken = sorted({i + num_levels if i < 0 else i for i in indices})
    if not taken or taken[0] < 0 or taken[-1] >= num_levels:
        raise ConfigError(f"indices={list(indices)}: levels are 0..{num_levels - 1} (or -{num_levels}..-1)")
    return taken
