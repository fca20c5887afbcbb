"""Every name the README and the docs show, imported and called as they show it."""

from __future__ import annotations

import importlib

import torch
from PIL import Image
from transformers import AutoConfig, AutoModelForCausalLM


def test_the_package_names_load_and_work(tiny_tokenizer, tmp_path):
    import phi3v_tune
    from phi3v_tune import Phi3VConfig, Phi3VForCausalLM, Phi3VImageProcessor, Phi3VModel, Phi3VProcessor
    from phi3v_tune.model.tiny import save_tiny_checkpoint

    assert phi3v_tune.__version__ and set(phi3v_tune.__all__) >= {
        "Phi3VConfig", "Phi3VForCausalLM", "Phi3VProcessor", "Phi3VImageProcessor"
    }  # fmt: skip
    folder = save_tiny_checkpoint(tmp_path / "model", num_crops=1)
    config = Phi3VConfig.from_pretrained(folder)
    assert config.model_type == "phi3_v"
    processor = Phi3VProcessor.from_pretrained(folder, num_crops=1)
    assert isinstance(processor.image_processor, Phi3VImageProcessor)
    model = Phi3VForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa").eval()
    assert isinstance(model.model, Phi3VModel)
    prompt = processor.tokenizer.apply_chat_template(
        [{"role": "user", "content": "<|image_1|>\nWhat is shown?"}], tokenize=False, add_generation_prompt=True
    )
    inputs = processor(text=prompt, images=[Image.new("RGB", (80, 60), "red")], return_tensors="pt")
    ids = model.generate(**inputs, max_new_tokens=3, eos_token_id=processor.stop_token_ids, do_sample=False)
    assert ids.shape[0] == 1 and ids.shape[1] > inputs["input_ids"].shape[1]
    embeds = model.model.embed(inputs["input_ids"], inputs["pixel_values"], inputs["image_sizes"])
    again = model.generate(inputs_embeds=embeds, attention_mask=inputs["attention_mask"], max_new_tokens=3,
                           eos_token_id=processor.stop_token_ids, do_sample=False)  # fmt: skip
    assert again.shape[0] == 1
    # after `import phi3v_tune` the Auto classes load a phi3_v folder with these classes, no remote code
    assert type(AutoConfig.from_pretrained(folder)) is Phi3VConfig
    assert type(AutoModelForCausalLM.from_pretrained(folder)) is Phi3VForCausalLM


def test_the_data_and_evaluation_names_work(tiny_processor, tmp_path):
    from phi3v_tune.data import MULTI_TURN, Record, SampleLayout, Turn, build_example, load_records, validate_records
    from phi3v_tune.evaluate import metrics

    Image.new("RGB", (50, 40), "blue").save(tmp_path / "a.png")
    (tmp_path / "d.jsonl").write_text(
        '{"id": "q1", "conversations": [{"images": ["a.png"], "user": "Colour?", "assistant": "blue"}]}\n'
    )
    records, problems = load_records(str(tmp_path / "d.jsonl"))
    assert not validate_records(records, problems) and isinstance(records[0], Record)
    assert isinstance(records[0].turns[0], Turn) and "recipe" in MULTI_TURN
    example = build_example(records[0], tiny_processor, SampleLayout(max_length=4096))
    assert example["input_ids"].shape == example["labels"].shape and int((example["input_ids"] < 0).sum()) > 0
    assert metrics.anls(["$42.10"], [["$42.10", "42.10"]]) == 1.0
    assert metrics.accuracy(["Yes."], ["yes"]) == 1.0
    assert set(metrics.METRICS) == {"anls", "accuracy"}
    assert metrics.score("anls", "4210", ["42.10"]) == 0.8  # one edit in five characters: 1 - 1/5
    assert metrics.score("anls", "total", ["42.10"]) == 0.0  # five edits: past the 0.5 threshold


def test_the_command_line_entry_points_exist():
    cli = importlib.import_module("phi3v_tune.cli")
    main_module = importlib.import_module("phi3v_tune.__main__".rsplit(".", 1)[0])
    assert callable(cli.main) and callable(cli.build_parser) and main_module.__name__ == "phi3v_tune"
    commands = set(cli.build_parser()._subparsers._group_actions[0].choices)
    assert {"train", "export", "merge", "demo", "eval", "predict", "validate", "convert", "bench"} <= commands
