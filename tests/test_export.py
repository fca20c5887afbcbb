"""Saved model folders serve like the base: remote-code files and `auto_map`s as the base has them, generation that
stops where answers end, adapters that old PEFT reads; `phi3v-tune export` round trips, vLLM-ready layout, model
card, atomic writes, upload arguments."""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from phi3v_tune import Phi3VForCausalLM, Phi3VProcessor
from phi3v_tune.config import TrainConfig
from phi3v_tune.model.tiny import save_tiny_checkpoint
from phi3v_tune.train.export import export_model
from phi3v_tune.train.run import run_summary, run_training

#: LoraConfig fields of PEFT 0.11.1 (its lora/config.py and config.py dataclasses), the recipe's era: frozen here.
PEFT_0_11_1_LORA_CONFIG = {
    "peft_type", "auto_mapping", "base_model_name_or_path", "revision", "task_type", "inference_mode", "r",
    "target_modules", "lora_alpha", "lora_dropout", "fan_in_fan_out", "bias", "use_rslora", "modules_to_save",
    "init_lora_weights", "layers_to_transform", "layers_pattern", "rank_pattern", "alpha_pattern", "megatron_config",
    "megatron_core", "loftq_config", "use_dora", "layer_replication",
}  # fmt: skip

# The two published file sets: Phi-3.5-vision keeps both processor classes in processing_phi3_v.py; Phi-3-vision-128k
# has image_processing_phi3_v.py too, and its modeling file imports image_embedding_phi3_v.py (named by no auto_map).
CONFIG_AUTO_MAP = {
    "AutoConfig": "configuration_phi3_v.Phi3VConfig",
    "AutoModelForCausalLM": "modeling_phi3_v.Phi3VForCausalLM",
}
FILE_SETS = {
    "phi35": {
        "auto_map": {
            "AutoProcessor": "processing_phi3_v.Phi3VProcessor",
            "AutoImageProcessor": "processing_phi3_v.Phi3VImageProcessor",
        },
        "files": ["configuration_phi3_v.py", "modeling_phi3_v.py", "processing_phi3_v.py"],
    },
    "phi3_128k": {
        "auto_map": {
            "AutoProcessor": "processing_phi3_v.Phi3VProcessor",
            "AutoImageProcessor": "image_processing_phi3_v.Phi3VImageProcessor",
        },
        "files": [
            "configuration_phi3_v.py",
            "modeling_phi3_v.py",
            "image_embedding_phi3_v.py",
            "processing_phi3_v.py",
            "image_processing_phi3_v.py",
        ],  # fmt: skip
    },
}
STAND_IN_CONFIG = '''"""Stand-in for the publisher's configuration file ({tag})."""
from transformers import PretrainedConfig


class Phi3VConfig(PretrainedConfig):
    model_type = "phi3_v"
    stand_in = "{tag}"
'''
STAND_IN_MODELING = '''"""Stand-in for the publisher's modeling file ({tag})."""
from .configuration_phi3_v import Phi3VConfig
{extra}

class Phi3VForCausalLM:
    config_class = Phi3VConfig
'''
STAND_IN_PROCESSING = '''"""Stand-in for the publisher's processor file ({tag})."""


class Phi3VImageProcessor:
    stand_in = "{tag}"

    def __init__(self, **settings):
        self.settings = settings

    @classmethod
    def register_for_auto_class(cls, auto_class="AutoImageProcessor"):
        pass

    @classmethod
    def from_dict(cls, config, *args, **kwargs):
        return cls(**config)


class Phi3VProcessor:
    stand_in = "{tag}"

    @classmethod
    def register_for_auto_class(cls, auto_class="AutoProcessor"):
        pass

    @classmethod
    def from_pretrained(cls, folder, *args, **kwargs):
        return cls()
'''


