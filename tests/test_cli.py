"""`llm flashmoe ...` commands through llm's CLI."""

from __future__ import annotations

import json
import os

import pytest
from click.testing import CliRunner
from llm.cli import cli

from llm_flashmoe import registry


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("LLM_USER_PATH", str(tmp_path / "llm"))
    return tmp_path / "llm"


def invoke(*args, input=None):
    return CliRunner().invoke(cli, list(args), input=input)


def test_add_list_info_remove(home, tiny_hf):
    result = invoke("flashmoe", "add", str(tiny_hf), "--name", "mini", "--alias", "m2")
    assert result.exit_code == 0 and "complete" in result.output, result.output
    assert "FlashMoE: mini (aliases: m2)" in invoke("models").output

    rows = {r["name"]: r for r in json.loads(invoke("flashmoe", "list", "--json").output)}
    assert rows["qwen3.5-397b-flash"]["status"] == "missing"
    mini = rows["mini"]
    assert mini["aliases"] == ["m2"] and mini["status"] == "complete"
    assert (mini["layers"], mini["experts"], mini["top_k"], mini["expert_bits"]) == (8, 64, 4, 16)
    assert mini["size_bytes"] > 100e6
    assert "8 layers, 64 experts" in invoke("flashmoe", "list").output

    result = invoke("flashmoe", "info", "m2")
    assert result.exit_code == 0 and "default experts_per_token: 4" in result.output

    assert invoke("flashmoe", "remove", "mini").exit_code == 0
    assert "FlashMoE: mini" not in invoke("models").output


def test_user_errors_are_one_paragraph(home, tmp_path):
    (tmp_path / "empty").mkdir()
    for args in (["add", str(tmp_path / "empty")], ["remove", "nothing"], ["info", "nothing"],
                 ["info", "qwen3.5-397b-flash"], ["render", "nothing", "-"]):
        result = invoke("flashmoe", *args, input="[]")
        text = result.output.strip()
        assert result.exit_code == 1 and text.startswith("Error:") and "\n\n" not in text, (args, text)
    assert registry.PUBLISHED_CHECKPOINT in invoke("flashmoe", "info", "flashmoe").output


def test_render_prints_the_prompt(home, tiny_hf):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    result = CliRunner().invoke(cli, ["flashmoe", "render", str(tiny_hf), "-", "--no-thinking"],
                                input=json.dumps(messages))
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>")
    assert result.stdout.endswith("<think>\n\n</think>\n\n")
    assert "tokens]" in result.stderr


def test_convert_registers_and_verify_checks(home, tiny_hf, tmp_path, monkeypatch):
    dest = tmp_path / "packed"
    result = invoke("flashmoe", "convert", str(tiny_hf), str(dest), "--name", "packed-tiny")
    assert result.exit_code == 0, result.output
    assert registry.get("packed-tiny").path == dest.resolve()
    result = invoke("flashmoe", "verify", "packed-tiny")
    assert result.exit_code == 0 and "OK" in result.output, result.output
    # the GPU expert-cache benchmarks: refused without a GPU, run with the host transport forced
    result = invoke("flashmoe", "bench", "packed-tiny", "gpu", "check", "--steps", "2")
    assert result.exit_code == 1 and "no GPU expert cache" in result.output, result.output
    monkeypatch.setenv("FLASHMOE_CACHE_TRANSPORT", "host")
    for f in dest.glob("experts-*.bin"):   # cold: the reference's reads land while it computes
        fd = os.open(f, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
    result = invoke("flashmoe", "bench", "packed-tiny", "gpu", "check", "--steps", "2")
    monkeypatch.delenv("FLASHMOE_CACHE_TRANSPORT")
    assert result.exit_code == 0, result.output
    assert result.output.count("logits identical to the uncached store") == 2 and ": NO" not in result.output
    (dest / "complete").unlink()
    result = invoke("flashmoe", "verify", str(dest))
    assert result.exit_code == 1 and "unfinished conversion" in result.output


def test_demo_runs_the_tiny_model(home, tiny_hf):
    # The demo writes its model once; here the session's copy stands in for it.
    (home / "flashmoe").mkdir(parents=True)
    (home / "flashmoe" / "tiny").symlink_to(tiny_hf)
    result = invoke("flashmoe", "demo", "--max-tokens", "4")
    assert result.exit_code == 0, result.output
    assert "random weights" in result.stderr and "4 tokens at" in result.stderr
    # an unconverted model keeps its experts in memory: its line says so, not "0.0 MB read"
    assert "experts used, all held in memory" in result.stderr and "MB, 0 from page cache" not in result.stderr
    assert result.stdout.strip()
    assert registry.TINY_NAME in invoke("models").output


def test_stats_line_names_reads_only_where_experts_were_read():
    from llm_flashmoe.model import stats_line

    streamed = {"generated_tokens": 5, "experts_read": 240, "expert_bytes": 1_770_000_000,
                "expert_page_cache_hits": 200, "expert_gpu_cache_hits": 16}
    line = stats_line(streamed)
    assert "240 experts read (1770.0 MB, 200 from page cache, 16 more found in the GPU cache)" in line
    all_gpu = stats_line({**streamed, "experts_read": 0, "expert_bytes": 0})
    assert "0 experts read (0.0 MB, 200 from page cache, 16 more found in the GPU cache)" in all_gpu
    resident = stats_line({"generated_tokens": 5, "experts_read": 40, "expert_bytes": 0})
    assert "40 experts used, all held in memory" in resident and "read" not in resident
