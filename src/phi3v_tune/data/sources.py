"""Read training data into ``Record``s: the conversations jsonl, a ``.json`` list, and ``datasets`` tables.

The conversations format (one JSON object per line)::

    {"id": "abc", "source": "optional", "conversations": [
        {"images": ["a.png", "/abs/b.jpg"], "user": "What differs?", "assistant": "The colour."},
        {"user": "And now?", "assistant": "Nothing."}]}

A turn may name one image with ``"image": "a.png"`` or a video with ``"video": "clip.mp4"``. Preference data (DPO):
the last turn carries ``"chosen"`` and ``"rejected"`` instead of ``"assistant"`` (earlier turns are context)::

    {"id": "p1", "conversations": [{"images": ["a.png"], "user": "What is on the table?",
                                    "chosen": "A red mug.", "rejected": "A red mug and a laptop."}]}
 Relative paths are
looked up in ``image_dir`` when given, else next to the jsonl, then in ``images/`` below it, and must stay inside
that folder. Readers never raise on bad content: each bad line or row becomes one or more ``Problem``s and reading
goes on, so that one run reports everything (see ``validate.validate_records`` for the content checks).

``datasets`` tables (``save_to_disk`` folders, parquet / arrow files, Hub ids) may hold the conversations format, the
the_cauldron schema (``images: [image]``, ``texts: [{user, assistant, source}]``) or the DocVQA schema (``image``,
``query: {"en": str}`` or ``question: str``, ``answers: [str]``); preference pairs in the RLAIF-V schema (``image``,
``question``, ``chosen``, ``rejected``) or TRL's vision preference schema (``images``, ``prompt``, ``chosen``,
``rejected``; prompt and answers as strings or chat message lists).
"""

from __future__ import annotations

import io
import json
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from ..processing.geometry import image_tag
from .schema import DataError, ImageRef, Problem, Record, Turn

PathLike = str | os.PathLike

_TURN_KEYS = ("user", "assistant", "images", "image", "video", "chosen", "rejected")
#: The two answers of a preference turn (the last turn of a DPO sample), in place of "assistant".
PAIR_KEYS = ("chosen", "rejected")
# a record's own fields; other top-level keys are metadata and pass, except media-like ones (images belong to a turn)
_RECORD_KEYS = ("id", "source", "answers", "conversations")
_MEDIA_WORDS = ("image", "img", "video", "frame", "picture", "photo")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?(:[\w.-]+)?$")
_BATCH_ROWS = 256


# ----------------------------------------------------------------------------------------------------- helpers