def make_base(folder: Path, file_set: str | None, seed: int = 1) -> Path:
    """A tiny model folder laid out as a published one: the config's and preprocessor's `auto_map` of `file_set`
    with stand-in remote-code files (None: the `auto_map`s without the files), and a generation config that stops
    on `</s>` (2) and `<|assistant|>` only, as configs from before fine-tuning do."""
    save_tiny_checkpoint(folder, seed=seed, num_crops=1)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = CONFIG_AUTO_MAP
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    spec = FILE_SETS[file_set or "phi35"]
    pre = json.loads((folder / "preprocessor_config.json").read_text())
    pre["auto_map"] = spec["auto_map"]
    (folder / "preprocessor_config.json").write_text(json.dumps(pre, indent=2))
    generation = json.loads((folder / "generation_config.json").read_text())
    assistant = Phi3VProcessor.from_pretrained(folder).tokenizer.convert_tokens_to_ids("<|assistant|>")
    generation.update(eos_token_id=[2, assistant], _from_model_config=True, max_length=4096)
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2))
    if file_set is None:
        return folder
    tag = f"{file_set}-{folder.name}"
    extra = "from .image_embedding_phi3_v import EMBEDDING\n" if file_set == "phi3_128k" else ""
    texts = {
        "configuration_phi3_v.py": STAND_IN_CONFIG.format(tag=tag),
        "modeling_phi3_v.py": STAND_IN_MODELING.format(tag=tag, extra=extra),
        "processing_phi3_v.py": STAND_IN_PROCESSING.format(tag=tag),
        "image_embedding_phi3_v.py": f'EMBEDDING = "{tag}"\n',
        "image_processing_phi3_v.py": STAND_IN_PROCESSING.format(tag=tag + "-image"),
    }
    for name in spec["files"]:
        (folder / name).write_text(texts[name])
    return folder


