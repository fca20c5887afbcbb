"""The package's shape, enforced: layers import only downwards, no import circles, the training orchestrator is
imported only by the command line, the demo and the benchmark, inference needs no training code, building the
command line needs no torch, and every flag shared by several commands is one definition."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "phi3v_tune"

#: Lowest first. A module may import its own layer and those before it (README "Code map").
LAYERS = ("processing", "model", "data", "evaluate", "config", "train", "perf", "cli")
#: Package-level modules: the public facade (`phi3v_tune/__init__.py`) and `python -m phi3v_tune`.
FACADE = ("phi3v_tune", "phi3v_tune.__main__")


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> list[tuple[str, bool]]:
    """(imported phi3v_tune module, at module level?) for every import in `path`; imports under
    `if TYPE_CHECKING:` are left out (they never run)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    type_only: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            type_only |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    found = []
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            # `from . import x` / `from .pkg import mod` import modules; `from .mod import name` imports `mod`
            targets = [f"{stem}.{a.name}" if (SRC / f"{stem}.{a.name}".replace(".", "/")).exists()
                       or (SRC / (f"{stem}.{a.name}".replace(".", "/") + ".py")).exists() else stem
                       for a in node.names]  # fmt: skip
        else:
            continue
        found += [(t, node.col_offset == 0) for t in targets if t == "phi3v_tune" or t.startswith("phi3v_tune.")]
    return found


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def layer(name: str) -> int | None:
    parts = name.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 and parts[1] in LAYERS else None


def upward_imports() -> list[str]:
    found = []
    for name, path in modules().items():
        own = layer(name)
        if own is None:
            continue
        for target, _ in imports_of(path):
            other = layer(target)
            if other is not None and other > own:
                found.append(f"{name} imports {target} ({LAYERS[own]} < {LAYERS[other]})")
    return found