def _type_name(value: Any) -> str:
    """The JSON name of a value's type, for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, (list, tuple)):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _path_exists(path: Path) -> bool:
    try:
        return os.path.exists(path)
    except (OSError, ValueError):
        return False


class PathResolver:
    """Turns a path written in the data into an absolute path.

    Absolute paths are kept (``~`` is expanded). A relative path is tried against each base folder in turn and the
    first that exists wins; when none exists the first candidate is kept, so that validation reports it as not
    found with the full path. A relative path that climbs out of its base folder (``../x``) is refused.
    """

    def __init__(self, bases: Sequence[PathLike]):
        self.bases = [Path(os.path.abspath(b)) for b in bases] or [Path(os.path.abspath("."))]

    def __call__(self, raw: str) -> tuple[Path | None, str | None]:
        """``(absolute path, None)`` or ``(None, why it is refused)``."""
        if not raw.strip():
            return None, "empty path (expected a file path)"
        if "\x00" in raw:
            return None, "path contains a NUL character (expected a file path)"
        path = Path(raw)
        if raw.startswith("~"):
            try:
                path = path.expanduser()
            except RuntimeError:  # ~unknown_user
                pass
        if path.is_absolute():
            return Path(os.path.normpath(path)), None
        norm = os.path.normpath(raw)
        if norm == os.pardir or norm.startswith(os.pardir + os.sep) or os.path.isabs(norm):
            return None, (
                f"relative path {raw!r} leads outside its base folder {self.bases[0]} "
                "(expected a path inside that folder, or an absolute path)"
            )
        candidates = [Path(os.path.normpath(base / norm)) for base in self.bases]
        for candidate in candidates:
            if _path_exists(candidate):
                return candidate, None
        return candidates[0], None


def _default_bases(folder: Path, image_dir: PathLike | None) -> list[Path]:
    if image_dir is not None:
        return [Path(image_dir)]
    return [folder, folder / "images"]


def _inline_image(value: Any, resolve: PathResolver) -> tuple[ImageRef | None, str | None]:
    """Normalise an image value of a ``datasets`` row to PIL, bytes or an absolute path."""
    if isinstance(value, Image.Image):
        return value, None
    if isinstance(value, (bytes, bytearray, memoryview)):
        return (bytes(value), None) if len(value) else (None, "empty image bytes (expected an encoded image)")
    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path")
        if isinstance(data, (bytes, bytearray, memoryview)) and len(data):
            return bytes(data), None
        if isinstance(path, str) and path:
            return resolve(path)
        return None, "image has neither bytes nor a path (expected {'bytes': ..., 'path': ...})"
    if isinstance(value, str):
        return resolve(value)
    return None, f"expected an image or a file path, got {_type_name(value)}"


# ----------------------------------------------------------------------------------- conversations format


def parse_conversation(
    obj: Any,
    origin: str,
    resolve: PathResolver,
    *,
    inline_images: bool = False,
    default_id: str | None = None,
    answers_required: bool = True,
) -> tuple[Record | None, list[Problem]]:
    """Map one object of the conversations format to a ``Record``.

    Returns ``(record, [])`` or ``(None, problems)``: a sample with any structural problem is not returned, so
    every object yields exactly one of the two. ``inline_images`` also accepts images given as PIL images, bytes or
    ``{"bytes", "path"}`` dicts (``datasets`` rows); otherwise images must be path strings. ``default_id`` is used
    when the object has no id (``datasets`` rows); otherwise a missing id is a problem. ``answers_required=False``
    (questions to predict answers for): the last turn may leave out "assistant" (an empty answer).
    """
    if not isinstance(obj, dict):
        return None, [
            Problem(origin, None, "", f"expected a JSON object with 'id' and 'conversations', got {_type_name(obj)}")
        ]

    problems: list[Problem] = []
    rid: str | None = None
    raw_id = obj.get("id")
    if raw_id is None:
        if default_id is not None:
            rid = default_id
        else:
            problems.append(Problem(origin, None, "id", _missing("a string or integer id", "id" in obj, obj)))
    elif isinstance(raw_id, bool) or not isinstance(raw_id, (str, int)):
        problems.append(Problem(origin, None, "id", f"expected a string or integer, got {_type_name(raw_id)}"))
    elif not str(raw_id).strip():
        problems.append(Problem(origin, None, "id", "empty id (expected a non-empty string or an integer)"))
    else:
        rid = str(raw_id)

    def bad(field: str, message: str) -> None:
        problems.append(Problem(origin, rid, field, message))

    for key, value in obj.items():
        if key not in _RECORD_KEYS and value is not None and any(w in str(key).lower() for w in _MEDIA_WORDS):
            bad(
                str(key),
                "images and videos belong to a turn (conversations[i].images / .video); at the top level they would "
                "be ignored",
            )

    source = obj.get("source")
    if source is not None and not isinstance(source, str):
        bad("source", f"expected a string, got {_type_name(source)}")
        source = None

    answers = obj.get("answers")
    if answers is not None and (
        not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers)
    ):
        bad("answers", f"expected a non-empty list of strings (every gold answer), got {_type_name(answers)}")
        answers = None

    conversations = obj.get("conversations")
    turns: list[Turn] = []
    if conversations is None:
        bad("conversations", _missing("a list of turns {user, assistant, images?}", "conversations" in obj, obj))
    elif not isinstance(conversations, list):
        bad("conversations", f"expected a list of turns, got {_type_name(conversations)}")
    elif not conversations:
        bad("conversations", "empty list (expected at least one turn {user, assistant, images?})")
    else:
        for i, turn_obj in enumerate(conversations):
            last = i == len(conversations) - 1
            turn = _parse_turn(turn_obj, f"conversations[{i}]", resolve, inline_images, bad, last, answers_required)
            if turn is not None:
                turns.append(turn)

    if problems:
        return None, problems
    assert rid is not None
    return Record(id=rid, source=source, turns=turns, origin=origin, answers=answers), []


def _missing(expected: str, present_as_null: bool, obj: dict) -> str:
    if present_as_null:
        return f"is null (expected {expected})"
    keys = ", ".join(repr(k) for k in list(obj)[:10])
    return f"missing (expected {expected}; the object has keys: {keys or 'none'})"


def _parse_turn(
    obj: Any,
    where: str,
    resolve: PathResolver,
    inline_images: bool,
    bad: Callable[[str, str], None],
    last: bool = True,
    answers_required: bool = True,
) -> Turn | None:
    """One turn, or None after reporting its problems through `bad`. Where answers are optional (questions to
    answer), only the `last` turn may leave its answer out: an earlier one is context the model is shown."""
    if not isinstance(obj, dict):
        bad(where, f"expected an object {{user, assistant, images?}}, got {_type_name(obj)}")
        return None
    ok = True
    texts: dict[str, str] = {}
    unknown = [k for k in obj if k not in _TURN_KEYS]
    pair = any(obj.get(k) is not None for k in PAIR_KEYS)
    if pair:
        ok = _parse_pair_answers(obj, where, last, texts, bad)
    for key in ("user",) if pair else ("user", "assistant"):
        value = obj.get(key)
        if isinstance(value, str):
            texts[key] = value
            continue
        if key == "assistant" and value is None and not answers_required and last:
            texts[key] = ""
            continue
        ok = False
        if key in obj and value is not None:
            bad(f"{where}.{key}", f"expected a string, got {_type_name(value)}")
        else:
            hint = f"; unknown keys here: {', '.join(repr(k) for k in unknown[:5])}" if unknown else ""
            state = "is null" if key in obj else "missing"
            optional = key == "assistant" and not last and not answers_required
            earlier = "; only the last turn's answer may be left out" if optional else ""
            bad(f"{where}.{key}", f"{state} (expected a string{earlier}){hint}")
    if ok:  # (a missing user/assistant already names the unknown keys) a misspelt "image_path" would be dropped
        for key in unknown:
            if obj[key] is not None:
                bad(
                    f"{where}.{key}",
                    "unknown field (a turn has user, assistant (or chosen and rejected), images or image, video); it "
                    "would be ignored",
                )
                ok = False

    images: list[ImageRef] = []
    many, one = obj.get("images"), obj.get("image")
    if many is not None and one is not None:
        bad(where, "has both 'image' and 'images' (expected one of them)")
        ok = False
    elif many is not None:
        if not isinstance(many, list):
            bad(f"{where}.images", f"expected a list of image paths, got {_type_name(many)}")
            ok = False
        else:
            for j, value in enumerate(many):
                image = _image_value(value, f"{where}.images[{j}]", resolve, inline_images, bad)
                ok = ok and image is not None
                if image is not None:
                    images.append(image)
    elif one is not None:
        image = _image_value(one, f"{where}.image", resolve, inline_images, bad)
        ok = ok and image is not None
        if image is not None:
            images.append(image)

    video: str | None = None
    raw_video = obj.get("video")
    if raw_video is not None:
        if not isinstance(raw_video, str):
            bad(f"{where}.video", f"expected a video file path, got {_type_name(raw_video)}")
            ok = False
        else:
            path, why = resolve(raw_video)
            if path is None:
                bad(f"{where}.video", why or "bad path")
                ok = False
            else:
                video = str(path)
    if not ok:
        return None
    turn = Turn(user=texts["user"], assistant=texts["assistant"], images=images, video=video)
    turn.single_image_key = one is not None  # the line wrote "image": errors name that key
    if pair:
        turn.chosen, turn.rejected = texts["chosen"], texts["rejected"]
    return turn


def _parse_pair_answers(obj: dict, where: str, last: bool, texts: dict[str, str], bad: Callable[[str, str], None]):
    """The `chosen` and `rejected` answers of a preference turn into `texts` ("assistant" is then empty); False after
    reporting what is wrong through `bad`."""
    ok = True
    if not last:
        bad(
            f"{where}.chosen",
            "only the last turn may carry chosen/rejected answers (earlier turns are context: give them 'assistant')",
        )
        ok = False
    if obj.get("assistant") is not None:
        bad(
            f"{where}.assistant",
            "a preference turn has 'chosen' and 'rejected' instead of 'assistant' (expected one or the other)",
        )
        ok = False
    for key in PAIR_KEYS:
        value = obj.get(key)
        if isinstance(value, str):
            texts[key] = value
            continue
        ok = False
        if value is not None:
            bad(f"{where}.{key}", f"expected a string, got {_type_name(value)}")
        else:
            other = PAIR_KEYS[1 - PAIR_KEYS.index(key)]
            bad(
                f"{where}.{key}", f"{'is null' if key in obj else 'missing'} (a turn with '{other}' needs both answers)"
            )
    texts["assistant"] = ""
    return ok


def _image_value(
    value: Any, field: str, resolve: PathResolver, inline_images: bool, bad: Callable[[str, str], None]
) -> ImageRef | None:
    if isinstance(value, str):
        image, why = resolve(value)
    elif inline_images:
        image, why = _inline_image(value, resolve)
    else:
        image, why = None, f"expected an image file path, got {_type_name(value)}"
    if image is None:
        bad(field, why or "bad image")
    return image


# ----------------------------------------------------------------------------------------------- jsonl / json


def read_jsonl(
    path: PathLike, image_dir: PathLike | None = None, *, answers_required: bool = True
) -> tuple[list[Record], list[Problem]]:
    """Read a conversations jsonl. Every non-blank line yields a ``Record`` or at least one ``Problem``.

    A file that starts with a UTF-16/32 byte order mark is one ``Problem`` at line 1 (not one per line).

    Raises ``DataError`` only when the file itself cannot be read.
    """
    path = Path(path)
    data = _read_bytes(path)
    resolve = PathResolver(_default_bases(Path(os.path.abspath(path)).parent, image_dir))
    records: list[Record] = []
    problems: list[Problem] = []
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):  # one problem, not one per line of NUL-split text
        return records, [Problem(f"{path}:1", None, "", "UTF-16/32 text (byte order mark); save the file as UTF-8")]
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        origin = f"{path}:{lineno}"
        if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            problems.append(
                Problem(
                    origin,
                    None,
                    "",
                    f"not valid UTF-8 (byte {e.start}: {raw[e.start : e.start + 4]!r}); save the file as UTF-8",
                )
            )
            continue
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            problems.append(Problem(origin, None, "", f"invalid JSON: {e.msg} (column {e.colno})"))
            continue
        except (ValueError, RecursionError) as e:  # e.g. an integer with too many digits, absurd nesting
            problems.append(Problem(origin, None, "", f"invalid JSON: {e}"))
            continue
        record, found = parse_conversation(obj, origin, resolve, answers_required=answers_required)
        problems.extend(found)
        if record is not None:
            records.append(record)
    return records, problems


def read_json(
    path: PathLike, image_dir: PathLike | None = None, *, answers_required: bool = True
) -> tuple[list[Record], list[Problem]]:
    """Read a ``.json`` file holding a list of conversations objects (origins are ``file.json[INDEX]``).

    A ``.json`` file that is really JSON lines is read as such.
    """
    path = Path(path)
    data = _read_bytes(path)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(
            Problem(str(path), None, "", f"not valid UTF-8 (byte {e.start}); save the file as UTF-8")
        ) from e
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # several values: JSON lines under a .json name
            return read_jsonl(path, image_dir, answers_required=answers_required)
        raise DataError(Problem(f"{path}:{e.lineno}", None, "", f"invalid JSON: {e.msg} (column {e.colno})")) from e
    except (ValueError, RecursionError) as e:
        raise DataError(Problem(str(path), None, "", f"invalid JSON: {e}")) from e
    if isinstance(obj, dict) and "conversations" in obj:
        obj = [obj]
    if not isinstance(obj, list):
        raise DataError(
            Problem(str(path), None, "", f"expected a JSON list of conversations objects, got {_type_name(obj)}")
        )
    resolve = PathResolver(_default_bases(Path(os.path.abspath(path)).parent, image_dir))
    records: list[Record] = []
    problems: list[Problem] = []
    for index, item in enumerate(obj):
        record, found = parse_conversation(item, f"{path}[{index}]", resolve, answers_required=answers_required)
        problems.extend(found)
        if record is not None:
            records.append(record)
    return records, problems


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError as e:
        raise DataError(Problem(str(path), None, "", "file not found")) from e
    except OSError as e:
        raise DataError(Problem(str(path), None, "", f"cannot read the file: {e.strerror or e}")) from e


# ------------------------------------------------------------------------------------------ datasets tables


def read_hf_dataset(
    path_or_id: PathLike,
    split: str = "train",
    image_dir: PathLike | None = None,
    *,
    name: str | None = None,
    cache_dir: PathLike | None = None,
    answers_required: bool = True,
) -> tuple[list[Record], list[Problem]]:
    """Read a ``datasets`` table into ``Record``s, collecting row problems instead of raising.

    ``path_or_id``: a folder written by ``save_to_disk`` (a ``Dataset``, or a ``DatasetDict`` whose ``split`` is
    taken), a folder of parquet / arrow files (splits inferred from file names, as ``load_dataset`` does), a
    ``.parquet`` or ``.arrow`` file, or a Hub id (``owner/name`` or ``owner/name:config``; needs a network).
    ``name`` selects a config (e.g. ``"docvqa"`` of the_cauldron). Relative image paths inside rows are looked up
    in ``image_dir``, else in the dataset folder and its ``images/``. ``answers_required=False``: rows may withhold
    their answers (a test split). Raises ``DataError`` when the table cannot be opened or has none of the known
    schemas.
    """
    dataset, label, folder = _open_dataset(path_or_id, split, name, cache_dir)
    resolve = PathResolver(_default_bases(folder, image_dir))
    return _records_from_dataset(dataset, split, label, resolve, answers_required)


def load_hf_dataset(
    path_or_id: PathLike,
    split: str = "train",
    image_dir: PathLike | None = None,
    *,
    name: str | None = None,
    cache_dir: PathLike | None = None,
    answers_required: bool = True,
) -> list[Record]:
    """Like ``read_hf_dataset`` but returns only the records, raising ``DataError`` if any row has a problem."""
    records, problems = read_hf_dataset(
        path_or_id, split, image_dir, name=name, cache_dir=cache_dir, answers_required=answers_required
    )
    if problems:
        raise DataError(problems)
    return records


def _open_dataset(path_or_id: PathLike, split: str, name: str | None, cache_dir: PathLike | None):
    """``(datasets.Dataset, label for origins, folder for relative paths)``."""
    import datasets

    label = str(path_or_id)
    path = Path(path_or_id)
    cache = str(cache_dir) if cache_dir is not None else None

    def fail(message: str, cause: BaseException | None = None) -> DataError:
        error = DataError(Problem(label, None, "", message))
        error.__cause__ = cause
        return error

    if path.is_dir():
        folder = Path(os.path.abspath(path))
        try:
            if (path / "dataset_dict.json").is_file():
                loaded = datasets.load_from_disk(str(path))
                if split not in loaded:
                    raise fail(f"no split {split!r} in this DatasetDict (it has: {', '.join(loaded)})")
                return loaded[split], label, folder
            if (path / "state.json").is_file():
                return datasets.load_from_disk(str(path)), label, folder
            if (path / split / "state.json").is_file():
                return datasets.load_from_disk(str(path / split)), label, folder
        except DataError:
            raise
        except Exception as e:
            raise fail(f"cannot load the dataset saved in this folder: {e}", e) from e
        if not _has_table_files(path):
            raise fail(
                f"no dataset in this folder (expected {split}.jsonl or NAME_{split}.jsonl, a folder written by "
                "Dataset.save_to_disk, or parquet / arrow files)"
            )
        try:
            dataset = datasets.load_dataset(str(path), name=name, split=split, cache_dir=cache)
        except Exception as e:
            raise fail(f"cannot load split {split!r} from the parquet / arrow files in this folder: {e}", e) from e
        return dataset, label, folder

    if path.is_file():
        folder = Path(os.path.abspath(path)).parent
        suffix = path.suffix.lower()
        try:
            if suffix == ".parquet":
                return (
                    datasets.load_dataset("parquet", data_files={split: str(path)}, split=split, cache_dir=cache),
                    label,
                    folder,
                )
            if suffix == ".arrow":
                return datasets.Dataset.from_file(str(path)), label, folder
        except Exception as e:
            raise fail(f"cannot read this {suffix} file: {e}", e) from e
        raise fail(f"unsupported file type {suffix!r} (expected .jsonl, .json, .parquet or .arrow)")

    if not _looks_like_hub_id(label):
        raise fail("no such file or folder")
    hub_id, _, config = label.partition(":")
    try:
        dataset = datasets.load_dataset(hub_id, name=name or config or None, split=split, cache_dir=cache)
    except Exception as e:
        raise fail(
            f"not a local file or folder, and loading it from the Hugging Face Hub failed "
            f"({type(e).__name__}: {e}). Without a network, download the data set first and pass its folder "
            f"(or parquet files) instead",
            e,
        ) from e
    if not isinstance(dataset, datasets.Dataset):
        raise fail(f"expected a map-style Dataset for split {split!r}, got {type(dataset).__name__}")
    return dataset, label, Path(os.path.abspath("."))


def _has_table_files(folder: Path) -> bool:
    if (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file():
        return True
    return any(folder.rglob("*.parquet")) or any(folder.rglob("*.arrow"))


def _looks_like_hub_id(text: str) -> bool:
    return bool(_HUB_ID.match(text)) and not text.startswith(".") and Path(text).suffix.lower() not in _FILE_SUFFIXES


_FILE_SUFFIXES = {".jsonl", ".json", ".parquet", ".arrow"}


def _detect_schema(columns: Sequence[str]) -> str | None:
    if "chosen" in columns and "rejected" in columns:
        if "prompt" in columns:
            return "trl_preference"
        if "question" in columns:
            return "rlaif_v"
    if "conversations" in columns:
        return "conversations"
    if "texts" in columns:
        return "cauldron"
    if ("query" in columns or "question" in columns) and "answers" in columns:
        return "docvqa"
    return None


def _records_from_dataset(
    dataset, split: str, label: str, resolve: PathResolver, answers_required: bool = True
) -> tuple[list[Record], list[Problem]]:
    columns = list(dataset.column_names)
    schema = _detect_schema(columns)
    if schema is None:
        raise DataError(
            Problem(
                label,
                None,
                "",
                f"unrecognised columns {columns} (expected the conversations format: id, conversations; "
                "the_cauldron: images, texts; DocVQA: image, query (or question), answers; or preference pairs: "
                "image, question, chosen, rejected (RLAIF-V) or images, prompt, chosen, rejected (TRL))",
            )
        )
    mapper = {
        "conversations": _row_conversations,
        "cauldron": _row_cauldron,
        "docvqa": _row_docvqa,
        "rlaif_v": _row_rlaif_v,
        "trl_preference": _row_trl_preference,
    }[schema]
    records: list[Record] = []
    problems: list[Problem] = []
    index = 0
    # The arrow format hands rows over undecoded: image columns stay {"bytes", "path"} dicts (no PIL decoding).
    for batch in dataset.with_format("arrow").iter(batch_size=_BATCH_ROWS):
        for row in batch.to_pylist():
            origin = f"{label}[row {index}]"
            default_id = f"{split}-{index:010d}"
            record, found = mapper(row, origin, default_id, resolve, answers_required)
            problems.extend(found)
            if record is not None:
                records.append(record)
            index += 1
    return records, problems


def _row_id(row: dict, default_id: str) -> str:
    for key in ("id", "questionId"):
        value = row.get(key)
        if value is not None and not isinstance(value, bool) and str(value).strip():
            return str(value)
    return default_id


def _row_conversations(row: dict, origin: str, default_id: str, resolve: PathResolver, answers_required: bool):
    return parse_conversation(
        row, origin, resolve, inline_images=True, default_id=default_id, answers_required=answers_required
    )


def _row_images(value: Any, field: str, rid: str, origin: str, resolve: PathResolver, problems: list[Problem]):
    images: list[ImageRef] = []
    values = value if isinstance(value, list) else [value]
    for j, item in enumerate(values):
        image, why = _inline_image(item, resolve)
        if image is None:
            problems.append(Problem(origin, rid, f"{field}[{j}]" if isinstance(value, list) else field, why or "bad"))
        else:
            images.append(image)
    return images


def _row_cauldron(row: dict, origin: str, default_id: str, resolve: PathResolver, answers_required: bool):
    rid = _row_id(row, default_id)
    problems: list[Problem] = []
    raw_images = row.get("images")
    images = [] if raw_images is None else _row_images(raw_images, "images", rid, origin, resolve, problems)
    texts = row.get("texts")
    turns: list[Turn] = []
    source = row.get("source") if isinstance(row.get("source"), str) else None
    if not isinstance(texts, list) or not texts:
        problems.append(
            Problem(
                origin,
                rid,
                "texts",
                f"expected a non-empty list of {{user, assistant, source}}, got {_type_name(texts)}",
            )
        )
    else:
        for i, text in enumerate(texts):
            if not isinstance(text, dict):
                problems.append(
                    Problem(
                        origin, rid, f"texts[{i}]", f"expected an object {{user, assistant}}, got {_type_name(text)}"
                    )
                )
                continue
            ok = True
            if text.get("assistant") is None and not answers_required:
                text = {**text, "assistant": ""}
            for key in ("user", "assistant"):
                if not isinstance(text.get(key), str):
                    problems.append(
                        Problem(origin, rid, f"texts[{i}].{key}", f"expected a string, got {_type_name(text.get(key))}")
                    )
                    ok = False
            if ok:
                # the_cauldron puts every image before the first question.
                turns.append(
                    Turn(
                        user=text["user"], assistant=text["assistant"], images=images if i == 0 else [], bare_text=True
                    )
                )
        if isinstance(texts[0], dict) and isinstance(texts[0].get("source"), str):
            source = texts[0]["source"]
    if problems:
        return None, problems
    return Record(id=rid, source=source, turns=turns, origin=origin), []


#: Appended to every DocVQA question, as the original recipe's DocVQA script does (training and evaluation).
DOCVQA_INSTRUCTION = "\nAnswer briefly."


def _row_docvqa(row: dict, origin: str, default_id: str, resolve: PathResolver, answers_required: bool):
    rid = _row_id(row, default_id)
    problems: list[Problem] = []
    key = "query" if "query" in row else "question"
    query = row.get(key)
    if isinstance(query, dict):
        query = query.get("en")
        key = f"{key}.en"
    if not isinstance(query, str):
        problems.append(Problem(origin, rid, key, f"expected a string question, got {_type_name(query)}"))
    answers = row.get("answers")
    if isinstance(answers, str):
        answers = [answers]
    if (answers is None or answers == []) and not answers_required:  # a test split withholds them
        answers = [""]
    if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
        problems.append(
            Problem(origin, rid, "answers", f"expected a non-empty list of strings, got {_type_name(answers)}")
        )
    images: list[ImageRef] = []
    if row.get("image") is not None:
        images = _row_images(row["image"], "image", rid, origin, resolve, problems)
    elif row.get("images") is not None:
        images = _row_images(row["images"], "images", rid, origin, resolve, problems)
    if problems:
        return None, problems
    source = row.get("source") if isinstance(row.get("source"), str) else None
    # the recipe's DocVQA prompt, in training and evaluation: "<|image_1|>\n{question}\nAnswer briefly."
    turn = Turn(user=query + DOCVQA_INSTRUCTION, assistant=answers[0], images=images)
    return Record(id=rid, source=source, turns=[turn], origin=origin, answers=list(answers)), []


# ------------------------------------------------------------------------------------- preference tables


def _answer_text(value: Any, field: str, rid: str, origin: str, problems: list[Problem]) -> str | None:
    """A preference answer given as a string or as chat messages (one assistant message whose content is a string or
    a list of text parts), as text."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict):
        message = value[0]
        if message.get("role", "assistant") != "assistant":
            problems.append(
                Problem(origin, rid, f"{field}[0].role", f"expected 'assistant', got {message.get('role')!r}")
            )
            return None
        text, images = _content_parts(message.get("content"), f"{field}[0].content", rid, origin, problems)
        if images:
            problems.append(Problem(origin, rid, f"{field}[0].content", "an answer cannot hold images"))
            return None
        return None if text is None else "".join(text)
    problems.append(
        Problem(
            origin,
            rid,
            field,
            f"expected a string or one assistant message ([{{'role': 'assistant', 'content': ...}}]), got "
            f"{_type_name(value) if not isinstance(value, list) else f'{len(value)} messages'}",
        )
    )
    return None