def write_data(folder: Path, with_images: bool) -> Path:
    """Two samples whose answer is one word; with images, a 40x30 picture each (num_crops 1)."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, colour in enumerate(["red", "blue"]):
        turn = {"user": f"Say {colour}.", "assistant": colour}
        if with_images:
            Image.new("RGB", (40, 30), colour).save(folder / f"{colour}.png")
            turn = {"images": [f"{colour}.png"], "user": "<|image_1|>\nWhat colour?", "assistant": colour}
        rows.append({"id": str(i), "conversations": [turn]})
    path = folder / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def train(base: Path, data: Path, out: Path, **settings) -> tuple[dict, TrainConfig]:
    values = dict(
        data=str(data), model=str(base), num_crops=1, output_dir=str(out), batch_size=2, batch_size_per_device=1,
        learning_rate=1e-2, warmup_steps=0, lr_scheduler="constant", seed=3, save_steps=1000, logging_steps=5,
        report_to="none", num_workers=0, progress=False, cpu=True, max_steps=2,
    )  # fmt: skip
    values.update(settings)
    cfg = TrainConfig(**values)
    return run_training(cfg), cfg


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """One run per method: full (taught to answer one word and end with <|end|>; a checkpoint on the way),
    freeze-vision (a base without remote-code files), lora (the 128k file set, a checkpoint on the way), lora with
    --lora-vision."""
    root = tmp_path_factory.mktemp("runs")
    text, images = write_data(root / "text", False), write_data(root / "images", True)
    out = {
        "base35": make_base(root / "base35", "phi35"),
        "base128k": make_base(root / "base128k", "phi3_128k", seed=2),
        "plain": make_base(root / "plain", None, seed=3),
    }
    out["full_metrics"], out["full_cfg"] = train(out["base35"], text, root / "full", max_steps=20, save_steps=10)
    out["full"] = root / "full"
    train(out["plain"], images, root / "freeze", method="freeze-vision")
    out["freeze"] = root / "freeze"
    train(out["base128k"], images, root / "lora", method="lora", lora_rank=4, save_steps=1)
    out["lora"] = root / "lora"
    train(out["base35"], images, root / "lora_vision", method="lora", lora_rank=4, lora_vision=True)
    out["lora_vision"] = root / "lora_vision"
    return out


def read(folder: Path, name: str) -> dict:
    return json.loads((folder / name).read_text())


def image_inputs(processor: Phi3VProcessor) -> dict:
    prompt = "<|user|>\n<|image_1|>\nWhat colour?<|end|>\n<|assistant|>\n"
    return processor(text=prompt, images=[Image.new("RGB", (40, 30), "red")])


# --------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "run, base, folders",
    [
        ("full", "base35", ["final", "checkpoint-10", "checkpoint-20"]),
        ("lora", "base128k", ["final", "checkpoint-1", "checkpoint-2"]),
    ],
)
def test_saved_folders_carry_the_base_remote_code_and_auto_maps(runs, run, base, folders):
    base = runs[base]
    expected = FILE_SETS["phi35" if base.name == "base35" else "phi3_128k"]["files"]
    for name in folders:
        folder = runs[run] / name
        for file in expected:
            assert (folder / file).read_bytes() == (base / file).read_bytes(), (folder, file)
        assert (
            read(folder, "preprocessor_config.json")["auto_map"] == read(base, "preprocessor_config.json")["auto_map"]
        )
        if (folder / "config.json").is_file():  # a full model (an adapter has the base's config, not its own)
            assert read(folder, "config.json")["auto_map"] == CONFIG_AUTO_MAP


def test_generation_stops_where_the_trained_answer_ends(runs):
    """The base's generation config stops on </s> and <|assistant|> only; final/'s adds <|end|> and <|endoftext|>,
    keeps the base's other fields, and model.generate stops right after the answer without being told."""
    from transformers import pipeline

    final = runs["full"] / "final"
    processor = Phi3VProcessor.from_pretrained(final)
    end, eos = processor.tokenizer.convert_tokens_to_ids("<|end|>"), processor.tokenizer.eos_token_id
    base_generation = read(runs["base35"], "generation_config.json")
    generation = read(final, "generation_config.json")
    assert generation["eos_token_id"] == [*base_generation["eos_token_id"], end, eos]
    assert generation["max_length"] == 4096 and "_from_model_config" not in generation
    for checkpoint in ("checkpoint-10", "checkpoint-20"):
        assert read(runs["full"] / checkpoint, "generation_config.json") == generation
    model = Phi3VForCausalLM.from_pretrained(final).eval()
    prompt = "<|user|>\nSay red.<|end|>\n<|assistant|>\n"
    inputs = processor(text=prompt)
    new = model.generate(**inputs, max_new_tokens=20)[0, inputs["input_ids"].shape[1] :].tolist()
    assert new[-1] == end and len(new) < 20 and processor.decode(new, skip_special_tokens=True).strip() == "red"
    # what the base's stop ids alone gave: the answer, then on to the token limit
    longer = model.generate(**inputs, max_new_tokens=20, eos_token_id=base_generation["eos_token_id"])
    assert longer.shape[1] - inputs["input_ids"].shape[1] == 20
    # transformers' pipeline takes our model and processor (prompt strings with <|image_N|> tags) and stops too
    pipe = pipeline("image-text-to-text", model=model, processor=processor)
    out = pipe(text=prompt, max_new_tokens=20, return_tensors=True)[0]["generated_token_ids"].tolist()
    assert out[-len(new) :] == new
    assert pipe(text=prompt, max_new_tokens=20, return_full_text=False)[0]["generated_text"].strip() == "red"
    with_image = "<|user|>\n<|image_1|>\nSay red.<|end|>\n<|assistant|>\n"
    picture = Image.new("RGB", (40, 30), "red")
    out = pipe(images=[picture], text=with_image, max_new_tokens=20, return_tensors=True)[0]["generated_token_ids"]
    answer = out[processor(text=with_image, images=[picture])["input_ids"].shape[1] :].tolist()
    assert answer[-1] == end and len(answer) < 20
    text = pipe(images=[picture], text=with_image, max_new_tokens=20, return_full_text=False)[0]["generated_text"]
    assert text.strip() == processor.decode(answer, skip_special_tokens=True).strip() != ""


