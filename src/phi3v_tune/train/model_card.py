"""The README.md model card of an exported model: Hugging Face front matter (base model, library, tags, data sets,
pipeline) and a body with the training settings, the final evaluation and how to load and serve the folder."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub import ModelCardData

from ..processing.hub import is_hub_id
from .checkpoints import BEST_FILE

PIPELINE_TAG = "image-text-to-text"
#: Settings that steer a job (where it stops, whether it resumes), not what the model is: left out of the card.
RUN_CONTROL = ("stop_at_step", "resume", "overwrite_output_dir")
VLLM_FLAGS = "--trust-remote-code --max-model-len 4096 --limit-mm-per-prompt '{\"image\": 2}'"


@dataclass
class CardFacts:
    """What the card says, gathered by the exporter."""

    name: str  # how users load it: the hub repo it is pushed to, else the folder
    base_model: str | None  # a hub id, when known
    dtype: str
    shards: int
    settings: dict[str, Any] = field(default_factory=dict)  # train_config.yaml, when the run left one
    evaluation: list[dict[str, Any]] = field(default_factory=list)  # rows: when, step, metric -> value
    remote_code: list[str] = field(default_factory=list)  # the publisher's files the folder holds
    remote_code_note: str | None = None  # how to add them when it lacks them


def hub_datasets(settings: dict[str, Any]) -> list[str]:
    """Hub data sets the run read (`org/name[:config]`; local files are no hub data set)."""
    found: list[str] = []
    for key in ("data", "eval_data"):
        value = settings.get(key)
        for source in value if isinstance(value, list) else [value] if value else []:
            name = str(source).partition(":")[0]
            if is_hub_id(name) and "/" in name:
                found.append(name)
    return list(dict.fromkeys(found))


def run_evaluation(source: Path) -> list[dict[str, Any]]:
    """The evaluation of the weights being exported: a checkpoint's own log (its last evaluation); for `best/` the
    evaluation that made it the best (its step's entries in the run's log, else best.json's score); else the run's
    metrics.json beside `final/` (before and after training)."""
    state = source / "trainer_state.json"
    if state.is_file():
        log = json.loads(state.read_text()).get("log_history", [])
        evals = [e for e in log if any(k.startswith("eval_") and k != "eval_runtime" for k in e)]
        return [_row("last evaluation", evals[-1])] if evals else []
    metrics_file = next((p for p in (source / "metrics.json", source.parent / "metrics.json") if p.is_file()), None)
    metrics = json.loads(metrics_file.read_text()) if metrics_file is not None else {}
    if (source / BEST_FILE).is_file():
        return best_evaluation(json.loads((source / BEST_FILE).read_text()), metrics)
    return _before_after(metrics)


def _before_after(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows of a run's metrics.json: the evaluation before and after training (loss and task metric)."""
    rows = []
    for when in ("before", "after"):
        entry = dict(metrics.get(f"eval_{when}") or {})
        for point in metrics.get("task_metric") or []:
            if point.get("when") == when:
                entry.update({k: v for k, v in point.items() if k.startswith("eval_")})
                entry.setdefault("step", point.get("step"))
        if entry:
            rows.append(_row(f"{when} training", entry))
    return rows


def best_evaluation(best: dict[str, Any], metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows for a `best/` folder: before training (when the run's metrics have it), then the kept step's
    evaluation."""
    step = best.get("step")
    rows = [row for row in _before_after(metrics) if row["when"] == "before training"]
    entry: dict[str, Any] = {}
    for logged in metrics.get("log_history") or []:
        if logged.get("step") == step and any(k.startswith("eval_") for k in logged):
            entry.update(logged)
    if not entry:
        entry = {k: v for k, v in best.items() if k.startswith("eval_")}
    rows.append(_row("best (--keep-best)", {**entry, "step": step}))
    return rows


def _row(when: str, entry: dict[str, Any]) -> dict[str, Any]:
    keep = {k.removeprefix("eval_"): v for k, v in entry.items() if k.startswith("eval_") and _is_metric(k)}
    return {"when": when, "step": entry.get("step"), **keep}


def _is_metric(key: str) -> bool:
    return not any(key.endswith(s) for s in ("_runtime", "_samples_per_second", "_steps_per_second"))


def front_matter(facts: CardFacts) -> str:
    method = facts.settings.get("method")
    tags = ["phi3_v", "phi3v-tune", "vision", "multimodal", *([str(method)] if method else [])]
    data = ModelCardData(
        base_model=facts.base_model,
        library_name="transformers",
        pipeline_tag=PIPELINE_TAG,
        tags=tags,
        datasets=hub_datasets(facts.settings) or None,
    )
    return f"---\n{data.to_yaml()}\n---\n"


def model_card(facts: CardFacts) -> str:
    """The whole README.md."""
    method = facts.settings.get("method", "unknown method")
    base = f"[{facts.base_model}](https://huggingface.co/{facts.base_model})" if facts.base_model else "Phi-3-vision"
    parts = [
        front_matter(facts),
        f"# {Path(facts.name).name}\n",
        f"{base} fine-tuned with phi3v-tune ({method}; LoRA adapters merged into the weights), in the published "
        f"Phi-3-vision layout: {facts.dtype} weights in {facts.shards} safetensors file(s), the base model's "
        "processor and tokenizer files, and a generation config that stops at `<|end|>` and `<|endoftext|>`.\n",
    ]
    if facts.evaluation:
        keys = [k for k in dict.fromkeys(k for row in facts.evaluation for k in row) if k not in ("when", "step")]
        table = ["| evaluation | step | " + " | ".join(keys) + " |", "|---" * (len(keys) + 2) + "|"]
        for row in facts.evaluation:
            cells = [_cell(row.get(k)) for k in keys]
            table.append(f"| {row['when']} | {_cell(row.get('step'))} | " + " | ".join(cells) + " |")
        parts.append("## Evaluation\n\n" + "\n".join(table) + "\n")
    if facts.settings:
        kept = {k: v for k, v in facts.settings.items() if k not in RUN_CONTROL}
        settings = yaml.safe_dump(kept, sort_keys=False).strip()
        parts.append(
            "## Training settings\n\n`train_config.yaml` of the run (without the settings that only steered the job: "
            f"{', '.join(RUN_CONTROL)}):\n\n```yaml\n{settings}\n```\n"
        )
    parts.append(_usage(facts))
    return "\n".join(parts)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _usage(facts: CardFacts) -> str:
    name = facts.name
    remote = (
        "With the publisher's remote code (the folder carries "
        f"{', '.join(facts.remote_code)}):\n\n```python\nfrom transformers import AutoModelForCausalLM, AutoProcessor\n\n"
        f'model = AutoModelForCausalLM.from_pretrained("{name}", trust_remote_code=True, torch_dtype="auto")\n'
        f'processor = AutoProcessor.from_pretrained("{name}", trust_remote_code=True)\n```\n'
        if facts.remote_code
        else f"Remote code: {facts.remote_code_note or 'none'}\n"
    )
    return f"""## Use with transformers

With phi3v-tune's classes (`pip install phi3v-tune`; no remote code):

```python
import torch
from PIL import Image
from phi3v_tune import Phi3VForCausalLM, Phi3VProcessor

model = Phi3VForCausalLM.from_pretrained("{name}", dtype=torch.bfloat16).eval()
processor = Phi3VProcessor.from_pretrained("{name}")
prompt = "<|user|>\\n<|image_1|>\\nWhat is shown in the image?<|end|>\\n<|assistant|>\\n"
inputs = processor(text=prompt, images=[Image.open("image.jpg")])
answer = model.generate(**inputs, max_new_tokens=64)[0, inputs["input_ids"].shape[1] :]
print(processor.decode(answer, skip_special_tokens=True))
```

After `import phi3v_tune`, `AutoModelForCausalLM.from_pretrained("{name}")` gives the same model.

{remote}
## Serve with vLLM

```bash
vllm serve {name} {VLLM_FLAGS}
```

vLLM's Phi-3-vision loader takes the merged weights of this folder (it takes no LoRA adapters) and its processor from
the remote code; generation stops at the ids in `generation_config.json`.
"""
