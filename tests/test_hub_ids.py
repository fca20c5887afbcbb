"""Hub ids as --model / --base: resolved once to a local snapshot (from a pre-filled cache here: there is no network),
then train, eval, predict, export and the Python API load everything from it; without network or cache one clear
error, at once."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from launch import cpu_env
from safetensors.torch import load_file

from phi3v_tune.cli import main as cli
from phi3v_tune.data.synthetic import demo_split, write_jsonl

REPO_ID = "phi3v-test/tiny-vision"
SHA = "0123456789abcdef0123456789abcdef01234567"


def fill_cache(hf_home: Path, model_folder: Path, repo_id: str = REPO_ID, sha: str = SHA) -> Path:
    """The hub cache layout a download leaves: hub/models--org--name/snapshots/<commit>/... and refs/main."""
    repo = hf_home / "hub" / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / sha
    shutil.copytree(model_folder, snapshot)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(sha)
    return snapshot


def closed_port() -> int:
    """A local port nobody listens on: connecting is refused at once (a host without network, deterministically)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    from phi3v_tune.model.tiny import save_tiny_checkpoint

    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "model", seed=4, num_crops=1)


@pytest.fixture
def hub(tmp_path, tiny_folder, monkeypatch) -> Path:
    """A hub cache under a temporary HF_HOME holding REPO_ID; the hub itself unreachable (a refused connection)."""
    import huggingface_hub.constants as constants

    hf_home = tmp_path / "hf_home"
    snapshot = fill_cache(hf_home, tiny_folder)
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hf_home / "hub"))  # read at import: as a new process reads it
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    return snapshot


def test_hub_id_from_the_cache_trains_evaluates_predicts_and_exports(hub, tmp_path, capsys, monkeypatch):
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # HF_HUB_OFFLINE=1: the cache only, no request at all
    train, _ = demo_split(3, 1, seed=5, tasks=("colour", "shape"), as_png=True)
    data = write_jsonl(train, tmp_path / "data")
    out = tmp_path / "run"
    flags = ["--num-crops", "1", "--num-workers", "0", "--report-to", "none", "--no-progress", "--cpu"]
    code = cli(["train", "--model", REPO_ID, "--data", str(data), "--output-dir", str(out), "--method", "lora",
                "--lora-rank", "4", "--max-steps", "2", "--batch-size", "1", "--warmup-steps", "0", *flags])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    final = out / "final"
    # the adapter records its base as hub id and commit (valid on any machine), not this machine's cache path
    assert (final / "base_model.txt").read_text() == f"{REPO_ID}@{SHA}"
    adapter_config = json.loads((final / "adapter_config.json").read_text())
    assert (adapter_config["base_model_name_or_path"], adapter_config["revision"]) == (REPO_ID, SHA)
    assert not (out / "base-tiny").exists()  # the hub snapshot was the base, not a generated model
    capsys.readouterr()

    predictions = tmp_path / "p.jsonl"
    for model in (REPO_ID, str(final)):  # the hub model itself, and the adapter on the base it records
        code = cli(["eval", "--model", model, "--data", str(data), "--metric", "accuracy", "--split", "train",
                    "--max-new-tokens", "3", "--output", str(predictions)])  # fmt: skip
        assert code == 0, capsys.readouterr().err
        summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert summary["samples"] == 6 and 0.0 <= summary["accuracy"] <= 1.0
    image = sorted((data.parent / "images").glob("*.png"))[0]
    code = cli(["predict", "--model", REPO_ID, "--image", str(image), "--prompt", "Which colour?",
                "--max-new-tokens", "3"])  # fmt: skip
    assert code == 0, capsys.readouterr().err

    code = cli(["export", "--model", str(out), "--out", str(tmp_path / "exported"), "--dtype", "float32"])
    assert code == 0, capsys.readouterr().err
    card = (tmp_path / "exported" / "README.md").read_text()
    assert f"base_model: {REPO_ID}" in card


def test_python_api_loads_a_hub_id_and_its_revision(hub, tiny_folder):
    from phi3v_tune import Phi3VForCausalLM, Phi3VImageProcessor, Phi3VProcessor

    model = Phi3VForCausalLM.from_pretrained(REPO_ID)
    saved = load_file(tiny_folder / "model.safetensors")
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in saved.items())
    assert Path(model.name_or_path) == hub  # loaded from the snapshot folder
    pinned = Phi3VForCausalLM.from_pretrained(REPO_ID, revision=SHA)
    assert torch.equal(pinned.lm_head.weight, model.lm_head.weight)
    processor = Phi3VProcessor.from_pretrained(REPO_ID)
    assert processor.num_crops == 1 and processor.tokenizer.convert_tokens_to_ids("<|end|>") > 0
    assert Phi3VImageProcessor.from_pretrained(REPO_ID).num_crops == 1
    with pytest.raises(ValueError, match=f"{REPO_ID}: no such local folder.*at revision v9"):
        Phi3VProcessor.from_pretrained(REPO_ID, revision="v9")  # a revision the cache does not hold