def test_a_base_without_remote_code_loads_with_our_classes_and_the_summary_says_how_to_add_it(runs):
    from transformers import AutoModelForCausalLM, AutoProcessor

    final = runs["freeze"] / "final"
    assert not list(final.glob("*.py"))
    assert type(AutoModelForCausalLM.from_pretrained(final)) is Phi3VForCausalLM  # after `import phi3v_tune`
    # its preprocessor_config.json names remote code it lacks: AutoProcessor takes ours, with no trust question
    assert "auto_map" in json.loads((final / "preprocessor_config.json").read_text())
    processor = AutoProcessor.from_pretrained(final)
    assert type(processor) is Phi3VProcessor and processor.image_processor.num_crops == 1
    metrics = json.loads((runs["freeze"] / "metrics.json").read_text())
    cfg = TrainConfig(model=str(runs["plain"]), metric=None)
    summary = run_summary(metrics, cfg.metric, runs["freeze"], cfg.model)
    line = next(x for x in summary.splitlines() if x.strip().startswith("note:"))
    assert "configuration_phi3_v.py, modeling_phi3_v.py, processing_phi3_v.py" in line
    assert "hf download microsoft/Phi-3.5-vision-instruct configuration_phi3_v.py modeling_phi3_v.py " in line
    assert f"--local-dir {final}" in line


def test_default_lora_adapter_config_is_readable_by_peft_0_11(runs):
    """No key outside PEFT 0.11.1's LoraConfig, the same LoraConfig for today's PEFT, and a non-default setting old
    PEFT cannot express is kept with a warning."""
    from peft import LoraConfig

    from phi3v_tune.model.serving_files import old_peft_adapter_config, old_peft_warnings

    for run in ("lora", "lora_vision"):
        for name in ("final", "checkpoint-1") if run == "lora" else ("final",):
            written = read(runs[run] / name, "adapter_config.json")
            assert set(written) <= PEFT_0_11_1_LORA_CONFIG, sorted(set(written) - PEFT_0_11_1_LORA_CONFIG)
            assert written["target_modules"] and written["init_lora_weights"] == "gaussian" and written["r"] == 4
    full = LoraConfig(r=4, lora_alpha=8, target_modules="^(a|b)$", init_lora_weights="gaussian", task_type="CAUSAL_LM")
    as_saved = json.loads(json.dumps(full.to_dict(), default=str))
    trimmed, kept = old_peft_adapter_config(as_saved)
    assert kept == [] and set(trimmed) <= PEFT_0_11_1_LORA_CONFIG
    again = LoraConfig(**{k: v for k, v in trimmed.items()})
    for key, value in as_saved.items():
        if key != "peft_version":
            assert json.loads(json.dumps(getattr(again, key), default=str)) == value, key
    unusual, kept = old_peft_adapter_config({**as_saved, "qalora_group_size": 32})
    assert kept == ["qalora_group_size"] and unusual["qalora_group_size"] == 32
    folder = runs["lora"] / "final"
    assert old_peft_warnings(folder) == []


