"""--sdpa-backend: flash (the default) turns PyTorch's cuDNN attention off on a GPU; cudnn turns it back on; the
CPU run leaves the switch alone."""

from __future__ import annotations

import unittest.mock

import pytest
import torch

from phi3v_tune.config import TrainConfig
from phi3v_tune.train.run import select_sdpa_backend


@pytest.fixture(autouse=True)
def restore():
    before = torch.backends.cuda.cudnn_sdp_enabled()
    yield
    torch.backends.cuda.enable_cudnn_sdp(before)


def select(cfg: TrainConfig) -> None:
    """What a run does with --sdpa-backend (on a CUDA GPU unless --cpu, as `Runtime.on_cuda` says)."""
    select_sdpa_backend(not cfg.cpu and torch.cuda.is_available(), cfg.sdpa_backend)


def test_flash_by_default_disables_cudnn_attention_and_cudnn_restores_it():
    assert TrainConfig().sdpa_backend == "flash"
    with unittest.mock.patch("torch.cuda.is_available", return_value=True):
        torch.backends.cuda.enable_cudnn_sdp(True)
        select(TrainConfig())
        assert torch.backends.cuda.cudnn_sdp_enabled() is False
        select(TrainConfig(sdpa_backend="cudnn"))
        assert torch.backends.cuda.cudnn_sdp_enabled() is True
        torch.backends.cuda.enable_cudnn_sdp(True)
        select(TrainConfig(cpu=True))  # a CPU run changes nothing
        assert torch.backends.cuda.cudnn_sdp_enabled() is True


def test_unknown_backend_is_refused_by_the_cli():
    from phi3v_tune.cli import main

    with pytest.raises(SystemExit):
        main(["train", "--sdpa-backend", "magic", "--data", "x.jsonl"])
