"""The user's model directories, kept in `flashmoe.json` in llm's user directory.

    {"models": {"qwen3.5-397b-flash": {"path": "/Volumes/ssd/qwen397", "aliases": ["flashmoe"]},
                "flashmoe-tiny": {"path": ".../flashmoe/tiny", "aliases": []}}}

The 397B model is always listed, even before its files exist (prompting it
then explains how to get them); its directory defaults to one inside llm's
user directory until `llm flashmoe convert` or `add` records another.
Plain json and pathlib only: `llm models` reads this on every start.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from .errors import FlashMoeError

FILE_NAME = "flashmoe.json"
BUILTIN_NAME = "qwen3.5-397b-flash"
BUILTIN_ALIASES = ("flashmoe",)
TINY_NAME = "flashmoe-tiny"
# The published checkpoint `llm flashmoe convert` starts from (about 209 GB).
PUBLISHED_CHECKPOINT = "mlx-community/Qwen3.5-397B-A17B-4bit"


@dataclass(frozen=True)
class Entry:
    name: str
    path: Path
    aliases: tuple[str, ...] = field(default=())


def user_dir() -> Path:
    import llm

    return llm.user_dir()


def data_dir() -> Path:
    """Where our own files live by default (converted and synthetic models)."""
    return user_dir() / "flashmoe"


def default_builtin_dir() -> Path:
    return data_dir() / BUILTIN_NAME


def _path() -> Path:
    return user_dir() / FILE_NAME


def _read() -> dict:
    path = _path()
    if not path.exists():
        return {"models": {}}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise FlashMoeError(
            f"{path} is not valid JSON ({error}). Fix it by hand, or delete it and "
            "re-add your models with `llm flashmoe add DIR`."
        ) from error
    if not isinstance(data, dict) or not isinstance(data.get("models", {}), dict):
        raise FlashMoeError(f"{path} does not hold a {{\"models\": {{...}}}} object; delete it and re-add your models.")
    data.setdefault("models", {})
    return data


def _write(data: dict) -> None:
    path = _path()
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def entries() -> list[Entry]:
    """Every registered model, the built-in 397B first."""
    models = _read()["models"]
    result = []
    builtin = models.get(BUILTIN_NAME, {})
    result.append(Entry(BUILTIN_NAME, Path(builtin.get("path") or default_builtin_dir()),
                        tuple(builtin.get("aliases", BUILTIN_ALIASES))))
    for name, item in sorted(models.items()):
        if name == BUILTIN_NAME or not isinstance(item, dict) or not item.get("path"):
            continue
        result.append(Entry(name, Path(item["path"]), tuple(item.get("aliases", ()))))
    return result


def get(name: str) -> Entry:
    for entry in entries():
        if name == entry.name or name in entry.aliases:
            return entry
    known = ", ".join(e.name for e in entries())
    raise FlashMoeError(f"No flashmoe model is called {name!r}. Known: {known}. See `llm flashmoe list`.")


def add(name: str, path: str | Path, aliases: tuple[str, ...] | list[str] = ()) -> Entry:
    """Register (or re-point) `name` at `path`."""
    if not name or any(c.isspace() for c in name):
        raise FlashMoeError(f"A model name must be non-empty and without spaces, not {name!r}.")
    path = Path(path).expanduser().resolve()
    data = _read()
    for other, item in data["models"].items():
        if other != name and name in item.get("aliases", ()):
            raise FlashMoeError(f"{name!r} is already an alias of {other}; choose another --name.")
    if name == BUILTIN_NAME and not aliases:
        aliases = BUILTIN_ALIASES
    data["models"][name] = {"path": str(path), "aliases": list(aliases)}
    _write(data)
    return Entry(name, path, tuple(aliases))


def remove(name: str) -> Entry:
    """Forget a model (its files stay). The 397B goes back to its default directory."""
    entry = get(name)
    data = _read()
    if entry.name not in data["models"]:
        raise FlashMoeError(f"{entry.name} has no directory recorded; nothing to remove.")
    del data["models"][entry.name]
    _write(data)
    return entry