# --------------------------------------------------------------------------------------------------------------------
def same_logits(a: torch.nn.Module, b: torch.nn.Module, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return a(**inputs).logits, b(**inputs).logits


@pytest.mark.parametrize("run", ["full", "freeze"])
def test_export_round_trip_of_full_and_freeze_vision_runs(runs, run, tmp_path):
    from phi3v_tune.model.loading import load_for_inference

    final = runs[run] / "final"
    trained = load_for_inference(final).eval()
    processor = Phi3VProcessor.from_pretrained(final)
    inputs = image_inputs(processor)
    exact = export_model(runs[run], tmp_path / "fp32", dtype="float32").folder  # the run folder stands for final/
    a, b = same_logits(trained, Phi3VForCausalLM.from_pretrained(exact).eval(), inputs)
    assert torch.equal(a, b)
    half = export_model(final, tmp_path / "bf16").folder
    assert read(half, "config.json")["torch_dtype"] == "bfloat16"
    stored = {k: v for f in half.glob("*.safetensors") for k, v in load_file(f).items()}
    state = trained.state_dict()
    assert stored.keys() == state.keys() and all(v.dtype == torch.bfloat16 for v in stored.values())
    assert all(torch.equal(stored[k], state[k].to(torch.bfloat16)) for k in stored)  # one rounding, nothing else
    rounded = load_for_inference(final).eval()
    for p in rounded.parameters():
        p.data = p.data.to(torch.bfloat16).float()
    a, b = same_logits(rounded, Phi3VForCausalLM.from_pretrained(half, dtype=torch.float32).eval(), inputs)
    assert torch.equal(a, b)
    assert (half / "train_config.yaml").read_bytes() == (final / "train_config.yaml").read_bytes()


@pytest.mark.parametrize("run", ["lora", "lora_vision"])
def test_export_round_trip_of_lora_runs(runs, run, tmp_path):
    from phi3v_tune.model.loading import load_for_inference

    final = runs[run] / "final"
    trained = load_for_inference(final, merge=False).eval()  # base + adapter, as trained
    base = Phi3VForCausalLM.from_pretrained(runs["base128k" if run == "lora" else "base35"]).eval()
    inputs = image_inputs(Phi3VProcessor.from_pretrained(final))
    exported = export_model(final, tmp_path / "merged", dtype="float32")
    assert exported.source.adapter
    merged = Phi3VForCausalLM.from_pretrained(exported.folder).eval()
    a, b = same_logits(trained, merged, inputs)
    assert torch.allclose(a, b, atol=1e-5, rtol=0)  # merging W + BA reassociates the sums: not bit-exact
    with torch.no_grad():
        assert not torch.allclose(base(**inputs).logits, a, atol=1e-4)  # the adapter changed the answer
    if run == "lora_vision":  # the CLIP tower and projector were merged too
        vision = "model.vision_embed_tokens.img_projection.0.weight"
        assert not torch.equal(merged.state_dict()[vision], base.state_dict()[vision])
    base_dir = runs["base128k" if run == "lora" else "base35"]
    for name in remote_code_names(base_dir):
        assert (exported.folder / name).read_bytes() == (base_dir / name).read_bytes()
    half = export_model(final, tmp_path / "bf16")
    stored = {k: v for f in half.folder.glob("*.safetensors") for k, v in load_file(f).items()}
    merged_state = merged.state_dict()
    assert all(torch.equal(stored[k], merged_state[k].to(torch.bfloat16)) for k in stored)


def remote_code_names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("*.py"))


def test_exported_folders_load_with_trust_remote_code(runs, tmp_path):
    """The standard model-card calls of a transformers user (a process without phi3v_tune, whose registration would
    take precedence over remote code) reach the publisher's classes (stand-ins here) in an export of each file set."""
    import subprocess
    import sys

    from launch import cpu_env

    folders = {run: str(export_model(runs[run], tmp_path / f"served_{run}").folder) for run in ("full", "lora")}
    script = (
        "import json, sys\n"
        "from transformers import AutoConfig, AutoImageProcessor, AutoProcessor\n"
        "out = {}\n"
        "for run, folder in json.loads(sys.argv[1]).items():\n"
        "    image = AutoImageProcessor.from_pretrained(folder, trust_remote_code=True)\n"
        "    out[run] = [AutoConfig.from_pretrained(folder, trust_remote_code=True).stand_in, image.stand_in,\n"
        "                image.settings['num_crops'], AutoProcessor.from_pretrained(folder, trust_remote_code=True).stand_in]\n"
        "print(json.dumps(out))\n"
    )
    env = {**cpu_env(), "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", script, json.dumps(folders)], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    loaded = json.loads(proc.stdout.strip().splitlines()[-1])
    assert loaded["full"] == ["phi35-base35", "phi35-base35", 1, "phi35-base35"]
    assert loaded["lora"] == ["phi3_128k-base128k", "phi3_128k-base128k-image", 1, "phi3_128k-base128k"]


