"""Modules that the command line reads for its flags and `--help` import without torch, numpy, Pillow or transformers.

Each module is imported in a fresh interpreter. The package's own `__init__` (which registers the model classes with
transformers) is replaced by an empty package there, so that what is measured is the module's import chain: the
module, the `__init__` of its sub-package and everything they import.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

HEAVY = ("torch", "numpy", "PIL", "transformers", "av")

PROBE = """
import importlib, json, sys, types
root = types.ModuleType("phi3v_tune")
root.__path__ = [sys.argv[1]]
sys.modules["phi3v_tune"] = root
module = importlib.import_module(sys.argv[2])
facts = {
    "phi3v_tune.processing.geometry": lambda m: [m.CROP_SIZE, m.num_image_tokens(672, 672), list(m.TRAIN_NUM_CROPS)],
    "phi3v_tune.data.layout": lambda m: [list(m.MULTI_TURN), m.SampleLayout().video_frames],
    "phi3v_tune.data.video": lambda m: [m.DEFAULT_VIDEO_FRAMES, m.frame_indices(20, 8)],
    "phi3v_tune.evaluate.metrics": lambda m: [list(m.METRICS), list(m.QUESTIONS), m.score("accuracy", "Yes.", ["yes"])],
}[sys.argv[2]](module)
print(json.dumps({"loaded": sorted(name for name in json.loads(sys.argv[3]) if name in sys.modules), "facts": facts}))
"""

EXPECTED = {
    "phi3v_tune.processing.geometry": [336, 757, list(range(1, 17))],
    "phi3v_tune.data.layout": [["conversation", "recipe"], 8],
    "phi3v_tune.data.video": [8, [0, 2, 5, 7, 10, 12, 15, 17]],
    "phi3v_tune.evaluate.metrics": [["anls", "accuracy"], ["all", "first"], 1.0],
}


@pytest.mark.parametrize("module", sorted(EXPECTED))
def test_module_imports_nothing_heavy(module):
    package_dir = importlib.util.find_spec("phi3v_tune").submodule_search_locations[0]
    done = subprocess.run(
        [sys.executable, "-c", PROBE, package_dir, module, json.dumps(HEAVY)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["loaded"] == [], f"importing {module} loads {', '.join(result['loaded'])}"
    assert result["facts"] == EXPECTED[module]