def _content_parts(
    content: Any, field: str, rid: str, origin: str, problems: list[Problem]
) -> tuple[list[str | None] | None, int]:
    """(the content's pieces in order: text, or None where an image placeholder stands; number of placeholders)."""
    if isinstance(content, str):
        return [content], 0
    if not isinstance(content, list):
        problems.append(Problem(origin, rid, field, f"expected a string or a list of parts, got {_type_name(content)}"))
        return None, 0
    pieces: list[str | None] = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "image":
            pieces.append(None)
        elif kind == "text" and isinstance(part.get("text"), str):
            pieces.append(part["text"])
        else:
            problems.append(
                Problem(origin, rid, f"{field}[{j}]", "expected {'type': 'text', 'text': str} or {'type': 'image'}")
            )
            return None, 0
    return pieces, sum(1 for p in pieces if p is None)


def _prompt_turns(
    prompt: Any, n_images: int, rid: str, origin: str, problems: list[Problem]
) -> list[tuple[str, str, int]] | None:
    """A TRL prompt (a string, or chat messages: user and assistant alternating, ending with the user's question) as
    (user text, assistant answer, images of the turn) per turn. Image placeholders take the row's images in order;
    without any, every image belongs to the first turn. Where every placeholder leads its message's text, the builder
    puts the tags in front, as for the jsonl; otherwise each placeholder becomes its tag at its place (in every turn,
    numbered across the conversation, as tags written in the data must be)."""
    if isinstance(prompt, str):
        return [(prompt, "", n_images)]
    if not isinstance(prompt, list) or not prompt:
        problems.append(
            Problem(
                origin, rid, "prompt", f"expected a string or a non-empty list of messages, got {_type_name(prompt)}"
            )
        )
        return None
    users: list[list[str | None]] = []  # each user message's pieces (None: an image placeholder)
    answers: list[str] = []
    for i, message in enumerate(prompt):
        where = f"prompt[{i}]"
        role = message.get("role") if isinstance(message, dict) else None
        want = "user" if i % 2 == 0 else "assistant"
        if role != want:
            hint = " (system messages are not supported)" if role == "system" else ""
            problems.append(
                Problem(
                    origin,
                    rid,
                    f"{where}.role",
                    f"expected {want!r} (user and assistant alternate), got {role!r}{hint}",
                )
            )
            return None
        pieces, count = _content_parts(message.get("content"), f"{where}.content", rid, origin, problems)
        if pieces is None:
            return None
        if role == "user":
            users.append(pieces)
            answers.append("")
        elif count:
            problems.append(Problem(origin, rid, f"{where}.content", "an answer cannot hold images"))
            return None
        else:
            answers[-1] = "".join(p for p in pieces if p is not None)
    if len(prompt) % 2 == 0:
        problems.append(Problem(origin, rid, "prompt", "expected the last message to be the user's question"))
        return None
    counts = [sum(p is None for p in pieces) for pieces in users]
    if sum(counts) == 0:
        counts[0] = n_images
    elif sum(counts) != n_images:
        problems.append(
            Problem(origin, rid, "prompt", f"{sum(counts)} image placeholder(s) but the row has {n_images} image(s)")
        )
        return None

    def leading(pieces: list[str | None]) -> bool:
        first_text = next((k for k, p in enumerate(pieces) if p is not None), len(pieces))
        return all(p is not None for p in pieces[first_text:])

    numbers = iter(range(1, n_images + 1))
    tagged = not all(leading(pieces) for pieces in users)
    texts = [
        "".join(image_tag(next(numbers)) if p is None else p for p in pieces if tagged or p is not None)
        for pieces in users
    ]
    return list(zip(texts, answers, counts))


