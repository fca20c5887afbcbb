"""Run by test_distributed under torchrun (2 gloo ranks): the tiny model sharded with FSDP2 as --fsdp / fsdp2.yaml
shard it (each decoder and CLIP layer, then the root), one evaluation forward per rank, where rank 1's batch has no
image, then greedy generation of a few tokens. Prints one JSON line per rank: the loss, how often the vision tower
ran in the forward, and how often CLIP's first layer ran while generating (as OUT/rank-N.json: two ranks printing
at once can interleave their lines)."""

from __future__ import annotations

import json
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from transformers.models.clip.modeling_clip import CLIPEncoderLayer
from transformers.models.phi3.modeling_phi3 import Phi3DecoderLayer

from phi3v_tune import Phi3VForCausalLM, Phi3VProcessor
from phi3v_tune.data import load_records
from phi3v_tune.data.collate import Collator
from phi3v_tune.data.examples import build_example
from phi3v_tune.evaluate.generate import generate_answers


def batch_for(record, processor) -> dict[str, torch.Tensor]:
    batch = Collator(processor.tokenizer.pad_token_id)([build_example(record, processor)])
    return {k: v for k, v in batch.items() if k not in ("ids", "num_tokens")}


def main(model_dir: str, data: str, out: str) -> None:
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank = dist.get_rank()
    model = Phi3VForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    processor = Phi3VProcessor.from_pretrained(model_dir, num_crops=1)
    records = load_records(data)[0]
    batch = batch_for(records[rank], processor)  # record 0 has an image, record 1 none
    with torch.no_grad():
        alone = float(model(**batch).loss)
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for module in model.modules():
        if isinstance(module, (CLIPEncoderLayer, Phi3DecoderLayer)):
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    calls: list[int] = []
    model.model.vision_embed_tokens.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        sharded = float(model(**batch).loss)
    forward_calls = len(calls)
    clip_layer: list[int] = []
    layers = model.model.vision_embed_tokens.img_processor.vision_model.encoder.layers
    layers[0].register_forward_hook(lambda *a: clip_layer.append(1))
    answer = generate_answers(model, processor, [records[rank]], max_new_tokens=5, progress=False)
    row = {"rank": rank, "alone": alone, "sharded": sharded, "vision_calls": forward_calls}
    result = {**row, "generation_clip_runs": len(clip_layer), "answer": answer[0]}
    (Path(out) / f"rank-{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3])
