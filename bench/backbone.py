"""The one backbone every loader in ``bench/compare.py`` feeds, and the exact batch checksum.

* :func:`features` stacks the six DALES fields, cast to float32 **on the device** (the loaders
  deliver stored dtypes: float32 coordinates and intensity, int32 labels).
* :class:`PointMLP` is a PointNet-style shared per-point MLP (Linear+ReLU, no BatchNorm) with a
  per-point classification head; ``linear`` is the small 6→64→C variant that leaves the loader
  as the bottleneck.
* :class:`Step` runs one batch through the model: inference under ``torch.no_grad`` or, with
  ``train=True``, a full SGD step with cross-entropy on ``sem_class``. It never synchronises
  with the device (no ``.item()``), so on CUDA the loop runs ahead of the GPU as a real loop does.
* :class:`Checksum` accumulates, on the device and without synchronising, exact integer sums of
  every field's raw bits (int64 with wraparound) plus a per-point row hash that ties the fields
  of one point together. Addition is commutative, so the result does not depend on the order of
  points or batches within the epoch, and it is bit-exact on CPU and CUDA alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

#: The DALES fields, in feature order.
FIELDS = ("x", "y", "z", "intensity", "sem_class", "ins_class")
LABEL = "sem_class"
BACKBONES = ("mlp", "linear")
MLP_WIDTHS = (64, 128, 256)
LINEAR_WIDTHS = (64,)


class PointMLP(nn.Module):
    """Shared per-point MLP: ``in → widths... → num_classes`` (Linear+ReLU, linear head)."""

    def __init__(self, in_channels: int, widths: Sequence[int], num_classes: int):
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        for w in widths:
            layers += [nn.Linear(c, w), nn.ReLU(inplace=True)]
            c = w
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(c, num_classes)
        self.widths = tuple(widths)
        self.num_classes = num_classes

    def forward(self, feats: torch.Tensor) -> torch.Tensor:  # (n, in) -> (n, num_classes)
        return self.head(self.body(feats))

    def describe(self) -> str:
        dims = [str(self.body[0].in_features if self.widths else self.head.in_features)]
        dims += [str(w) for w in self.widths] + [str(self.num_classes)]
        return "→".join(dims)


def build_backbone(kind: str, num_classes: int, in_channels: int = len(FIELDS),
                   device: torch.device | str = "cpu", seed: int = 0) -> PointMLP:
    """``mlp``: 6→64→128→256→C; ``linear``: 6→64→C. Same init for the same seed."""
    if kind not in BACKBONES:
        raise ValueError(f"backbone must be one of {', '.join(BACKBONES)}, got {kind!r}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    widths = MLP_WIDTHS if kind == "mlp" else LINEAR_WIDTHS
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = PointMLP(in_channels, widths, num_classes)
    return model.to(device)


def features(batch: Mapping[str, torch.Tensor], fields: Sequence[str] = FIELDS) -> torch.Tensor:
    """(n, len(fields)) float32, cast where the batch lives (on the device); a single (n, k)
    field is the features already (a stacked batch)."""
    if len(fields) == 1 and batch[fields[0]].dim() == 2:
        return batch[fields[0]].to(torch.float32)
    return torch.stack([batch[f].to(torch.float32) for f in fields], dim=1)


class Step:
    """One batch through the backbone: inference, or a full training step with ``train``."""

    def __init__(self, model: PointMLP, train: bool, fields: Sequence[str] = FIELDS,
                 label: str = LABEL, lr: float = 1e-3):
        self.model = model
        self.train = train
        self.fields = tuple(fields)
        self.label = label
        model.train(train)
        self.opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9) if train else None

    def __call__(self, batch: Mapping[str, torch.Tensor]) -> None:
        feats = features(batch, self.fields)
        if not self.train:
            with torch.no_grad():
                self.model(feats)
            return
        assert self.opt is not None
        logits = self.model(feats)
        # Negative labels (e.g. -1 "unlabelled") are ignored, as segmentation code does.
        loss = F.cross_entropy(logits, batch[self.label].long(), ignore_index=-1)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()


# -- checksum -------------------------------------------------------------------------------
_BITS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
# Odd 64-bit constants (as signed int64) for the row hash: splitmix64's multipliers and
# golden-ratio-derived primes, one per field position.
_MIX1 = -0x40A7B892E31B1A47  # 0xBF58476D1CE4E5B9
_MIX2 = -0x6B2FB644ECCEEE15  # 0x94D049BB133111EB
_FIELD_MULS = (0x1F3D5B79, 0x2545F491, 0x6C8E9CF5, 0x0BADC0DE5, 0x7FEB352D, 0x846CA68B,
               0x3C6EF372, 0x5851F42D)


def raw_bits(t: torch.Tensor) -> torch.Tensor:
    """A field's raw bits as int64 (sign-extended from a signed int of the same width)."""
    t = t.reshape(t.shape[0], -1)
    bits = t.view(_BITS[t.element_size()]) if t.dtype != _BITS[t.element_size()] else t
    return bits.to(torch.int64)


