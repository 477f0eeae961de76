"""Tasks from Hugging Face datasets: `hf:NAME[:SPLIT]`, a hub id or a folder written by `save_to_disk`.

Through the optional `datasets` library (pip install 'mlx-coach[hf]'). The columns decide the shape:
HumanEval's (prompt, test, entry_point; task_id and canonical_solution when present) or MBPP's (text or
prompt, test_list, code; task_id and test_setup_code when present); each row then goes through the
same checks as a JSONL row of that shape (data.tasks.load_hf), with `hf:NAME[:SPLIT]:ROW` as its place.
"""

from __future__ import annotations

from pathlib import Path

from mlx_coach.core.errors import UserError

HF_HINT = "hf: datasets need the 'datasets' package: pip install 'mlx-coach[hf]'"
HUMANEVAL_COLUMNS = ("prompt", "test", "entry_point")
MBPP_COLUMNS = ("text", "test_list", "code")  # MBPP's sanitized config names its text "prompt"
DEFAULT_SPLIT = "test"  # HumanEval's only split, MBPP's evaluation split


def parse_spec(spec: str) -> tuple[str, str | None]:
    """'hf:NAME[:SPLIT]' -> (NAME, SPLIT or None). A NAME that is an existing folder keeps its colons."""
    body = spec[len("hf:"):].strip()
    if not body:
        raise UserError(f"tasks: {spec!r} names no dataset; use hf:NAME or hf:NAME:SPLIT")
    if Path(body).expanduser().is_dir():
        return body, None
    name, sep, split = body.rpartition(":")
    if not sep or not name:
        name, split = body, None
    return name, split or None


def _pick_split(spec, splits, split):
    """The split asked for, else 'test', else the only one."""
    if split is not None:
        if split not in splits:
            raise UserError(f"tasks: {spec}: no split {split!r}; it has {', '.join(sorted(splits))}")
        return split
    if DEFAULT_SPLIT in splits or len(splits) == 1:
        return DEFAULT_SPLIT if DEFAULT_SPLIT in splits else next(iter(splits))
    raise UserError(f"tasks: {spec}: several splits ({', '.join(sorted(splits))}); name one: hf:NAME:SPLIT")


def _open(spec, name, split):
    """The Dataset that `spec` names: from a local folder (Dataset or DatasetDict), else from the hub."""
    try:
        import datasets
    except ImportError:
        raise UserError(HF_HINT) from None

    folder = Path(name).expanduser()
    if folder.is_dir():
        try:
            data = datasets.load_from_disk(str(folder))
        except (FileNotFoundError, ValueError) as e:
            raise UserError(f"tasks: {spec}: {folder} is not a saved dataset ({_one_line(e)})") from None
    else:
        try:
            data = datasets.load_dataset(name)
        except (datasets.exceptions.DatasetsError, OSError, ValueError, ConnectionError) as e:
            raise UserError(f"tasks: {spec}: cannot load {name!r} from the hub ({_one_line(e)})") from None
    if isinstance(data, datasets.DatasetDict):
        return data[_pick_split(spec, set(data), split)]
    if split is not None:
        raise UserError(f"tasks: {spec}: {name} is a single dataset with no splits; drop ':{split}'")
    return data


def _one_line(e):
    return " ".join(str(e).split())[:200]


def _shape(spec, columns):
    """'humaneval' or 'mbpp' from the columns, or a UserError naming what each shape misses."""
    missing_he = [c for c in HUMANEVAL_COLUMNS if c not in columns]
    if not missing_he:
        return "humaneval"
    missing_mbpp = [c for c in MBPP_COLUMNS if c not in columns and not (c == "text" and "prompt" in columns)]
    if not missing_mbpp:
        return "mbpp"
    raise UserError(f"tasks: {spec}: columns {', '.join(sorted(columns))} fit neither HumanEval's (missing "
                    f"{', '.join(missing_he)}) nor MBPP's (missing {', '.join(missing_mbpp)})")


def hf_rows(spec: str) -> tuple[str, list[tuple[str, str, dict]], list[str]]:
    """(shape, rows, files) of `hf:NAME[:SPLIT]`: 'humaneval' or 'mbpp'; (where, place, row) per row, each row
    with the keys of a JSONL row of that shape; the dataset's files (answer keys to hide from samples)."""
    name, split = parse_spec(spec)
    data = _open(spec, name, split)
    shape = _shape(spec, set(data.column_names))
    prefix = Path(name).name if Path(name).expanduser().is_dir() else name
    rows = []
    for i, row in enumerate(data):
        if shape == "humaneval":
            row = {"task_id": f"{prefix}/{i}", **row}
        else:
            row = {**row, "task_id": row.get("task_id", i)}
            row.setdefault("text", row.get("prompt"))
            if not row.get("test_setup_code") and isinstance(row.get("test_imports"), list):  # sanitized MBPP
                row["test_setup_code"] = "\n".join(str(line) for line in row["test_imports"])
        rows.append((f"{spec}:{i}", f"row {i}", row))
    if not rows:
        raise UserError(f"tasks: {spec}: the dataset has no rows")
    return shape, rows, [f["filename"] for f in data.cache_files]
