"""A converted (packed) directory through llm: experts streamed from disk,
and the damage a user can do to one: each a one-paragraph error."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from llm.cli import cli


@pytest.fixture(scope="module")
def packed(tiny_hf, tmp_path_factory):
    from llm_flashmoe.experts.convert import convert_checkpoint

    return convert_checkpoint(tiny_hf, tmp_path_factory.mktemp("packed") / "tiny", progress=False)


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("LLM_USER_PATH", str(tmp_path / "llm"))
    return tmp_path


def invoke(*args):
    return CliRunner().invoke(cli, list(args))


def linked_copy(src, dest, without=()):
    dest.mkdir()
    for item in src.iterdir():
        if item.name not in without:
            (dest / item.name).symlink_to(item)
    return dest


def one_paragraph_error(result) -> str:
    text = result.output.strip()
    assert result.exit_code == 1, text
    assert text.startswith("Error:") and "\n\n" not in text and "Traceback" not in text, text
    return text


def test_packed_model_streams_experts_from_disk(home, packed):
    assert invoke("flashmoe", "add", str(packed), "--name", "packed-tiny").exit_code == 0
    result = invoke("-m", "packed-tiny", "hi", "-o", "thinking", "0", "-o", "max_tokens", "4")
    assert result.exit_code == 0 and result.output.strip(), result.output
    [row] = json.loads(invoke("logs", "--json").output)
    stats = row["response_json"]
    assert stats["experts_read"] > 0 and stats["expert_bytes"] > 0 and stats["generated_tokens"] == 4


def test_damaged_packed_directories(home, packed):
    # An interrupted conversion: no `complete` marker yet.
    unfinished = linked_copy(packed, home / "unfinished", without=("complete",))
    invoke("flashmoe", "add", str(unfinished), "--name", "unfinished")
    assert "unfinished conversion" in one_paragraph_error(invoke("-m", "unfinished", "hi"))

    # A deleted expert file.
    layer_file = sorted(p.name for p in packed.glob("experts-*.bin"))[3]
    deleted = linked_copy(packed, home / "deleted", without=(layer_file,))
    invoke("flashmoe", "add", str(deleted), "--name", "deleted")
    assert layer_file in one_paragraph_error(invoke("-m", "deleted", "hi"))
    listing = json.loads(invoke("flashmoe", "list", "--json").output)
    assert {r["name"]: r["status"].split(":")[0] for r in listing}["deleted"] == "incomplete"
