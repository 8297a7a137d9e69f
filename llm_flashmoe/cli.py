"""`llm flashmoe ...`: get, register, inspect and try model directories.

Every command turns a `FlashMoeError` into a one-paragraph click error.
Heavy modules (mlx, the converter, the benchmark) load inside the command
that needs them, so `llm --help` stays fast.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import sys
from pathlib import Path

import click

from . import registry
from .errors import FlashMoeError


def _friendly(command):
    """Show FlashMoeError as `Error: message`, without a traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except FlashMoeError as error:
            raise click.ClickException(str(error)) from None

    return wrapper


def _resolve_dir(name_or_dir: str) -> tuple[str, Path]:
    """A registered model name/alias, or a directory path -> (label, directory)."""
    path = Path(name_or_dir).expanduser()
    if path.is_dir():
        return str(path), path
    try:
        entry = registry.get(name_or_dir)
    except FlashMoeError:
        raise FlashMoeError(f"{name_or_dir} is neither a directory nor a registered model; see `llm flashmoe list`.")
    return entry.name, entry.path


def _dir_size(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.stat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


def _human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"


def _manifest(path: Path) -> dict | None:
    """The packed directory's manifest as JSON (None: not a packed directory)."""
    from .experts import format as expert_format

    if not expert_format.is_packed_dir(path):
        return None
    try:
        return json.loads((path / expert_format.MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _completeness(path: Path) -> str:
    """"complete", or what is missing, judged from the files alone (no checksums: see verify)."""
    from .experts import format as expert_format

    if not path.is_dir():
        return "missing"
    if expert_format.is_packed_dir(path):
        status = expert_format.conversion_status(path)
        if status != "complete":
            return status
    for needed in ("config.json", "tokenizer.json"):
        if not (path / needed).is_file():
            return f"incomplete: no {needed}"
    manifest = _manifest(path)
    if manifest is not None:
        missing = [layer["file"] for layer in manifest.get("layers", []) if not (path / layer["file"]).is_file()]
        if missing or not (path / expert_format.RESIDENT_NAME).is_file():
            return f"incomplete: {', '.join(missing) or expert_format.RESIDENT_NAME} missing; re-convert the model"
        return "complete"
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
        except (OSError, ValueError, KeyError):
            return "incomplete: model.safetensors.index.json unreadable"
        missing = sorted(s for s in shards if not (path / s).is_file())
        if missing:
            return f"incomplete: {len(missing)} of {len(shards)} weight files missing"
        return "complete"
    return "complete" if any(path.glob("*.safetensors")) else "incomplete: no weights"


def describe(path: Path) -> dict:
    """What `list` and `info` show about a directory (reads json only)."""
    from .config import load_config

    info = {"path": str(path), "status": _completeness(path)}
    if not path.is_dir():
        return info
    info["size_bytes"] = _dir_size(path)
    try:
        cfg = load_config(path)
    except FlashMoeError as error:
        info["error"] = str(error)
        return info
    manifest = _manifest(path)
    info.update(
        layers=cfg.num_hidden_layers,
        hidden_size=cfg.hidden_size,
        experts=cfg.num_experts,
        top_k=cfg.num_experts_per_tok,
        layout="packed (experts streamed from disk)" if manifest is not None else "published (experts in memory)",
    )
    expert_bits = None
    if manifest:
        expert_bits = manifest.get("bits")
    if expert_bits is None:
        q = cfg.quant_for("layers.0.mlp.experts.gate_proj")
        expert_bits = q.bits if q else 16
    info["expert_bits"] = expert_bits
    return info


@click.group(name="flashmoe")
def flashmoe():
    """Qwen3.5 MoE models with experts streamed from SSD.

    Start with `llm flashmoe demo` (a tiny random model, no download).
    For the real model: `llm flashmoe convert SRC DEST` once, then
    `llm -m qwen3.5-397b-flash "..."`.
    """


@flashmoe.command()
@click.argument("src", type=click.Path(file_okay=False, path_type=Path))
@click.argument("dest", required=False, type=click.Path(file_okay=False, path_type=Path))
@click.option("--expert-bits", type=click.Choice(["2", "3", "4", "8"]), default=None,
              help="Re-quantize experts to this many bits (default: keep the source's; 4 from Hugging Face)")
@click.option("--name", default=None, help="Register the result under this model name")
@click.option("--no-register", is_flag=True, help="Convert only; do not register the result")
@_friendly
def convert(src, dest, expert_bits, name, no_register):
    """Pack a published checkpoint (MLX 4-bit or Hugging Face) into DEST for streaming.

    Resumable: run the same command again after an interruption. Needs free
    disk for the output plus one layer. DEST defaults to a directory in
    llm's user directory.
    """
    from .config import load_config

    cfg = load_config(src)
    if name is None:
        name = registry.BUILTIN_NAME if cfg.num_experts == 512 else src.resolve().name.lower()
    dest = dest or registry.data_dir() / name
    from .experts.convert import convert_checkpoint

    try:
        convert_checkpoint(src, dest, expert_bits=int(expert_bits) if expert_bits else None, progress=True)
    except KeyboardInterrupt:
        raise click.ClickException(f"Interrupted: run the same command again to resume into {dest}.") from None
    if not no_register:
        registry.add(name, dest)
        click.echo(f"Registered {dest} as {name}: try  llm -m {name} 'Hello'")


@flashmoe.command()
@click.argument("directory", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--name", default=None, help="Model name for llm -m (default: the directory's name)")
@click.option("aliases", "--alias", multiple=True, help="Extra name(s) for the model")
@_friendly
def add(directory, name, aliases):
    """Register a model directory: converted (experts streamed) or published (experts in memory)."""
    from .config import load_config

    load_config(directory)  # a Qwen3.5 MoE directory, or a clear error
    if not (directory / "tokenizer.json").is_file():
        raise FlashMoeError(f"{directory} has no tokenizer.json; copy it from the original checkpoint.")
    status = _completeness(directory)
    entry = registry.add(name or directory.resolve().name.lower(), directory, aliases)
    click.echo(f"Added {entry.name} -> {entry.path} ({status})")


@flashmoe.command()
@click.argument("name")
@_friendly
def remove(name):
    """Forget a registered model (its files are kept)."""
    entry = registry.remove(name)
    click.echo(f"Removed {entry.name} (files kept in {entry.path})")


@flashmoe.command(name="list")
@click.option("json_", "--json", is_flag=True, help="Output JSON")
@_friendly
def list_(json_):
    """Registered models: path, size, layers, experts, bits, completeness."""
    rows = []
    for entry in registry.entries():
        rows.append({"name": entry.name, "aliases": list(entry.aliases), **describe(entry.path)})
    if json_:
        click.echo(json.dumps(rows, indent=2))
        return
    for row in rows:
        aliases = f" (aliases: {', '.join(row['aliases'])})" if row["aliases"] else ""
        click.echo(f"{row['name']}{aliases}")
        click.echo(f"  path: {row['path']}")
        if row["status"] == "missing":
            click.echo("  status: no files yet" + (" (see llm flashmoe info)" if row["name"] == registry.BUILTIN_NAME else ""))
            continue
        if "layers" in row:
            click.echo(
                f"  {_human_bytes(row['size_bytes'])}, {row['layers']} layers, {row['experts']} experts "
                f"(top-{row['top_k']}), {row['expert_bits']}-bit experts, {row['layout']}"
            )
        click.echo(f"  status: {row['status']}")


@flashmoe.command()
@click.argument("name_or_dir")
@_friendly
def info(name_or_dir):
    """Details of one model (a registered name or a directory)."""
    from .model import default_experts_per_token, how_to_get_397b

    label, path = _resolve_dir(name_or_dir)
    details = describe(path)
    if details["status"] == "missing":
        if label == registry.BUILTIN_NAME:
            raise FlashMoeError(how_to_get_397b(path))
        raise FlashMoeError(f"{path} does not exist.")
    click.echo(f"{label}")
    for key, value in details.items():
        if key == "size_bytes":
            key, value = "size", _human_bytes(value)
        click.echo(f"  {key}: {value}")
    if "layers" in details:
        from .config import load_config

        click.echo(f"  default experts_per_token: {default_experts_per_token(load_config(path))}")
    for name in ("generation_config.json", "chat_template.jinja"):
        click.echo(f"  {name}: {'yes' if (path / name).is_file() else 'no'}")


@flashmoe.command()
@click.argument("name_or_dir")
@_friendly
def verify(name_or_dir):
    """Check every expert's checksum in a converted directory."""
    _label, path = _resolve_dir(name_or_dir)
    from .experts.verify import verify_model

    report = verify_model(path, progress=True)
    click.echo(str(report))
    if not report.ok:
        sys.exit(1)


@flashmoe.command(context_settings={"ignore_unknown_options": True})
@click.argument("name_or_dir")
@click.argument("bench_args", nargs=-1, type=click.UNPROCESSED)
@_friendly
def bench(name_or_dir, bench_args):
    """Measure decode and prompt speed, cold and warm, on this machine.

    Extra arguments go to the benchmark (`python -m llm_flashmoe.bench --help`).
    `llm flashmoe bench NAME gpu upload|check|decode` runs the GPU expert-cache
    benchmarks instead (CUDA; `python -m llm_flashmoe.experts.gpu_bench --help`).
    """
    _label, path = _resolve_dir(name_or_dir)
    if bench_args[:1] == ("gpu",):
        from .experts.gpu_bench import main as gpu_main

        rest = list(bench_args[1:]) or ["--help"]
        code = gpu_main([rest[0], "--packed", str(path), *rest[1:]] if rest[0] in ("upload", "check", "decode")
                        else rest)
        if code:
            sys.exit(code)
        return
    from .bench import main

    code = main([str(path), *bench_args])
    if code:
        sys.exit(code)


@flashmoe.command()
@click.argument("dest", type=click.Path(file_okay=False, path_type=Path))
@click.option("--preset", type=click.Choice(["tiny", "397b"]), default="tiny", show_default=True)
@click.option("--layout", type=click.Choice(["hf", "mlx", "packed"]), default="hf", show_default=True,
              help="hf: Hugging Face bf16; mlx: MLX 4-bit as published; packed: converted, experts streamed")
@click.option("--layers", type=int, default=None, help="Number of layers (default: the preset's)")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--name", default=None, help="Also register it under this model name")
@_friendly
def synth(dest, preset, layout, layers, seed, name):
    """Write a synthetic checkpoint (real shapes and tokenizer, random weights)."""
    from .synth import write_synthetic

    out = write_synthetic(dest, preset=preset, layout=layout, layers=layers, seed=seed, progress=True)
    click.echo(str(out))
    if name:
        registry.add(name, out)
        click.echo(f"Registered as {name}")


@flashmoe.command()
@click.argument("name_or_dir")
@click.argument("messages", type=click.File("r"))
@click.option("--tools", "tools_file", type=click.File("r"), default=None,
              help="JSON list of tools (OpenAI form or {name, description, parameters})")
@click.option("--thinking/--no-thinking", default=True, show_default=True)
@_friendly
def render(name_or_dir, messages, tools_file, thinking):
    """Print the exact prompt the model reads for MESSAGES (a JSON file, - for stdin).

    The token count goes to stderr.
    """
    from .chat import render_conversation

    _label, path = _resolve_dir(name_or_dir)

    def read(handle, what):
        try:
            return json.load(handle)
        except ValueError as error:
            raise FlashMoeError(f"{what} is not valid JSON: {error}")

    text, n_tokens = render_conversation(
        path, read(messages, "MESSAGES"), read(tools_file, "--tools") if tools_file else [], thinking
    )
    click.echo(text, nl=False)
    click.echo(f"\n[{n_tokens} tokens]", err=True)


DEMO_PROMPT = "Tell me about the sea."


@flashmoe.command()
@click.option("--prompt", default=DEMO_PROMPT, show_default=True)
@click.option("--max-tokens", type=int, default=24, show_default=True)
@_friendly
def demo(prompt, max_tokens):
    """Make (once) and run a tiny synthetic model: checks the whole path, no download."""
    import llm

    from .model import stats_line
    from .synth import write_synthetic

    dest = registry.data_dir() / "tiny"
    if not (dest / "tokenizer.json").is_file():
        click.echo(f"Writing a tiny synthetic model to {dest} (once)...", err=True)
        partial = dest.with_name("tiny.partial")
        shutil.rmtree(partial, ignore_errors=True)
        write_synthetic(partial, preset="tiny", layout="hf", progress=False)
        shutil.rmtree(dest, ignore_errors=True)
        partial.rename(dest)
    registry.add(registry.TINY_NAME, dest)
    click.echo(
        f"{registry.TINY_NAME}: real Qwen3.5 architecture and tokenizer, random weights, "
        "so expect random text.\n",
        err=True,
    )
    model = llm.get_model(registry.TINY_NAME)
    response = model.prompt(prompt, thinking=False, max_tokens=max_tokens, seed=0)
    try:
        for chunk in response:
            click.echo(chunk, nl=False)
    except llm.ModelError as error:
        raise FlashMoeError(str(error))
    click.echo()
    click.echo(stats_line(response.response_json or {}), err=True)
    click.echo(f"\nNext: llm -m {registry.TINY_NAME} 'hi'   |   llm chat -m {registry.TINY_NAME}", err=True)
