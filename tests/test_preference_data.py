"""Preference data (DPO): the conversations jsonl with chosen/rejected, RLAIF-V and TRL tables (generated miniatures),
validation with located problems, `validate --for dpo`, and clear errors when data and --objective do not fit."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from phi3v_tune.cli import build_parser
from phi3v_tune.cli import main as cli
from phi3v_tune.config import TrainConfig, resolve
from phi3v_tune.data import DataError, load_records, validate_path, validate_records
from phi3v_tune.data.preference import PreferenceRecord
from phi3v_tune.train.run import run_training

datasets = pytest.importorskip("datasets")


def img(seed: int) -> Image.Image:
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (40, 60, 3), dtype=np.uint8))


def write_lines(path: Path, lines: list) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


@pytest.fixture
def pair_file(tmp_path) -> Path:
    img(1).save(tmp_path / "a.png")
    img(2).save(tmp_path / "b.png")
    return write_lines(
        tmp_path / "pairs.jsonl",
        [
            {
                "id": "p1",
                "conversations": [
                    {"images": ["a.png"], "user": "What is on the table?", "chosen": "A mug.", "rejected": "A laptop."}
                ],
            },
            {
                "id": "p2",
                "conversations": [
                    {"image": "a.png", "user": "Describe it.", "assistant": "A table."},
                    {"images": ["b.png"], "user": "And this one?", "chosen": "A chair.", "rejected": "A chair, red."},
                ],
            },
        ],
    )


def test_the_jsonl_pair_is_the_last_turn_and_earlier_turns_are_context(pair_file):
    records, problems = load_records(str(pair_file))
    assert problems == [] and [r.is_pair for r in records] == [True, True]
    pair = PreferenceRecord.of(records[1])
    assert (pair.id, pair.chosen, pair.rejected) == ("p2", "A chair.", "A chair, red.")
    assert [t.assistant for t in pair.prompt.turns] == ["A table.", ""]  # the earlier answer stays as context
    assert not pair.prompt.is_pair and pair.answered().turns[-1].assistant == "A chair."
    assert [Path(str(i)).name for i in pair.prompt.images] == ["a.png", "b.png"]
    report = validate_path(str(pair_file), objective=None)  # what `validate` does by default: checked as pairs
    assert report.ok and report.num_pairs == 2 and report.format().startswith(f"{pair_file}: 2 preference pairs")
    with pytest.raises(ValueError, match=r"pairs.jsonl:1 id=p1: not a preference pair"):
        PreferenceRecord.of(records[0].__class__(**{**records[0].__dict__, "turns": pair.prompt.turns[:1]}))


def test_bad_pairs_are_reported_with_file_line_id_and_field(tmp_path):
    img(1).save(tmp_path / "a.png")
    data = write_lines(
        tmp_path / "bad.jsonl",
        [
            {"id": "ok", "conversations": [{"image": "a.png", "user": "Q?", "chosen": "yes", "rejected": "no"}]},
            {"id": "no-rejected", "conversations": [{"user": "Q?", "chosen": "yes"}]},
            {"id": "empty", "conversations": [{"user": "Q?", "chosen": " ", "rejected": "no"}]},
            {"id": "same", "conversations": [{"user": "Q?", "chosen": "Yes.", "rejected": " Yes. "}]},
            {"id": "both", "conversations": [{"user": "Q?", "assistant": "a", "chosen": "b", "rejected": "c"}]},
            {"id": "early", "conversations": [{"user": "Q?", "chosen": "b", "rejected": "c"}, {"user": "R?", "assistant": "d"}]},
            {"id": "gone", "conversations": [{"image": "missing.png", "user": "Q?", "chosen": "b", "rejected": "c"}]},
            {"id": "typed", "conversations": [{"user": "Q?", "chosen": ["b"], "rejected": "c"}]},
            {"id": "plain", "conversations": [{"user": "Q?", "assistant": "d"}]},
            {"id": "ok", "conversations": [{"user": "Q?", "chosen": "b", "rejected": "c"}]},
        ],
    )  # fmt: skip
    report = validate_path(str(data), objective="dpo")
    found = {(p.origin.rsplit(":", 1)[1], p.id, p.field): p.message for p in report.problems}
    assert found[("2", "no-rejected", "conversations[0].rejected")].startswith("missing (a turn with 'chosen' needs")
    assert found[("3", "empty", "conversations[0].chosen")] == "empty answer (expected non-empty text)"
    assert "the same text as 'chosen'" in found[("4", "same", "conversations[0].rejected")]
    assert "instead of 'assistant'" in found[("5", "both", "conversations[0].assistant")]
    assert "only the last turn may carry chosen/rejected" in found[("6", "early", "conversations[0].chosen")]
    assert found[("7", "gone", "conversations[0].image")].startswith("not found: ")  # image rules as for SFT
    assert found[("8", "typed", "conversations[0].chosen")] == "expected a string, got array"
    assert "not a preference pair" in found[("9", "plain", "conversations[0].assistant")]
    assert "duplicate id" in found[("10", "ok", "id")]
    assert len(report.problems) == 9
    # the command: --for dpo names them all and fails; auto-detection (the default) checks the same
    assert cli(["validate", str(data), "--for", "dpo"]) == 1
    assert cli(["validate", str(data)]) == 1


def test_validate_tells_sft_and_preference_data_apart(pair_file, tmp_path, capsys):
    sft = write_lines(tmp_path / "sft.jsonl", [{"id": "s", "conversations": [{"user": "Q?", "assistant": "A."}]}])
    assert cli(["validate", str(pair_file)]) == 0 and cli(["validate", str(sft)]) == 0
    assert "2 preference pairs" in capsys.readouterr().out
    assert cli(["validate", str(sft), "--for", "dpo"]) == 1
    assert "not a preference pair" in capsys.readouterr().out
    assert cli(["validate", str(pair_file), "--for", "eval"]) == 1
    assert "train on them with --objective dpo" in capsys.readouterr().out


def rlaif_v_table(folder: Path) -> Path:
    datasets.Dataset.from_dict(
        {
            "ds_name": ["vqa", "vqa"],
            "image": [img(1), img(2)],
            "question": ["What is shown?", "How many cups?"],
            "chosen": ["A cat on a mat.", "Two."],
            "rejected": ["A dog on a mat.", "Three cups and a plate."],
            "origin_dataset": ["x", "x"],
        },
        features=datasets.Features(
            {
                "ds_name": datasets.Value("string"),
                "image": datasets.Image(),
                **{k: datasets.Value("string") for k in ("question", "chosen", "rejected", "origin_dataset")},
            }
        ),
    ).save_to_disk(str(folder))
    return folder


def trl_table(folder: Path, messages: bool) -> Path:
    """TRL's vision preference schema; prompt and answers as strings or as chat messages (the second row: an earlier
    turn, one image placeholder per user message, the second after the text)."""
    if messages:

        def part(text=None):  # arrow stores one struct type for both parts
            return {"type": "text" if text is not None else "image", "text": text}

        prompt = [
            [{"role": "user", "content": [part(), part("What is shown?")]}],
            [
                {"role": "user", "content": [part(), part("Describe it.")]},
                {"role": "assistant", "content": [part("A table.")]},
                {"role": "user", "content": [part("And in "), part(), part("?")]},
            ],
        ]
        chosen = [
            [{"role": "assistant", "content": [part("A cat.")]}],
            [{"role": "assistant", "content": [part("A chair.")]}],
        ]
        rejected = [
            [{"role": "assistant", "content": [part("A dog.")]}],
            [{"role": "assistant", "content": [part("A bed.")]}],
        ]
    else:
        prompt, chosen, rejected = ["What is shown?", "Which is bigger?"], ["A cat.", "The first."], ["A dog.", "Both."]
    images = [[img(1)], [img(2), img(3)]]
    datasets.Dataset.from_dict(
        {"images": images, "prompt": prompt, "chosen": chosen, "rejected": rejected}
    ).cast_column("images", datasets.Sequence(datasets.Image())).save_to_disk(str(folder))
    return folder  # fmt: skip


def test_rlaif_v_and_trl_tables_read_as_pairs(tmp_path):
    records, problems = load_records(str(rlaif_v_table(tmp_path / "rlaif")))
    assert problems == [] and len(records) == 2 and all(r.is_pair for r in records)
    pair = PreferenceRecord.of(records[1])
    assert (pair.prompt.turns[0].user, pair.chosen, pair.rejected) == (
        "How many cups?",
        "Two.",
        "Three cups and a plate.",
    )
    assert len(pair.prompt.images) == 1 and records[0].source == "vqa" and pair.id == "train-0000000001"

    records, problems = load_records(str(trl_table(tmp_path / "trl-strings", messages=False)))
    assert problems == [] and [len(r.images) for r in records] == [1, 2]
    assert [(t.user, t.chosen, t.rejected) for t in records[1].turns] == [("Which is bigger?", "The first.", "Both.")]

    records, problems = load_records(str(trl_table(tmp_path / "trl-messages", messages=True)))
    assert problems == []
    first, second = records
    assert (first.turns[0].user, first.turns[0].chosen, first.turns[0].rejected) == (
        "What is shown?",
        "A cat.",
        "A dog.",
    )
    assert [(t.user, t.assistant, len(t.images)) for t in second.turns] == [
        ("<|image_1|>Describe it.", "A table.", 1),  # a placeholder after the text in any message: tags everywhere
        ("And in <|image_2|>?", "", 1),  # each at its place, numbered across the conversation
    ]
    assert second.turns[-1].chosen == "A chair." and validate_path(str(tmp_path / "trl-messages"), objective="dpo").ok


def test_bad_trl_rows_are_located(tmp_path):
    folder = tmp_path / "trl-bad"
    datasets.Dataset.from_dict(
        {
            "images": [[img(1)], [img(2)], []],
            "prompt": [
                [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q?"}],
                [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."}],
                [{"role": "user", "content": "Q?"}],
            ],
            "chosen": [[{"role": "assistant", "content": "a"}], [{"role": "assistant", "content": "a"}],
                       [{"role": "user", "content": "a"}]],
            "rejected": [[{"role": "assistant", "content": "b"}]] * 3,
        }
    ).save_to_disk(str(folder))  # fmt: skip
    _, problems = load_records(str(folder))
    found = {(p.origin.rsplit("[", 1)[1], p.field): p.message for p in problems}
    assert "system messages are not supported" in found[("row 0]", "prompt[0].role")]
    assert found[("row 1]", "prompt")] == "expected the last message to be the user's question"
    assert found[("row 2]", "chosen[0].role")] == "expected 'assistant', got 'user'"


def test_problems_of_table_answers_name_the_tables_columns(tmp_path):
    folder = tmp_path / "rlaif"
    datasets.Dataset.from_dict(
        {"image": [img(1), img(2)], "question": ["Q?", "Q?"], "chosen": ["Same.", " "], "rejected": ["Same.", "b"]}
    ).save_to_disk(str(folder))
    records, problems = load_records(str(folder))
    found = {(p.origin.rsplit("[", 1)[1], p.field): p.message for p in validate_records(records, problems,
                                                                                          objective="dpo")}  # fmt: skip
    assert found == {
        (
            "row 0]",
            "rejected",
        ): "the same text as 'chosen' (expected two different answers: there is nothing to prefer)",
        ("row 1]", "chosen"): "empty answer (expected non-empty text)",
    }


def test_an_sft_run_on_pairs_and_a_dpo_run_on_conversations_say_what_to_pass(pair_file, tmp_path):
    sft = write_lines(tmp_path / "sft.jsonl", [{"id": "s", "conversations": [{"user": "Q?", "assistant": "A."}]}])
    common = dict(model="tiny", num_crops=1, max_steps=1, cpu=True, progress=False, report_to="none", num_workers=0)
    with pytest.raises(DataError) as err:
        run_training(TrainConfig(data=str(pair_file), output_dir=str(tmp_path / "a"), **common))
    assert f"{pair_file}: preference pairs" in str(err.value) and "with --objective dpo" in str(err.value)
    with pytest.raises(DataError) as err:
        run_training(TrainConfig(data=str(sft), output_dir=str(tmp_path / "b"), objective="dpo", **common))
    assert f"{sft}: conversations with 'assistant' answers" in str(err.value) and "--objective sft" in str(err.value)
    with pytest.raises(DataError) as err:  # evaluation data too
        run_training(
            TrainConfig(
                data=str(pair_file), eval_data=str(sft), output_dir=str(tmp_path / "c"), objective="dpo", **common
            )
        )
    assert f"{sft}: conversations with 'assistant' answers" in str(err.value)


def test_preference_settings_are_checked_before_anything_loads(tmp_path):
    with pytest.raises(ValueError, match="--dpo-label-smoothing applies to --dpo-loss sigmoid only"):
        TrainConfig(objective="dpo", dpo_loss="ipo", dpo_label_smoothing=0.1).validate()
    with pytest.raises(ValueError, match="--dpo-beta applies to --objective dpo"):
        TrainConfig(dpo_beta=0.5).validate()
    with pytest.raises(ValueError, match="--dpo-beta must be > 0"):
        TrainConfig(objective="dpo", dpo_beta=0).validate()
    with pytest.raises(ValueError, match=r"--dpo-label-smoothing must be in \[0, 0.5\)"):
        TrainConfig(objective="dpo", dpo_label_smoothing=0.5).validate()
    with pytest.raises(ValueError, match="--dpo-sft-weight must be >= 0"):
        TrainConfig(objective="dpo", dpo_sft_weight=-1).validate()
    with pytest.raises(ValueError, match="--objective must be one of sft, dpo"):
        TrainConfig(objective="orpo").validate()
    with pytest.raises(ValueError, match="under --fsdp needs --dpo-precompute-reference"):
        TrainConfig(objective="dpo", method="full", fsdp=True).validate()
    TrainConfig(objective="dpo", method="full", fsdp=True, dpo_precompute_reference=True).validate()
    TrainConfig(objective="dpo", method="lora", fsdp=True).validate()  # adapters disabled: no copy
    # a saved SFT run's settings (every field, the dpo ones at their defaults) resolve again as --config
    TrainConfig(model="tiny").save(tmp_path / "train_config.yaml")
    args = build_parser().parse_args(["train", "--config", str(tmp_path / "train_config.yaml")])
    assert resolve(args).objective == "sft"
    dpo = resolve(build_parser().parse_args(["train", "--task", "dpo", "--model", "tiny", "--dpo-beta", "0.2"]))
    assert (dpo.objective, dpo.method, dpo.dpo_beta, dpo.batch_size_per_device) == ("dpo", "lora", 0.2, 2)
