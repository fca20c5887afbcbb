"""Checkpoint folders that are complete or clearly not: a marker written last, found before any resume.

A crash while a checkpoint is being written leaves `checkpoint-N` without its marker; such folders are renamed
`incomplete-checkpoint-N-<time>` at the next start (kept for inspection, never resumed from, never counted by the
rotation that keeps the newest `--save-total-limit` checkpoints).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

MARKER = "checkpoint_complete.json"
CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
#: What `--keep-best` writes into OUTPUT_DIR/best: {"step": N, <the compared score's key>: value}.
BEST_FILE = "best.json"


def write_marker(folder: str | Path, step: int) -> None:
    """Written last, via a temporary file and an atomic rename, after everything else is on disk."""
    folder = Path(folder)
    for f in folder.rglob("*"):
        if f.is_file():
            try:
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
            except OSError:
                pass
    tmp = folder / (MARKER + ".tmp")
    with open(tmp, "w") as fh:
        json.dump({"step": step, "time": time.time()}, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, folder / MARKER)


def is_complete(folder: str | Path) -> bool:
    return (Path(folder) / MARKER).is_file()


def checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    out = []
    root = Path(output_dir)
    if root.is_dir():
        for p in root.iterdir():
            m = CHECKPOINT.match(p.name)
            if m and p.is_dir():
                out.append((int(m.group(1)), p))
    return sorted(out)


def latest_complete(output_dir: str | Path) -> Path | None:
    """The most recently completed checkpoint (after a resume from an earlier one, the new branch's, not a
    higher-numbered leftover of the abandoned run)."""
    done = [p for _, p in checkpoints(output_dir) if is_complete(p)]
    return max(done, key=marked_at) if done else None


def quarantine_incomplete(output_dir: str | Path) -> list[Path]:
    """Rename checkpoint folders without a marker so nothing ever resumes from (or rotates on) them."""
    moved = []
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for _, p in checkpoints(output_dir):
        if not is_complete(p):
            target = p.with_name(f"incomplete-{p.name}-{stamp}")
            os.replace(p, target)
            moved.append(target)
    return moved


def marked_step(folder: Path) -> int:
    """The optimizer step a complete checkpoint holds (its marker's record)."""
    return int(json.loads((Path(folder) / MARKER).read_text())["step"])


def marked_at(folder: Path) -> float:
    """When the checkpoint was completed (its marker's time; the marker file's mtime if that is unreadable)."""
    marker = folder / MARKER
    try:
        return float(json.loads(marker.read_text())["time"])
    except (OSError, ValueError, KeyError, TypeError):
        return marker.stat().st_mtime


def rotate(newest: str | Path, keep: int | None) -> list[Path]:
    """Keep `newest` (just marked complete) and the most recently completed others, `keep` in all; delete the rest.

    Called only after `newest` is marked, so a crash while a checkpoint is written always leaves the previous
    complete one. After a resume from an earlier checkpoint the folder may still hold higher-numbered checkpoints
    of the abandoned run: those go first (however recently they were written), then the least recently completed.
    """
    newest = Path(newest)
    if not keep or keep < 1:
        return []
    found = checkpoints(newest.parent)
    step = next((s for s, p in found if p.name == newest.name), None)
    others = [(s, p) for s, p in found if is_complete(p) and p.name != newest.name]
    others.sort(key=lambda sp: (not (step is not None and sp[0] > step), marked_at(sp[1])))
    gone = [p for _, p in others[: max(0, len(others) - (keep - 1))]]
    for p in gone:
        shutil.rmtree(p, ignore_errors=True)
    return gone


def resolve_resume(resume: str | None, output_dir: str | Path) -> Path | None:
    """`None` -> no resume; 'latest' -> newest complete checkpoint, or a fresh start when there is none yet (so a
    job script can always pass --resume); a path -> checked."""
    if not resume:
        return None
    if resume == "latest":
        found = latest_complete(output_dir)
        if found is None and int(os.environ.get("RANK", "0")) == 0:
            print(f"--resume: no complete checkpoint in {output_dir} yet; starting from step 0", flush=True)
        return found
    path = Path(resume)
    if not path.is_dir():
        renamed = sorted(path.parent.glob(f"incomplete-{path.name}-*")) if CHECKPOINT.match(path.name) else []
        if renamed:  # quarantine_incomplete ran at this start
            raise ValueError(
                f"--resume {path}: that checkpoint was not fully written (renamed {renamed[-1].name}, never resumed "
                f"from); resume from an earlier one, or pass --resume to take the newest complete checkpoint"
            )
        raise FileNotFoundError(f"--resume {path}: no such folder")
    if not is_complete(path):
        raise ValueError(f"--resume {path}: the checkpoint is incomplete (no {MARKER}); it was not fully written")
    return path


#: What a run writes into its output folder (models, checkpoints, logs, reports); --overwrite-output-dir removes them.
RUN_FILES = (
    "final", "best", "best.tmp", "best.old", "eval_predictions", "runs", "metrics.json",
    "eval_metrics.jsonl", "epoch_reports.jsonl", "loss.png", "train_config.yaml", "skipped_samples.tsv",
    "refused_samples.tsv", "refused_eval_samples.tsv", "reference_logps.json",
)  # fmt: skip


def claim_output_dir(output_dir: str | Path, resume: bool, overwrite: bool) -> list[Path]:
    """An output folder holds one run. Without --resume, a folder with another run's checkpoints or models is refused
    (its checkpoints, metrics and predictions would mix with this run's), unless --overwrite-output-dir, which
    deletes what a run writes there (and only that) first; returns what was deleted."""
    root = Path(output_dir)
    if resume or not root.is_dir():
        return []
    found = [p for _, p in checkpoints(root)] + [root / n for n in ("final", "best") if (root / n).is_dir()]
    found += sorted(root.glob("incomplete-checkpoint-*"))
    if not found:
        return []
    if not overwrite:
        names = ", ".join(p.name for p in found[:4]) + (", ..." if len(found) > 4 else "")
        raise ValueError(
            f"--output-dir {root} holds another run ({names}): pass --resume to continue it, "
            "--overwrite-output-dir to delete it and start over, or another --output-dir"
        )
    gone = found + [root / n for n in RUN_FILES if (root / n).exists() and root / n not in found]
    for path in gone:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    return gone
