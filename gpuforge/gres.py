"""Slurm's generic resources (gres) as sinfo ``%G``, ``scontrol show node`` (Gres=, GresUsed=) and slurm.conf write
them: ``name[:type][:count][(S:sockets|IDX:indices)]``, comma-separated. Pure; no Slurm needed.

Examples: ``gpu:8``, ``gpu:h100:8(S:0-1)``, ``gpu:8(IDX:0-7)``, ``gpu:h100:4(S:0),gpu:a100:2,shard:8``, ``gpu``
(a count of 1), ``mps:1K`` (suffixes K, M, G, T, P multiply by 1024), ``(null)`` (none)."""

from __future__ import annotations

import re
from dataclasses import dataclass

_SUFFIX = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4, "P": 1024**5}
_COUNT = re.compile(r"^(\d+)([KMGTP]?)$", re.IGNORECASE)
_NAME = re.compile(r"^[A-Za-z_][\w.-]*$")
_TYPE = re.compile(r"^\w[\w.-]*$")  # MIG types start with a digit: "gpu:1g.10gb:7"
# A comma splits the list except inside a parenthesised suffix: "gpu:2(S:0,1),shard:4".
_ITEMS = re.compile(r",(?![^(]*\))")
_ITEM = re.compile(r"^(?P<spec>[^()]+)(?:\((?P<extra>[^()]*)\))?$")


class GresError(ValueError):
    """A gres string Slurm would not have written."""


@dataclass(frozen=True)
class Gres:
    name: str  # "gpu", "shard", "mps" ...
    type: str | None  # "h100"; None when untyped
    count: int
    extra: str | None = None  # what the parentheses hold: "S:0-1", "IDX:0-7"


def parse_gres(text: str) -> list[Gres]:
    """Every resource of a gres string; [] for "", "(null)" or "N/A". Raises :class:`GresError` on anything else
    that does not follow the syntax (an empty item, a bad count, unbalanced parentheses)."""
    text = (text or "").strip()
    if text in ("", "(null)", "N/A"):
        return []
    out = []
    for item in _ITEMS.split(text):
        m = _ITEM.match(item.strip())
        if not m:
            raise GresError(f"gres item {item!r} of {text!r} is not name[:type][:count][(...)]")
        fields = m["spec"].split(":")
        name, rest = fields[0], fields[1:]
        count = 1
        if rest and _COUNT.match(rest[-1]):
            number, suffix = _COUNT.match(rest.pop()).groups()  # type: ignore[union-attr]
            count = int(number) * _SUFFIX[suffix.upper()]
        if not _NAME.match(name) or len(rest) > 1 or (rest and not _TYPE.match(rest[0])):
            raise GresError(f"gres item {item!r} of {text!r} is not name[:type][:count][(...)]")
        out.append(Gres(name, rest[0] if rest else None, count, m["extra"]))
    return out


def gpu_count(text: str) -> int:
    """The GPUs a gres string holds, over every type: "gpu:h100:4(S:0),gpu:a100:2,shard:8" -> 6."""
    return sum(g.count for g in parse_gres(text) if g.name == "gpu")