def test_export_of_a_checkpoint_with_model_card_and_upload_arguments(runs, tmp_path, monkeypatch):
    from huggingface_hub import HfApi

    calls: dict[str, dict] = {}

    def fake_create_repo(self, repo_id, **kwargs):
        calls["create_repo"] = {"repo_id": repo_id, **kwargs}

    def fake_upload_folder(self, **kwargs):
        calls["upload_folder"] = kwargs
        return "https://huggingface.co/me/tuned/commit/abc"

    monkeypatch.setattr(HfApi, "create_repo", fake_create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", fake_upload_folder)
    from phi3v_tune.cli import main as cli

    out = tmp_path / "served"
    code = cli(["export", "--model", str(runs["full"] / "checkpoint-10"), "--out", str(out), "--push-to-hub",
                "me/tuned", "--private", "--max-shard-size", "200KB"])  # fmt: skip
    assert code == 0
    assert calls["create_repo"] == {"repo_id": "me/tuned", "repo_type": "model", "private": True, "exist_ok": True}
    upload = calls["upload_folder"]
    assert (upload["repo_id"], upload["repo_type"], upload["folder_path"]) == ("me/tuned", "model", str(out))
    index = read(out, "model.safetensors.index.json")
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 1 and set(index["weight_map"].values()) == {
        p.name for p in out.glob("model-*-of-*.safetensors")
    }
    card = (out / "README.md").read_text()
    front, body = card.split("---\n")[1], card.split("---\n", 2)[2]
    for line in ("library_name: transformers", "pipeline_tag: image-text-to-text", "- phi3v-tune", "- full"):
        assert line in front, line
    assert "base_model" not in front  # a local base folder is no hub id
    assert "learning_rate: 0.01" in body and "max_steps: 20" in body  # the training settings
    assert "| last evaluation |" not in body  # the run had no evaluation data
    assert 'from_pretrained("me/tuned", trust_remote_code=True' in body and "vllm serve me/tuned" in body
    assert 'Phi3VForCausalLM.from_pretrained("me/tuned"' in body


def test_model_card_lists_the_run_evaluation(runs, tmp_path):
    from phi3v_tune.train.model_card import run_evaluation

    run = tmp_path / "run"
    shutil.copytree(runs["freeze"] / "final", run / "final")
    metrics = {
        "eval_before": {"eval_loss": 2.5, "step": 0},
        "eval_after": {"eval_loss": 0.75, "eval_runtime": 1.0},
        "task_metric": [{"when": "before", "step": 0, "eval_anls": 0.125}, {"when": "after", "step": 2, "eval_anls": 0.5}],
    }  # fmt: skip
    (run / "metrics.json").write_text(json.dumps(metrics))
    assert run_evaluation(run / "final") == [
        {"when": "before training", "step": 0, "loss": 2.5, "anls": 0.125},
        {"when": "after training", "step": 2, "loss": 0.75, "anls": 0.5},
    ]
    body = (export_model(run, tmp_path / "out").folder / "README.md").read_text()
    assert "| after training | 2 | 0.7500 | 0.5000 |" in body
    assert "method: freeze-vision" in body and "stop_at_step:" not in body  # what the model is, not how the job ran
    # best/ (kept at step 1 by --keep-best): its own step's evaluation, not the run's last one
    shutil.copytree(runs["freeze"] / "final", run / "best")
    (run / "best" / "best.json").write_text(json.dumps({"step": 1, "eval_anls": 0.625}))
    metrics["log_history"] = [{"step": 1, "loss": 2.0}, {"step": 1, "eval_loss": 1.5}, {"step": 1, "eval_anls": 0.625},
                              {"step": 2, "eval_loss": 0.75}]  # fmt: skip
    (run / "metrics.json").write_text(json.dumps(metrics))
    assert run_evaluation(run / "best") == [
        {"when": "before training", "step": 0, "loss": 2.5, "anls": 0.125},
        {"when": "best (--keep-best)", "step": 1, "loss": 1.5, "anls": 0.625},
    ]
    (run / "metrics.json").unlink()  # a run still going: best.json's own score
    assert run_evaluation(run / "best") == [{"when": "best (--keep-best)", "step": 1, "anls": 0.625}]


def test_vllm_readiness_published_names_config_and_tokenizer(published_dir, real_tokenizer_dir, tmp_path):
    """A model with the published depth (tiny widths: the same tensor names as the full-size checkpoint), the
    published config fields, tokenizer and processor files: the export carries the published key list, config field
    names, tokenizer files and preprocessor settings unchanged, and stops on <|end|> (32007) and <|endoftext|>."""
    from phi3v_tune.model.tiny import PUBLISHED_DEPTH, tiny_config

    tokenizer = Phi3VProcessor.from_pretrained(real_tokenizer_dir).tokenizer
    config = tiny_config(tokenizer, **PUBLISHED_DEPTH, vocab_size=32064, eos_token_id=2, pad_token_id=32000)
    config.auto_map = dict(read(published_dir, "config.json")["auto_map"])
    base = tmp_path / "published-like"
    torch.manual_seed(0)
    Phi3VForCausalLM(config).save_pretrained(base)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copyfile(real_tokenizer_dir / name, base / name)
    shutil.copyfile(published_dir / "preprocessor_config.json", base / "preprocessor_config.json")
    out = export_model(base, tmp_path / "served", max_shard_size="2MB").folder
    published_keys = set(read(published_dir, "model.safetensors.index.json")["weight_map"])
    index = read(out, "model.safetensors.index.json")
    assert set(index["weight_map"]) == published_keys and len(published_keys) == 592
    exported = read(out, "config.json")
    published = read(published_dir, "config.json")
    assert exported["architectures"] == ["Phi3VForCausalLM"] and exported["model_type"] == "phi3_v"
    assert set(published) - {"_name_or_path"} <= set(exported), set(published) - set(exported)
    assert exported["rope_scaling"]["type"] == "su" and exported["auto_map"] == published["auto_map"]
    assert exported["torch_dtype"] == "bfloat16"
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (out / name).read_bytes() == (real_tokenizer_dir / name).read_bytes(), name
    assert read(out, "preprocessor_config.json") == read(published_dir, "preprocessor_config.json")
    assert {32007, 32000} <= set(read(out, "generation_config.json")["eos_token_id"])


def test_export_refuses_to_overwrite_and_a_failure_leaves_nothing_that_looks_complete(runs, tmp_path, monkeypatch):
    import transformers.modeling_utils as modeling_utils

    out = tmp_path / "served"
    out.mkdir()
    (out / "keep.txt").write_text("a file of the user")
    with pytest.raises(ValueError, match=f"--out {out} already exists; pass --overwrite"):
        export_model(runs["freeze"], out)
    with pytest.raises(ValueError, match="holds the model being exported"):
        export_model(runs["freeze"] / "final", runs["freeze"], overwrite=True)

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(modeling_utils, "safe_save_file", full_disk)
    for target, overwrite in ((tmp_path / "fresh", False), (out, True)):
        with pytest.raises(OSError, match=f"could not write {target} \\(No space left on device\\); nothing was"):
            export_model(runs["freeze"], target, overwrite=overwrite)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["served"]  # no fresh/, no temporary sibling left
    assert [p.name for p in out.iterdir()] == ["keep.txt"]  # the existing folder as it was
    monkeypatch.undo()
    export_model(runs["freeze"], out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["served"]


def test_export_warns_about_adapter_settings_old_peft_cannot_read(runs, tmp_path, capsys):
    from phi3v_tune.cli import main as cli

    adapter = tmp_path / "adapter"
    shutil.copytree(runs["lora"] / "final", adapter)
    config = read(adapter, "adapter_config.json")
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "qalora_group_size": 32}))
    assert cli(["merge", "--adapter", str(adapter), "--out", str(tmp_path / "merged")]) == 0  # merge: export's alias
    printed = capsys.readouterr().out
    assert "warning:" in printed and "qalora_group_size=32" in printed and "PEFT before 0.14" in printed
    assert "LoRA adapter merged onto its base" in printed


def test_a_folder_without_a_model_is_named_before_anything_loads(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.json").write_text("{}")  # a --no-save-checkpoints run: no final/
    with pytest.raises(ValueError, match=r"run: not a model folder \(no config.json\) nor a LoRA adapter folder"):
        export_model(run, tmp_path / "out")
    assert not (tmp_path / "out").exists()
