"""Deciding a dataset's mask encoding once, from all of its masks (see :mod:`kvseg.data.masks` for the encodings).

Each mask is summarised by :func:`kvseg.data.masks.inspect_mask`; :func:`decide_encoding` picks the
encoding that fits the most non-empty masks, and every mask that does not fit it is refused with its
file and value set named.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from kvseg.config import DataConfig
from kvseg.data.masks import EDGE_BAND, MaskEncoding, MaskValues, inspect_masks, misfit_message
from kvseg.errors import MaskEncodingError


@dataclass(frozen=True)
class EncodingDecision:
    """The encoding of a dataset, the masks it was decided from and those that do not fit it."""

    encoding: MaskEncoding
    masks: list[MaskValues]
    misfits: list[MaskValues]
    how: str  # "decided from 300 masks" or "set by data.mask_encoding"

    def value_sets(self, limit: int = 4) -> str:
        """The value sets seen and how many masks hold each, most common first."""
        groups: dict[str, list[MaskValues]] = {}
        for mask in self.masks:
            key = mask.value_set() if not mask.kind.endswith("noisy") else mask.kind
            groups.setdefault(key, []).append(mask)
        parts = []
        for key, members in sorted(groups.items(), key=lambda item: -len(item[1]))[:limit]:
            if key.endswith("noisy"):
                low = min(int(m.values[0]) for m in members)
                high = max(int(m.values[-1]) for m in members)
                edges = max(m.edge_fraction for m in members)
                formats = "/".join(sorted({m.format for m in members}))
                key = (f"{key.split()[0]} with {formats} noise, values {low}-{high}"
                       + (f", at most {edges:.2%} of a mask's pixels between {EDGE_BAND[0]} and {EDGE_BAND[1] - 1}"
                          if key.startswith("0/255") else ""))
            parts.append(f"{key}: {len(members)}")
        if len(groups) > limit:
            rest = sum(len(members) for members in groups.values()) - sum(int(p.rsplit(": ", 1)[1]) for p in parts)
            parts.append(f"{len(groups) - limit} other value set(s): {rest}")
        return "; ".join(parts)

    def line(self) -> str:
        """The decision in one line."""
        return f"{self.encoding.title} ({self.how}): {self.encoding.rule()}"


def _candidates(foreground: tuple[int, ...], threshold: int) -> list[MaskEncoding]:
    if foreground:
        return [MaskEncoding("labels", threshold, foreground)]
    return [MaskEncoding(name, threshold) for name in ("binary-0-255", "binary-0-1", "labels")]


def decide_encoding(masks: Sequence[MaskValues], encoding: str = "auto", threshold: int = 128,
                    foreground: Iterable[int] = ()) -> EncodingDecision:
    """The one encoding of a dataset whose masks are ``masks``, and the masks that do not fit it.

    ``encoding`` other than ``auto`` is taken as given. ``auto`` chooses, among binary 0/255,
    binary 0/1 and label map (only label map when ``foreground`` values are given), the encoding
    that fits the most non-empty masks, in that order on a tie; palette when every non-empty mask
    is a coloured palette image. A mask of unknown kind (e.g. a photo) fits none under ``auto``.
    """
    foreground = tuple(int(v) for v in foreground)
    if encoding != "auto":
        chosen = MaskEncoding(encoding, threshold, foreground)
        return EncodingDecision(chosen, list(masks), [m for m in masks if not chosen.fits(m)], "set by data.mask_encoding")
    filled = [m for m in masks if m.kind != "empty"]
    if filled and all(m.source == "palette indices" for m in filled):
        chosen = MaskEncoding("palette", threshold, foreground)
    else:
        known = [m for m in filled if m.kind != "unknown"]
        candidates = _candidates(foreground, threshold)
        chosen = max(candidates, key=lambda c: (sum(c.fits(m) for m in known), -candidates.index(c)))
    misfits = [m for m in masks if m.kind == "unknown" or not chosen.fits(m)]
    how = f"decided from {len(masks)} masks" + (f", {len(masks) - len(filled)} of them empty" if len(filled) < len(masks) else "")
    return EncodingDecision(chosen, list(masks), misfits, how)


def configured_encoding(data: DataConfig) -> MaskEncoding | None:
    """The encoding ``data.mask_encoding`` names, or None for ``auto`` (to be decided from the masks)."""
    if data.mask_encoding == "auto":
        return None
    return MaskEncoding(data.mask_encoding, data.mask_threshold, tuple(data.foreground_values))


def dataset_encoding(data: DataConfig, mask_paths: Sequence[str | Path]) -> MaskEncoding:
    """The encoding to read ``mask_paths`` with: the configured one, or decided from all of them (``auto``).

    Raises:
        MaskEncodingError: under ``auto``, some masks fit no encoding or not the decided one (the
            first is named, with how many there are).
    """
    given = configured_encoding(data)
    if given is not None:
        return given
    decision = decide_encoding(inspect_masks(list(mask_paths)), "auto", data.mask_threshold, data.foreground_values)
    refuse_misfits(decision)
    return decision.encoding


def refuse_misfits(decision: EncodingDecision) -> None:
    """Raise :class:`MaskEncodingError` for the first mask that does not fit, counting the others."""
    if not decision.misfits:
        return
    first = decision.misfits[0]
    message = misfit_message(first, None if first.kind == "unknown" else decision.encoding)
    others = len(decision.misfits) - 1
    raise MaskEncodingError(message + (f"; {others} other mask(s) do not fit either" if others else ""))
