"""The forward-compatibility rule of every config the project reads (config.json, its preprocessing,
checkpoints): keys this version does not know were written by a newer version (or by hand); they are
ignored with a logged warning, never an error, so that an older install still loads a newer model."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from typing import Any

log = logging.getLogger(__name__)


def known_fields(cls: type, d: Mapping[str, Any], where: str) -> tuple[dict[str, Any], list[str]]:
    """`(the entries of d that are fields of the dataclass cls, the sorted names of the others)`; the
    others are ignored, with one warning naming them and `where` they were found."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(k for k in d if k not in names)
    if unknown:
        log.warning(
            "%s: ignoring keys this version does not know (written by a newer one?): %s", where, unknown
        )
    return {k: v for k, v in d.items() if k in names}, unknown
