"""Training data set: records planned up front (lengths, truncation, refusals), examples built in loader workers."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from torch.utils.data import Dataset
from tqdm.auto import tqdm

from ..processing.processor import Phi3VProcessor
from .examples import SampleRefused, build_example
from .layout import DEFAULT_LAYOUT, SampleLayout
from .schema import Record


@dataclass
class DataPlan:
    """What the data set holds and what happened to every input sample (nothing is dropped silently)."""

    kept: list[Record] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)
    truncated: list[str] = field(default_factory=list)
    refused: list[tuple[str, str, str]] = field(default_factory=list)  # (id, reason code, message)
    num_images: int = 0

    @property
    def num_tokens(self) -> int:
        return sum(self.lengths)

    def summary(self, name: str = "data") -> str:
        total = len(self.kept) + len(self.refused)
        reasons = Counter(r for _, r, _ in self.refused)
        lines = [
            f"{name}: {total} samples -> {len(self.kept)} used, {len(self.truncated)} truncated, "
            f"{len(self.refused)} refused; {self.num_images} images, {self.num_tokens} tokens "
            f"(mean {self.num_tokens / max(1, len(self.kept)):.0f}, max {max(self.lengths, default=0)})"
        ]
        for reason, count in sorted(reasons.items()):
            lines.append(f"  refused ({reason}): {count}")
        return "\n".join(lines)


def plan_records(
    records: list[Record],
    processor: Phi3VProcessor,
    layout: SampleLayout = DEFAULT_LAYOUT,
    progress: bool = True,
) -> DataPlan:
    """Token lengths from image headers (no decoding), truncation and refusals, for every record."""
    plan = DataPlan()
    for rec in tqdm(records, desc="planning samples", disable=not progress or len(records) < 500, leave=False):
        try:
            ex = build_example(rec, processor, layout, load_pixels=False)
        except SampleRefused as err:
            plan.refused.append((rec.id, err.reason, str(err)))
            continue
        except ValueError as err:
            plan.refused.append((rec.id, "invalid", str(err)))
            continue
        plan.kept.append(rec)
        plan.lengths.append(int(ex["input_ids"].shape[0]))
        plan.num_images += ex["num_images"]
        if ex["truncated"]:
            plan.truncated.append(rec.id)
    return plan


def write_refused(plan: DataPlan, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write("id\treason\tmessage\n")
        for rid, reason, message in plan.refused:
            f.write(f"{rid}\t{reason}\t{message}\n")
    return path


class ConversationDataset(Dataset):
    """Examples of planned records; images are decoded here, i.e. in the data-loader workers."""

    def __init__(
        self,
        records: list[Record],
        processor: Phi3VProcessor,
        layout: SampleLayout = DEFAULT_LAYOUT,
        lengths: list[int] | None = None,
    ):
        self.records = records
        self.processor = processor
        self.layout = layout
        self.lengths = lengths

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        return build_example(self.records[i], self.processor, self.layout)