def import_circles() -> list[list[str]]:
    """Between modules, through imports at module level or inside functions alike (a package's __init__ counts as
    the package; importing a package's own submodule from its __init__ is not a circle)."""
    graph = {name: {t for t, _ in imports_of(path) if t != name} for name, path in modules().items()}
    for name in graph:
        graph[name] = {t for t in graph[name] if t in graph and not t.startswith(name + ".")}
    circles: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                circles.append(path[path.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return circles


def test_every_module_belongs_to_a_layer():
    strays = [m for m in modules() if layer(m) is None and m not in FACADE]
    assert not strays, f"modules outside the layers {LAYERS}: {strays}"


def test_no_module_imports_a_higher_layer():
    problems = upward_imports()
    assert not problems, "\n".join(problems)


def test_no_import_circles():
    circles = import_circles()
    assert not circles, "import circles:\n" + "\n".join(" -> ".join(c) for c in circles)


def test_only_the_command_line_the_demo_and_the_benchmark_import_the_training_run():
    allowed = {"phi3v_tune.cli.train", "phi3v_tune.train.demo", "phi3v_tune.perf.bench"}
    users = {name for name, path in modules().items() if "phi3v_tune.train.run" in {t for t, _ in imports_of(path)}}
    assert users <= allowed, users - allowed


def test_the_checks_catch_an_upward_import_and_a_circle():
    """Two probe modules in the tree (removed afterwards): model/ importing train/, and two modules importing each
    other (one of them inside a function)."""
    probes = {
        PACKAGE / "model" / "_probe_a.py": "from ..train.run import run_training\nfrom . import _probe_b\n",
        PACKAGE / "model" / "_probe_b.py": "def f():\n    from . import _probe_a\n",
    }
    try:
        for path, text in probes.items():
            path.write_text(text)
        assert "phi3v_tune.model._probe_a imports phi3v_tune.train.run (model < train)" in upward_imports()
        assert ["phi3v_tune.model._probe_a", "phi3v_tune.model._probe_b", "phi3v_tune.model._probe_a"] in (
            import_circles()
        )
    finally:
        for path in probes:
            path.unlink(missing_ok=True)
    assert not any("_probe" in m for m in modules())


# --------------------------------------------------------------------------------------------------------------------
def run_python(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=SRC.parent, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_inference_loads_models_without_training_code(tmp_path):
    """`predict` and `eval` on a saved model (and a LoRA adapter) import nothing from train/: model loading lives in
    model/, settings in config.py."""
    code = f"""
import sys
from PIL import Image
from phi3v_tune.model.tiny import save_tiny_checkpoint
save_tiny_checkpoint({str(tmp_path / "m")!r}, num_crops=1)
Image.new("RGB", (40, 30), "red").save({str(tmp_path / "a.png")!r})
before = {{m for m in sys.modules if m.startswith("phi3v_tune.train")}}
from phi3v_tune.cli import main
code = main(["predict", "--model", {str(tmp_path / "m")!r}, "--image", {str(tmp_path / "a.png")!r},
             "--prompt", "What colour?", "--max-new-tokens", "2"])
assert code == 0, code
print(sorted({{m for m in sys.modules if m.startswith("phi3v_tune.train")}} - before))
"""
    assert run_python(code).splitlines()[-1] == "[]"


def test_building_the_command_line_imports_no_torch():
    """`phi3v-tune --help` and `phi3v-tune <command> --help` do not wait for torch and transformers: the console
    script (named `phi3v-tune`) builds every parser and renders every help without importing them."""
    code = (
        "import sys\n"
        "sys.modules['__main__'].__file__ = '/venv/bin/phi3v-tune'\n"
        "from phi3v_tune.cli import build_parser\n"
        "parser = build_parser()\n"
        "parser.format_help()\n"
        "for command in parser._subparsers._group_actions[0].choices.values():\n"
        "    command.format_help()\n"
        "print(sorted(m for m in ('torch', 'transformers', 'numpy', 'datasets', 'av') if m in sys.modules))"
    )
    assert run_python(code) == "[]"


# --------------------------------------------------------------------------------------------------------------------
def subcommands() -> dict:
    from phi3v_tune.cli import build_parser

    return build_parser()._subparsers._group_actions[0].choices


def test_a_flag_shared_by_commands_is_one_definition():
    """Every flag spelled the same in several commands has the same type, choices and help text (the part before
    the stated default, which a command may set differently: eval/predict read --split test, --video-frames from
    the model)."""
    seen: dict[str, tuple[str, object]] = {}
    differing = []
    for command, parser in subcommands().items():
        for action in parser._actions:
            for spelling in action.option_strings:
                if not spelling.startswith("--") or spelling == "--help":
                    continue
                core = (action.help or "").split(" (default")[0].removesuffix(" Required.")
                key = (getattr(action.type, "__name__", action.type), tuple(action.choices or ()), core)
                if spelling in seen and seen[spelling][1] != key:
                    differing.append(f"{spelling}: {seen[spelling][0]} {seen[spelling][1]} vs {command} {key}")
                seen.setdefault(spelling, (command, key))
    allowed = {"--output", "--data", "--model", "--base", "--out", "--epochs", "--output-dir", "--seed", "--dtype",
               "--split"}  # fmt: skip
    # train's --data/--model/--output-dir/--epochs/--seed are settings; other commands' flags of those names are not
    # training settings (a file to evaluate, a model to load, the demo's folder): their help says what they are.
    problems = [d for d in differing if d.split(":")[0] not in allowed]
    assert not problems, "\n".join(problems)


def test_shared_data_flags_of_every_command_come_from_the_training_settings():
    """--image-dir, --split, --multi-turn, --video-frames, --num-crops, --metric, --max-image-pixels, --questions,
    --batch-size / --max-new-tokens of eval and predict: each is the `TrainConfig` field's flag (its help text)."""
    from phi3v_tune.config import FIELDS

    same_as = {"questions": "eval_questions"}
    checked = set()
    for command, parser in subcommands().items():
        if command == "train":
            continue
        for action in parser._actions:
            name = same_as.get(action.dest, action.dest)
            if name not in FIELDS or name in ("data", "model", "output_dir", "epochs", "seed") or not action.help:
                continue  # not a setting, or a different thing of the same name (see above)
            assert action.help.startswith(FIELDS[name].metadata["help"]), (command, action.option_strings)
            checked.add((command, name))
    assert {("eval", "split"), ("eval", "metric"), ("eval", "eval_questions"), ("eval", "eval_batch_size"),
            ("predict", "video_frames"), ("validate", "multi_turn"), ("validate", "max_image_pixels"),
            ("convert", "video_frames"), ("eval", "num_crops"), ("predict", "image_dir")} <= checked  # fmt: skip
