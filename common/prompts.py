"""Named prompt sets and prompt files.

A prompt source is a registered name (`prompt_set_names()`) or a path to a
UTF-8 text file with one prompt per line (blank lines and `#` comments are
skipped), or to a CSV file whose "Prompts" column holds them (DrawBench's public
CSV: no package on the registries ships its 200 prompts, so users supply it).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

_DIR = Path(__file__).parent / "prompt_sets"


class PromptSetError(ValueError):
    """An unknown prompt set or a malformed prompt file, worded as one line."""


def _file_set(path: Path) -> Callable[[], list[str]]:
    return lambda: read_prompt_file(path)


ACTIVITIES = ["washing the dishes", "riding a bike", "playing chess"]  # DDPO's nouns-activities task


def _article(noun: str) -> str:
    return "an" if noun[:1].lower() in "aeiou" else "a"


def animals_activities() -> list[str]:
    """The 45 simple animals x 3 activities = 135 prompts, "a monkey washing the dishes" (the DiffExp
    paper's alignment task with PickScore, after DDPO's nouns-activities prompts)."""
    animals = read_prompt_file(_DIR / "simple_animals.txt")
    return [f"{_article(a)} {a} {act}" for a in animals for act in ACTIVITIES]


def read_prompt_csv(path: str | Path, column: str = "Prompts") -> list[str]:
    """Prompts of one column of a CSV file (DrawBench's public CSV names it "Prompts")."""
    import csv

    path = Path(path)
    try:
        with path.open(encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            fields = reader.fieldnames or []
            if column not in fields:
                raise PromptSetError(
                    f"prompt file {path}: no column {column!r} (columns: {', '.join(fields) or 'none'}); "
                    f"DrawBench's CSV has a {column!r} column"
                )
            prompts = [(row.get(column) or "").strip() for row in reader]
    except UnicodeDecodeError:
        raise PromptSetError(f"prompt file {path}: not UTF-8 text") from None
    except OSError as err:
        raise PromptSetError(f"prompt file {path}: cannot be read ({err.strerror})") from None
    prompts = [p for p in prompts if p]
    if not prompts:
        raise PromptSetError(f"prompt file {path}: column {column!r} holds no prompts")
    return prompts


def _registry() -> dict[str, Callable[[], list[str]]]:
    sets: dict[str, Callable[[], list[str]]] = {p.stem: _file_set(p) for p in _DIR.glob("*.txt")}
    sets["animals_activities"] = animals_activities
    try:
        from common.shapes.prompt_sets import SHAPES_PROMPT_SETS

        sets.update(SHAPES_PROMPT_SETS)
    except ImportError:  # pragma: no cover - the testbed is optional
        pass
    return sets


def prompt_set_names() -> list[str]:
    return sorted(_registry())


def read_prompt_file(path: str | Path) -> list[str]:
    """Prompts of a text file, one per line; raises PromptSetError if unreadable or empty."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise PromptSetError(f"prompt file {path}: not UTF-8 text; save it as UTF-8, one prompt per line") from None
    except OSError as err:
        raise PromptSetError(f"prompt file {path}: cannot be read ({err.strerror})") from None
    prompts = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    if not prompts:
        raise PromptSetError(f"prompt file {path}: holds no prompts; write one prompt per line")
    long = [p for p in prompts if len(p) > 1000]
    if long:
        raise PromptSetError(f"prompt file {path}: a line of {len(long[0])} characters is not a prompt; one per line")
    return prompts


def load_prompts(source: str) -> list[str]:
    """Prompts of a named set or a file path."""
    sets = _registry()
    if source in sets:
        return list(sets[source]())
    path = Path(source).expanduser()
    if path.suffix or "/" in source:
        if not path.exists():
            raise PromptSetError(f"prompt file {source!r} does not exist; give a path or one of: {', '.join(sorted(sets))}")
        if path.suffix.lower() == ".csv":  # e.g. DrawBench's public CSV (prompts in its "Prompts" column)
            return read_prompt_csv(path)
        return read_prompt_file(path)
    raise PromptSetError(f"unknown prompt set {source!r}; known sets: {', '.join(sorted(sets))}, or a file path")