def _pair_record(
    rid: str, origin: str, turns: list[tuple[str, str, int]], images: list[ImageRef], chosen: str, rejected: str
) -> Record:
    out: list[Turn] = []
    taken = 0
    for user, answer, count in turns:
        out.append(Turn(user=user, assistant=answer, images=images[taken : taken + count]))
        taken += count
    out[-1].chosen, out[-1].rejected = chosen, rejected
    return Record(id=rid, source=None, turns=out, origin=origin)


def _row_rlaif_v(row: dict, origin: str, default_id: str, resolve: PathResolver, answers_required: bool):
    """RLAIF-V (`openbmb/RLAIF-V-Dataset`): one image, a question, the chosen and the rejected answer."""
    rid = _row_id(row, default_id)
    problems: list[Problem] = []
    question = row.get("question")
    if not isinstance(question, str):
        problems.append(Problem(origin, rid, "question", f"expected a string, got {_type_name(question)}"))
    answers = {k: row.get(k) for k in PAIR_KEYS}
    for key, value in answers.items():
        if not isinstance(value, str):
            problems.append(Problem(origin, rid, key, f"expected a string, got {_type_name(value)}"))
    images = [] if row.get("image") is None else _row_images(row["image"], "image", rid, origin, resolve, problems)
    if problems:
        return None, problems
    record = _pair_record(rid, origin, [(question, "", len(images))], images, answers["chosen"], answers["rejected"])
    if isinstance(row.get("ds_name"), str):
        record.source = row["ds_name"]
    return record, []


