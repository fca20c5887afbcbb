"""A training run's data: read and check everything up front, plan the samples, and build the batches.

Every problem of the training data is reported before the model loads (or, with --skip-bad-samples, the bad samples
are listed in a file and left out); evaluation data follows the same rule; samples too long for --max-length are
refused with a list. What remains is counted (`LoadedData`) so each epoch can account for every input sample.
With --objective dpo the samples are preference pairs (`data.preference`): read and checked the same way, then
planned, built and batched as pairs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..config import DataSettings
from ..data import DataError, load_records, validate_records
from ..data.collate import Collator
from ..data.dataset import ConversationDataset, DataPlan, plan_records, write_refused
from ..data.packing import PackingCollator
from ..data.preference import PackedPairCollator, PairCollator, PairDataset, PreferenceRecord, plan_pairs
from ..data.schema import Problem, Record
from ..data.validate import objective_problems
from ..processing.processor import Phi3VProcessor


@dataclass
class LoadedData:
    train: list[Record] | list[PreferenceRecord]
    eval: list[Record] | list[PreferenceRecord]
    train_plan: DataPlan
    eval_plan: DataPlan | None
    input_total: int = 0  # every non-blank input line / row, good or bad
    invalid: int = 0  # samples skipped for data problems (--skip-bad-samples)


def _longer(plan: DataPlan) -> str:
    """'raise --max-length, ' when a refusal is about length (an unreadable video is not)."""
    return "raise --max-length, " if any(reason != "invalid" for _, reason, _ in plan.refused) else ""


def _read_checked(settings: DataSettings, data: str | list[str], split: str) -> tuple[list[Record], list[Problem]]:
    """Records of `data` and every problem of them, read and checked with the run's settings."""
    records, problems = load_records(data, image_dir=settings.image_dir, split=split)
    wrong_kind = objective_problems(records, settings.objective)
    if wrong_kind:  # a whole file of the other kind: one clear message per file, not one per sample
        raise DataError(wrong_kind, header=f"the data does not fit --objective {settings.objective}:")
    return records, validate_records(
        records,
        problems,
        max_image_pixels=settings.max_image_pixels,
        layout=settings.layout,
        objective=settings.objective,
    )


def _plan(records: list[Record], processor: Phi3VProcessor, settings: DataSettings, progress: bool) -> DataPlan:
    """Lengths, truncation and refusals of the samples (or, with --objective dpo, the preference pairs)."""
    if settings.objective == "dpo":
        return plan_pairs([PreferenceRecord.of(r) for r in records], processor, settings.layout)
    return plan_records(records, processor, settings.layout, progress=progress)