class Checksum:
    """Exact, order-independent checksum of every point consumed, accumulated on the device.

    ``update`` queues a few elementwise kernels and sums and never synchronises;
    :meth:`result` copies the accumulators to the host once, at the end of the epoch.
    """

    def __init__(self, fields: Sequence[str], device: torch.device | str):
        self.fields = tuple(fields)
        self.device = torch.device(device)
        self.sums = torch.zeros(len(self.fields), dtype=torch.int64, device=self.device)
        self.rows = torch.zeros((), dtype=torch.int64, device=self.device)
        self.points = 0

    def update(self, batch: Mapping[str, torch.Tensor]) -> None:
        n = batch[self.fields[0]].shape[0]
        self.points += int(n)
        if n == 0:
            return
        h = torch.zeros(n, dtype=torch.int64, device=self.device)
        parts = []
        for i, f in enumerate(self.fields):
            b = raw_bits(batch[f])  # (n, components) int64
            parts.append(b.sum())
            # Components: fold each column in with its own multiplier.
            for c in range(b.shape[1]):
                h.add_(b[:, c] * _FIELD_MULS[(i + c) % len(_FIELD_MULS)] + (i + c + 1))
                h.mul_(_MIX1)
        # splitmix64-style finaliser (arithmetic shifts; identical on CPU and CUDA).
        h = h ^ (h >> 31)
        h = h * _MIX2
        h = h ^ (h >> 29)
        self.sums.add_(torch.stack(parts))
        self.rows.add_(h.sum())

    def result(self) -> dict:
        """Host copy: ``{"points": n, "rows": int, "fields": {name: int}}`` (one device sync)."""
        sums = self.sums.cpu().tolist()
        return {"points": self.points, "rows": int(self.rows.cpu()),
                "fields": dict(zip(self.fields, (int(s) for s in sums)))}


class ChecksumMismatch(Exception):
    """Two loaders consumed different points."""


@dataclass(frozen=True)
class _Diff:
    name: str
    what: str


def compare_checksums(results: Mapping[str, Mapping], reference: str | None = None) -> None:
    """Raise :class:`ChecksumMismatch` naming every loader whose checksum differs from the
    reference's (the first entry by default), and what differs. Empty or single: nothing to do."""
    if not results:
        return
    names = list(results)
    ref = reference if reference is not None else names[0]
    if ref not in results:
        raise KeyError(f"reference {ref!r} is not among the results ({', '.join(names)})")
    want = results[ref]
    diffs: list[_Diff] = []
    for name in names:
        if name == ref:
            continue
        got = results[name]
        what = []
        if got.get("points") != want.get("points"):
            what.append(f"points {got.get('points')} vs {want.get('points')}")
        gf, wf = got.get("fields", {}), want.get("fields", {})
        for f in sorted(set(gf) | set(wf)):
            if gf.get(f) != wf.get(f):
                what.append(f"field {f} sum {gf.get(f)} vs {wf.get(f)}")
        if got.get("rows") != want.get("rows"):
            what.append(f"row hash {got.get('rows')} vs {want.get('rows')}")
        if what:
            diffs.append(_Diff(name, "; ".join(what)))
    if diffs:
        lines = [f"  {d.name} differs from {ref}: {d.what}" for d in diffs]
        raise ChecksumMismatch(
            f"checksum mismatch: {', '.join(d.name for d in diffs)} consumed different points "
            f"than {ref}\n" + "\n".join(lines))