def _row_trl_preference(row: dict, origin: str, default_id: str, resolve: PathResolver, answers_required: bool):
    """TRL's vision preference schema: `images`, `prompt`, `chosen`, `rejected` (strings or chat messages)."""
    rid = _row_id(row, default_id)
    problems: list[Problem] = []
    raw = row.get("images")
    if raw is None and row.get("image") is not None:
        raw = [row["image"]]
    images = [] if raw is None else _row_images(raw, "images", rid, origin, resolve, problems)
    turns = _prompt_turns(row.get("prompt"), len(images), rid, origin, problems) if not problems else None
    answers = [_answer_text(row.get(k), k, rid, origin, problems) for k in PAIR_KEYS]
    if problems or turns is None:
        return None, problems
    return _pair_record(rid, origin, turns, images, answers[0], answers[1]), []


# ---------------------------------------------------------------------------------------------- dispatch


def load_records(
    data: PathLike | Sequence[PathLike],
    image_dir: PathLike | None = None,
    split: str = "train",
    *,
    name: str | None = None,
    cache_dir: PathLike | None = None,
    answers_required: bool = True,
) -> tuple[list[Record], list[Problem]]:
    """Read any supported source: a ``.jsonl`` / ``.json`` file, a dataset folder or file, or a Hub id.

    ``data`` may also be a list of sources, read in order. Bad samples become ``Problem``s; ``DataError`` is raised
    only when a whole source cannot be read (missing file, unknown table schema, Hub unreachable).
    ``answers_required=False`` (questions to predict answers for): the last turn of a sample may leave out
    "assistant", and a table's rows their answers.
    """
    if isinstance(data, (list, tuple)):
        records: list[Record] = []
        problems: list[Problem] = []
        for item in data:
            more, found = load_records(
                item, image_dir, split, name=name, cache_dir=cache_dir, answers_required=answers_required
            )
            records.extend(more)
            problems.extend(found)
        return records, problems
    path = Path(data)
    suffix = path.suffix.lower()
    if suffix == ".jsonl" or (suffix == ".json" and not path.is_dir()):
        reader = read_jsonl if suffix == ".jsonl" else read_json
        return reader(path, image_dir, answers_required=answers_required)
    if path.is_dir() and not _has_table_files(path):
        # a folder of the user's own data: {split}.jsonl (or .json) with its images, or the one NAME_{split}.jsonl
        # (the recipe's converted UCF-101: ucf101_train.jsonl, ucf101_val.jsonl, ...)
        for candidate in (path / f"{split}.jsonl", path / f"{split}.json"):
            if candidate.is_file():
                return load_records(candidate, image_dir, split, answers_required=answers_required)
        prefixed = sorted(p for p in path.glob(f"*_{split}.jsonl") if p.is_file() and not p.name.startswith("."))
        if len(prefixed) > 1:
            names = ", ".join(p.name for p in prefixed)
            raise DataError(
                Problem(str(path), None, "", f"several files for split '{split}': {names}; name one of them as --data")
            )
        if prefixed:
            return load_records(prefixed[0], image_dir, split, answers_required=answers_required)
    return read_hf_dataset(data, split, image_dir, name=name, cache_dir=cache_dir, answers_required=answers_required)


def load_image(ref: ImageRef) -> Image.Image:
    """Open an ``ImageRef`` as a fully loaded PIL image (no mode conversion)."""
    if isinstance(ref, Image.Image):
        return ref
    source = io.BytesIO(ref) if isinstance(ref, bytes) else ref
    image = Image.open(source)
    image.load()
    return image