def read_data(
    settings: DataSettings, processor: Phi3VProcessor, output_dir: Path, *, is_main: bool = True, say=print
) -> LoadedData:
    """Load and check everything up front; stop with the full report unless --skip-bad-samples.

    `is_main`: this process writes the lists of skipped and refused samples (every rank knows them; a shared folder
    is written once). `say`: where progress lines go (rank 0's stdout in a run)."""
    if not settings.sources:
        raise ValueError("--data is required")
    records, problems = _read_checked(settings, settings.sources, settings.split)
    loaded = {r.origin for r in records}
    bad_origins = {p.origin for p in problems}  # one origin (file:line / row) per bad sample
    input_total = len(records) + len(bad_origins - loaded)
    if problems:
        if not settings.skip_bad_samples:
            raise DataError(
                problems,
                header=f"{len(problems)} problem(s) in {settings.sources} (nothing was trained; fix "
                "them or pass --skip-bad-samples):",
            )
        skipped = output_dir / "skipped_samples.tsv"
        if is_main:
            skipped.parent.mkdir(parents=True, exist_ok=True)
            with open(skipped, "w", encoding="utf-8") as f:
                f.write("id\torigin\tfield\tproblem\n")
                for p in problems:  # a line that did not parse has no id: its origin (file:line) names it
                    f.write(f"{p.id if p.id is not None else '-'}\t{p.origin}\t{p.field}\t{p.message}\n")
        say(f"skipping {len(bad_origins)} sample(s) with {len(problems)} problem(s); listed in {skipped}")
        records = [r for r in records if r.origin not in bad_origins]
    eval_records: list[Record] = []
    if settings.eval_sources:
        eval_records, eval_problems = _read_checked(settings, settings.eval_sources, settings.eval_split)
        if eval_problems:
            raise DataError(eval_problems, header=f"{len(eval_problems)} problem(s) in {settings.eval_sources}:")
    elif settings.eval_holdout > 0:
        if settings.eval_holdout >= len(records):
            raise DataError(
                [],
                header=f"--eval-holdout {settings.eval_holdout} holds out the first {settings.eval_holdout} training "
                f"rows for evaluation (the hateful_memes and nlvr2 recipes hold out 500, as the original recipe), "
                f"which leaves none of the {len(records)} rows to train on: pass --eval-holdout N with N < "
                f"{len(records)} (e.g. --eval-holdout {max(1, len(records) // 10)}), or --eval-data",
            )
        eval_records, records = records[: settings.eval_holdout], records[settings.eval_holdout :]
    plan = _plan(records, processor, settings, progress=is_main)
    what = " (preference pairs)" if settings.objective == "dpo" else ""
    say(plan.summary(f"training data{what}"))
    if plan.refused:
        path = output_dir / "refused_samples.tsv"
        if is_main:
            write_refused(plan, path)
        if not settings.skip_bad_samples:
            raise DataError(
                [],
                header=f"{len(plan.refused)} sample(s) cannot be trained on as they are (listed in "
                f"{path}); fix them, {_longer(plan)}or pass --skip-bad-samples",
            )
    eval_plan = None
    if eval_records:
        eval_plan = _plan(eval_records, processor, settings, progress=False)
        say(eval_plan.summary(f"evaluation data{what}"))
        if eval_plan.refused:  # same rule as training: a metric over fewer samples than given is not silent
            path = output_dir / "refused_eval_samples.tsv"
            if is_main:
                write_refused(eval_plan, path)
            if not settings.skip_bad_samples:
                raise DataError(
                    [],
                    header=f"{len(eval_plan.refused)} evaluation sample(s) cannot be evaluated as they are (listed "
                    f"in {path}); fix them, {_longer(eval_plan)}or pass --skip-bad-samples to evaluate without them",
                )
    if not plan.kept:
        raise DataError([], header="no trainable samples left")
    return LoadedData(plan.kept, eval_plan.kept if eval_plan else [], plan, eval_plan, input_total, len(bad_origins))


def datasets(
    data: LoadedData, processor: Phi3VProcessor, settings: DataSettings
) -> tuple[ConversationDataset, ConversationDataset | None] | tuple[PairDataset, PairDataset | None]:
    """(training dataset, evaluation dataset or None) over the planned records (or pairs)."""
    if settings.objective == "dpo":
        train = PairDataset(data.train, processor, settings.layout, data.train_plan.lengths)
        return train, PairDataset(data.eval, processor, settings.layout) if data.eval else None
    train = ConversationDataset(data.train, processor, settings.layout, data.train_plan.lengths)
    evaluation = ConversationDataset(data.eval, processor, settings.layout) if data.eval else None
    return train, evaluation


def collators(
    pad_token_id: int, packing: bool, packing_max_tokens: int | None, rope_switch: int | None, pairs: bool = False
) -> tuple[Collator | PackingCollator, Collator] | tuple[PairCollator | PackedPairCollator, PairCollator]:
    """(training collator, evaluation collator): packed rows for training when packing is on, padded evaluation.

    `rope_switch`: the length past which a sample takes su-RoPE's long factors (the model's
    `original_max_position_embeddings` under longrope; None without), which packed rows decide per sample. `pairs`:
    preference pairs (both answers of a pair in one batch, its images once)."""
    if pairs:
        if not packing:
            return PairCollator(pad_token_id, omit_full_mask=True), PairCollator(pad_token_id)
        return PackedPairCollator(pad_token_id, packing_max_tokens, rope_switch), PairCollator(pad_token_id)
    padded = Collator(pad_token_id)
    if not packing:
        return Collator(pad_token_id, omit_full_mask=True), padded
    return PackingCollator(pad_token_id, packing_max_tokens, rope_switch), padded
