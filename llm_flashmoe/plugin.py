"""llm's hooks: the models in the registry, and the `llm flashmoe` commands.

llm imports this on every start (`llm --help` included), so it imports only
llm, click and our registry; mlx, numpy and tokenizers load when a model runs.
"""

from __future__ import annotations

import llm


@llm.hookimpl
def register_models(register):
    from . import registry
    from .errors import FlashMoeError
    from .model import FlashMoeModel

    try:
        entries = registry.entries()
    except FlashMoeError:
        # A broken flashmoe.json must not break every llm command;
        # `llm flashmoe list` reports it.
        entries = [registry.Entry(registry.BUILTIN_NAME, registry.default_builtin_dir(), registry.BUILTIN_ALIASES)]
    for entry in entries:
        register(FlashMoeModel(entry.name, entry.path), aliases=entry.aliases)


@llm.hookimpl
def register_commands(cli):
    from .cli import flashmoe

    cli.add_command(flashmoe)