def test_no_network_and_no_cache_is_one_clear_error_at_once(tmp_path, monkeypatch):
    """A new process (its HF_HOME and HF_ENDPOINT as a user sets them): the message names the id, the reason and the
    cache it looked in, within seconds (the resolution; the process start itself is not timed)."""
    env = {**cpu_env(), "HF_HOME": str(tmp_path / "empty_home"), "HF_ENDPOINT": f"http://127.0.0.1:{closed_port()}"}
    env.pop("HF_HUB_OFFLINE", None)
    env.pop("HF_HUB_CACHE", None)
    code = (
        "import time, sys\n"
        "from phi3v_tune.cli import main\n"
        "t = time.time()\n"
        "rc = main(['predict', '--model', 'phi3v-test/absent', '--prompt', 'hi'])\n"
        "print(f'seconds {time.time() - t:.2f}')\n"
        "sys.exit(rc)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    message = errors[0]
    assert message.startswith("error: phi3v-test/absent: no such local folder, and it could not be loaded from the")
    assert "the hub could not be reached" in message and str(tmp_path / "empty_home" / "hub") in message
    assert float(proc.stdout.split("seconds")[-1]) < 10


def test_a_hub_that_never_answers_is_given_up_within_seconds(tmp_path, tiny_folder, monkeypatch):
    """A host that accepts the connection but never answers (a proxy or firewall that swallows requests): the short
    probe gives up, and the cached snapshot is used; without one, the clear error."""
    import huggingface_hub.constants as constants

    from phi3v_tune.processing.hub import resolve_model_source

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # connections complete in the kernel's backlog; nothing ever reads or answers
    try:
        monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{silent.getsockname()[1]}")
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "1")
        hf_home = tmp_path / "hf"
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hf_home / "hub"))
        start = time.time()
        with pytest.raises(ValueError, match="phi3v-test/absent: no such local folder.*could not be reached"):
            resolve_model_source("phi3v-test/absent")
        assert time.time() - start < 10
        snapshot = fill_cache(hf_home, tiny_folder)
        start = time.time()
        assert resolve_model_source(REPO_ID) == snapshot
        assert time.time() - start < 10
    finally:
        silent.close()


def test_revision_belongs_to_a_hub_id(tmp_path):
    from phi3v_tune.config import TrainConfig

    with pytest.raises(ValueError, match="--revision v2 applies to a hub id as --model, not to tiny"):
        TrainConfig(data="x.jsonl", model="tiny", revision="v2").validate()
    TrainConfig(data="x.jsonl", model=REPO_ID, revision="v2").validate()  # nothing is downloaded by validate


@pytest.mark.parametrize(
    "error, message",
    [
        ("RepositoryNotFoundError", "phi3v-test/x: no such local folder, and no such model on the Hugging Face hub"),
        ("RevisionNotFoundError", "phi3v-test/x: the hub has no revision 'v1' of it"),
        ("GatedRepoError", "phi3v-test/x: a gated model on the Hugging Face hub; accept its terms"),
    ],
)
def test_what_the_hub_answers_is_said_plainly(monkeypatch, error, message):
    from types import SimpleNamespace

    import huggingface_hub.constants as constants
    import huggingface_hub.errors as errors
    from huggingface_hub import HfApi

    from phi3v_tune.processing.hub import resolve_model_source

    def answer(self, *args, **kwargs):
        raise getattr(errors, error)("404 Client Error", response=SimpleNamespace(headers={}, request=None))

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(HfApi, "repo_info", answer)
    with pytest.raises(ValueError, match=message):
        resolve_model_source("phi3v-test/x", revision="v1")


def test_a_reachable_hub_gives_the_whole_snapshot_at_the_revision(monkeypatch, tmp_path):
    import huggingface_hub.constants as constants
    from huggingface_hub import HfApi

    from phi3v_tune.processing import hub
    from phi3v_tune.processing.hub import IGNORED_IN_SNAPSHOTS, PROBE_TIMEOUT_S, resolve_model_source

    asked: dict = {}
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_ETAG_TIMEOUT", raising=False)
    monkeypatch.setattr(HfApi, "repo_info", lambda self, name, **kw: asked.setdefault("probe", (name, kw)))

    def download(name, **kwargs):
        asked["download"] = (name, kwargs)
        return str(tmp_path)

    monkeypatch.setattr(hub, "snapshot_download", download)
    assert resolve_model_source("phi3v-test/x", "v1") == tmp_path
    assert asked["probe"] == ("phi3v-test/x", {"revision": "v1", "timeout": PROBE_TIMEOUT_S})
    name, kwargs = asked["download"]
    assert name == "phi3v-test/x" and kwargs["revision"] == "v1" and not kwargs.get("local_files_only")
    assert kwargs["ignore_patterns"] == IGNORED_IN_SNAPSHOTS  # other weight formats are never fetched
    with pytest.raises(ValueError, match="is a local folder: --revision applies to hub ids only"):
        resolve_model_source(str(tmp_path), "v1")
