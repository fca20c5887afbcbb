"""Checkpoint compatibility: published key names and shapes, config round trip, sharded save/load."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from phi3v_tune import Phi3VConfig, Phi3VForCausalLM
from phi3v_tune.model.tiny import tiny_model


def published_config(published_dir) -> dict:
    return json.loads((published_dir / "config.json").read_text())


def test_published_config_reads_unchanged(published_dir, tmp_path):
    raw = published_config(published_dir)
    cfg = Phi3VConfig.from_dict(copy.deepcopy(raw))
    assert cfg.model_type == "phi3_v"
    assert cfg.rope_parameters["rope_type"] == "longrope"  # transformers' name for "su"
    assert cfg.rope_parameters["short_factor"] == raw["rope_scaling"]["short_factor"]
    assert cfg.rope_parameters["long_factor"] == raw["rope_scaling"]["long_factor"]
    assert cfg.original_max_position_embeddings == 4096 and cfg.max_position_embeddings == 131072
    assert cfg.img_processor == raw["img_processor"] and cfg.embd_layer == raw["embd_layer"]
    assert cfg.vision_config.hidden_size == 1024 and cfg.vision_config.num_hidden_layers == 24
    assert cfg.num_vision_layers_used == 23  # hidden_states[-2]
    cfg.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    # the publisher's field names and values come back out
    assert saved["model_type"] == "phi3_v"
    assert saved["rope_scaling"] == {**raw["rope_scaling"]}
    assert saved["rope_theta"] == raw["rope_theta"]
    for key in (
        "hidden_size",
        "num_hidden_layers",
        "vocab_size",
        "eos_token_id",
        "bos_token_id",
        "pad_token_id",
        "img_processor",
        "embd_layer",
        "original_max_position_embeddings",
        "sliding_window",
        "tie_word_embeddings",
        "rms_norm_eps",
        "intermediate_size",
        "num_key_value_heads",
    ):
        assert saved[key] == raw[key], key
    # no other field either: the published tower stays implicit (no vision_config), as published
    assert set(saved) - set(raw) <= {"dtype", "transformers_version"}, set(saved) - set(raw)
    assert saved["torch_dtype"] == saved["dtype"] == raw["torch_dtype"]  # the publisher's code reads torch_dtype
    again = Phi3VConfig.from_pretrained(tmp_path)
    assert again.to_dict() == {**cfg.to_dict(), "_name_or_path": again.to_dict().get("_name_or_path")}


def test_loading_a_saved_config_does_not_warn_about_torch_dtype(published_dir, tmp_path, capfd):
    """Saved folders keep `torch_dtype` for the publisher's code; reading it (and printing the config) must not make
    transformers 5 warn on every load."""
    from transformers import AutoConfig
    from transformers.utils import logging as hf_logging

    Phi3VConfig.from_dict(published_config(published_dir)).save_pretrained(tmp_path)
    before = hf_logging.get_verbosity()
    hf_logging.set_verbosity_warning()
    try:
        capfd.readouterr()
        loaded = AutoConfig.from_pretrained(tmp_path)
        repr(loaded)
    finally:
        hf_logging.set_verbosity(before)
    assert loaded.dtype == torch.bfloat16
    assert "torch_dtype" not in capfd.readouterr().err


def test_full_size_meta_model_has_exactly_the_published_keys_and_shapes(published_dir):
    index = json.loads((published_dir / "model.safetensors.index.json").read_text())["weight_map"]
    cfg = Phi3VConfig.from_dict(published_config(published_dir))
    with torch.device("meta"):
        model = Phi3VForCausalLM(cfg)
    state = model.state_dict()
    assert set(state) == set(index)
    assert len(state) == 592
    shapes = {
        "model.embed_tokens.weight": (32064, 3072),
        "lm_head.weight": (32064, 3072),
        "model.layers.0.self_attn.qkv_proj.weight": (9216, 3072),
        "model.layers.0.mlp.gate_up_proj.weight": (16384, 3072),
        "model.layers.0.mlp.down_proj.weight": (3072, 8192),
        "model.vision_embed_tokens.img_projection.0.weight": (3072, 4096),
        "model.vision_embed_tokens.img_projection.2.weight": (3072, 3072),
        "model.vision_embed_tokens.glb_GN": (1, 1, 4096),
        "model.vision_embed_tokens.sub_GN": (1, 1, 1, 4096),
        "model.vision_embed_tokens.img_processor.vision_model.embeddings.position_embedding.weight": (577, 1024),
        "model.vision_embed_tokens.img_processor.vision_model.encoder.layers.23.mlp.fc1.weight": (4096, 1024),
    }
    for key, shape in shapes.items():
        assert tuple(state[key].shape) == shape, key
    total = sum(p.numel() for p in model.parameters())
    assert 4.14e9 < total < 4.16e9
    # the unused tail of CLIP is stored but frozen
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert all(".encoder.layers.23." in n or ".post_layernorm." in n for n in frozen) and len(frozen) == 18


def test_save_load_is_bit_exact_sharded_bf16(tiny_tokenizer, tmp_path):
    model = tiny_model(tiny_tokenizer, seed=5).to(torch.bfloat16)
    model.save_pretrained(tmp_path, max_shard_size="200KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) >= 2
    for shard in shards:
        for name, tensor in load_file(tmp_path / shard).items():
            assert tensor.dtype == torch.bfloat16, name
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model_type"] == "phi3_v" and cfg["rope_scaling"]["type"] == "su"
    loaded = Phi3VForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    a, b = model.state_dict(), loaded.state_dict()
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_loading_accepts_the_wte_alias_and_restores_unused_clip_weights(tiny_tokenizer, tmp_path):
    model = tiny_model(tiny_tokenizer, seed=6)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    state["model.vision_embed_tokens.wte.weight"] = state["model.embed_tokens.weight"].clone()
    model.config.save_pretrained(tmp_path)
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    loaded = Phi3VForCausalLM.from_pretrained(tmp_path)
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, state[k]), k
    last = "model.vision_embed_tokens.img_processor.vision_model.encoder.layers.2.mlp.fc1.weight"
    assert torch.equal(loaded.state_dict()[last], state[last])  # unused layer kept untouched
    assert not dict(loaded.named_parameters())[last].requires_grad


def test_missing_weights_are_reported(tiny_tokenizer, tmp_path):
    model = tiny_model(tiny_tokenizer, seed=7)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if "glb_GN" not in k}
    model.config.save_pretrained(tmp_path)
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    _, info = Phi3VForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert info["missing_keys"] == {"model.vision_embed_tokens.glb_GN"} or "model.vision_embed_tokens.glb_GN" in set(
        info["missing_keys"]
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_from_pretrained_with_dtype_and_attention(tiny_tokenizer, tmp_path, dtype):
    tiny_model(tiny_tokenizer, seed=8).save_pretrained(tmp_path)
    model = Phi3VForCausalLM.from_pretrained(tmp_path, dtype=dtype, attn_implementation="eager")
    assert model.dtype == dtype
    assert model.config._attn_implementation == "eager"


def test_loaded_model_computes_what_was_saved(tiny_tokenizer, tiny_processor, tmp_path):
    """Non-persistent buffers (RoPE frequencies) are rebuilt on load: same logits before and after a round trip."""
    import numpy as np
    from PIL import Image

    model = tiny_model(tiny_tokenizer, seed=9)
    model.save_pretrained(tmp_path)
    image = Image.fromarray(np.random.RandomState(0).randint(0, 256, (300, 500, 3), dtype=np.uint8))
    text = tiny_processor.apply_chat_template([{"role": "user", "content": "<|image_1|>\nWhat is shown?"}])
    inputs = tiny_processor(text=text, images=[image])
    for _ in range(2):  # uninitialised memory differs between loads: check more than once
        loaded = Phi3VForCausalLM.from_pretrained(tmp_path)
        with torch.no_grad():
            assert torch.equal(model(**inputs).logits, loaded(**inputs).logits)


def test_auto_classes_load_this_model_without_remote_code(tiny_tokenizer, tiny_processor, published_dir, tmp_path):
    """After `import phi3v_tune`, AutoConfig / AutoModelForCausalLM / AutoModel resolve `phi3_v` to this package
    (the published config's `auto_map` names remote code, which is never fetched or run)."""
    import numpy as np
    from PIL import Image
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    from phi3v_tune.model.modeling import Phi3VModel

    published = AutoConfig.from_pretrained(published_dir)
    assert type(published) is Phi3VConfig and published.num_hidden_layers == 32
    model = tiny_model(tiny_tokenizer, seed=10)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(loaded) is Phi3VForCausalLM
    base = AutoModel.from_pretrained(tmp_path)
    assert type(base) is Phi3VModel
    unused = base.vision_embed_tokens.unused_parameters()
    assert unused and not any(p.requires_grad for p in unused)  # the CLIP tail stays frozen for the base model too
    image = Image.fromarray(np.random.RandomState(1).randint(0, 256, (200, 400, 3), dtype=np.uint8))
    text = tiny_processor.apply_chat_template([{"role": "user", "content": "<|image_1|>\nWhat is shown?"}])
    inputs = tiny_processor(text=text, images=[image])
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, loaded(**inputs).logits)
        # RoPE tables rebuilt after loading the base model too (position 0 alone would match without them)
        assert torch.equal(base(**inputs).last_hidden_state, model.model(**inputs).last_hidden_state)
