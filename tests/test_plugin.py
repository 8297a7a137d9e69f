"""The llm model through llm's own CLI: prompts, chat, -c, options, logs, errors.

Every test runs `llm` in-process with click's CliRunner, `LLM_USER_PATH` in
a temporary directory and the session's `tiny` model registered as
`flashmoe-tiny`. The loaded model is cached per process exactly as in real
use; `forget_loaded_models()` stands in for a new process.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner
from llm.cli import cli

from llm_flashmoe import registry

# Short answers: the tiny model is random, only the plumbing is under test.
# A thinking budget of 2 forces </think> early, so every turn has an answer.
FAST = ["-o", "max_tokens", "8", "-o", "thinking_budget", "2"]


@pytest.fixture
def llm_home(tmp_path, monkeypatch, tiny_hf):
    monkeypatch.setenv("LLM_USER_PATH", str(tmp_path / "llm"))
    registry.add(registry.TINY_NAME, tiny_hf)
    return tmp_path / "llm"


def run(*args, input=None):
    result = CliRunner().invoke(cli, list(args), input=input, catch_exceptions=False)
    return result


def logs(*args) -> list[dict]:
    result = run("logs", "--json", "-n", "0", *args)
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def expected_sha(model_dir, messages, thinking=True, tools=()) -> str:
    from llm_flashmoe.chat import load_chat_template, render_prompt

    text = render_prompt(messages, list(tools), thinking=thinking, template=load_chat_template(model_dir))
    return hashlib.sha256(text.encode()).hexdigest()


def test_prompt_streams_and_is_logged(llm_home):
    result = run("-m", "flashmoe-tiny", "hi", *FAST, "-o", "seed", "0")
    assert result.exit_code == 0, result.output
    [row] = logs()
    assert row["model"] == "flashmoe-tiny"
    assert row["options_json"] == {"max_tokens": 8, "thinking_budget": 2, "seed": 0}
    assert row["input_tokens"] == row["response_json"]["prompt_tokens"] > 0
    assert row["output_tokens"] == 8
    stats = row["response_json"]
    for key in ("decode_tokens_per_second", "prompt_tokens_per_second", "time_to_first_token_s", "experts_read",
                "expert_bytes", "expert_page_cache_hits", "peak_memory_bytes", "finish_reason"):
        assert key in stats
    assert stats["experts_per_token"] == 4 and stats["experts_read"] > 0
    # Reasoning is kept apart from the answer; the answer is what was printed.
    assert row["reasoning"] and row["response"]
    assert row["response"] in result.output


def test_chat_reuses_state_and_continue_rebuilds_the_same_prompt(llm_home, tiny_hf):
    result = run("chat", "-m", "flashmoe-tiny", "-s", "Be brief.", *FAST, input="one\ntwo\nthree\nquit\n")
    assert result.exit_code == 0, result.output
    turns = logs()
    assert [t["prompt"] for t in turns] == ["one", "two", "three"]
    assert len({t["conversation_id"] for t in turns}) == 1
    assert all(t["response"].strip() for t in turns), "every turn answers"
    first, *later = [t["response_json"] for t in turns]
    assert first["cached_prompt_tokens"] == 0
    for previous, stats in zip([first] + later, later):
        # Only the new tokens ran: the last answer as rendered, the new user
        # turn and the generation prompt; everything before came from the cache.
        assert stats["cached_prompt_tokens"] >= previous["prompt_tokens"] - 8
        assert stats["processed_prompt_tokens"] < 60

    def history(rows):
        from llm_flashmoe.chat import Message

        messages = [Message("system", "Be brief.")]
        for row in rows:
            messages += [Message("user", row["prompt"]), Message("assistant", row["response"])]
        return messages

    from llm_flashmoe.chat import Message

    assert turns[2]["response_json"]["prompt_sha256"] == expected_sha(tiny_hf, history(turns[:2]) + [Message("user", "three")])

    # A new process: llm -c rebuilds the conversation from the log alone.
    proc = subprocess.run([sys.executable, "-m", "llm", "-c", "four", *FAST], capture_output=True, text=True,
                          env={**os.environ, "LLM_USER_PATH": str(llm_home)}, timeout=300)
    assert proc.returncode == 0, proc.stderr
    fourth = logs()[-1]
    assert fourth["conversation_id"] == turns[0]["conversation_id"]
    stats = fourth["response_json"]
    assert stats["cached_prompt_tokens"] == 0 and stats["processed_prompt_tokens"] == stats["prompt_tokens"]
    assert stats["prompt_sha256"] == expected_sha(tiny_hf, history(turns) + [Message("user", "four")])
    # Back in this process, -c picks up the turn the other process added,
    # reusing the state this process kept from turn 3.
    result = run("-c", "five", *FAST)
    fifth = logs()[-1]["response_json"]
    assert fifth["cached_prompt_tokens"] >= turns[2]["response_json"]["prompt_tokens"] - 8
    assert fifth["prompt_sha256"] == expected_sha(tiny_hf, history(logs()[:4]) + [Message("user", "five")])


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("top_p", "2", "top_p"),
        ("temperature", "-1", "temperature"),
        ("top_k", "-3", "top_k"),
        ("min_p", "1.5", "min_p"),
        ("seed", "-1", "seed"),
        ("max_tokens", "0", "max_tokens"),
        ("thinking", "maybe", "thinking"),
        ("thinking_budget", "-1", "thinking_budget"),
        ("experts_per_token", "0", "experts_per_token"),
        ("context_length", "0", "context_length"),
        ("stop", "", "stop"),
        ("no_such_option", "1", "no_such_option"),
    ],
)
def test_invalid_options_give_readable_errors(llm_home, option, value, message):
    result = CliRunner().invoke(cli, ["-m", "flashmoe-tiny", "hi", "-o", option, value])
    assert result.exit_code != 0
    assert message in result.output and "Traceback" not in result.output


def test_limits_checked_against_the_model(llm_home):
    result = CliRunner().invoke(cli, ["-m", "flashmoe-tiny", "hi", "-o", "experts_per_token", "9"])
    assert result.exit_code == 1 and "between 1 and this model's top-k, 4" in result.output
    result = CliRunner().invoke(cli, ["-m", "flashmoe-tiny", "hi", "-o", "context_length", "5"])
    assert result.exit_code == 1 and "reaches the context_length of 5" in result.output


def test_seed_reproducible_and_stop_stops(llm_home):
    args = ["-m", "flashmoe-tiny", "hello", "-o", "thinking", "0", "-o", "max_tokens", "12", "-o", "seed", "0"]
    first, again = run(*args).output, run(*args).output
    assert first == again and first.strip()
    other = run(*args[:-1], "7").output
    assert other != first
    text = logs()[0]["response"]
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    cut = run(*args, "-o", "stop", stop)
    assert cut.exit_code == 0
    row = logs()[-1]
    assert row["response"] == text[: text.index(stop)].rstrip() or row["response"] == text[: text.index(stop)]
    assert row["response_json"]["finish_reason"] == "stop_sequence"
    # A list of stops in JSON form.
    run(*args, "-o", "stop", json.dumps(["\u0000never", stop]))
    assert logs()[-1]["response"] == row["response"]


def test_experts_per_token_changes_routing(llm_home):
    run("-m", "flashmoe-tiny", "hi", "-o", "thinking", "0", "-o", "max_tokens", "2", "-o", "experts_per_token", "2")
    stats = logs()[-1]["response_json"]
    assert stats["experts_per_token"] == 2 and stats["cached_prompt_tokens"] == 0


def test_builtin_model_listed_before_its_files_exist(llm_home):
    result = run("models")
    assert "qwen3.5-397b-flash" in result.output and "flashmoe" in result.output
    result = CliRunner().invoke(cli, ["-m", "flashmoe", "hi"])
    assert result.exit_code == 1
    assert registry.PUBLISHED_CHECKPOINT in result.output and "llm flashmoe convert" in result.output
    assert "209 GB" in result.output and "Traceback" not in result.output


def _one_paragraph(output: str) -> bool:
    text = output.strip()
    return text.startswith("Error:") and "\n\n" not in text and "Traceback" not in text


def test_broken_directories_give_one_paragraph(llm_home, tiny_hf, tmp_path):
    # Missing directory.
    registry.add("gone", tmp_path / "gone")
    result = CliRunner().invoke(cli, ["-m", "gone", "hi"])
    assert result.exit_code == 1 and _one_paragraph(result.output) and "does not exist" in result.output

    # Interrupted download or conversion: files but no config.json.
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "tokenizer.json").symlink_to(tiny_hf / "tokenizer.json")
    registry.add("partial", partial)
    result = CliRunner().invoke(cli, ["-m", "partial", "hi"])
    assert result.exit_code == 1 and _one_paragraph(result.output) and "interrupted" in result.output

    # A deleted weight file (expert weights of one layer).
    broken = tmp_path / "broken"
    broken.mkdir()
    shards = sorted(p.name for p in tiny_hf.glob("*.safetensors"))
    for item in tiny_hf.iterdir():
        if item.name != shards[2]:
            (broken / item.name).symlink_to(item)
    registry.add("broken", broken)
    result = CliRunner().invoke(cli, ["-m", "broken", "hi"])
    assert result.exit_code == 1 and _one_paragraph(result.output) and shards[2] in result.output


def test_importing_the_plugin_loads_no_engine():
    code = (
        "import sys, llm, llm.cli; before = set(sys.modules)\n"
        "import llm_flashmoe.plugin, llm_flashmoe.model, llm_flashmoe.cli, llm_flashmoe.registry\n"
        "llm.get_models_with_aliases()\n"
        "new = set(sys.modules) - before\n"
        "heavy = sorted(m for m in new if m.split('.')[0] in ('mlx', 'tokenizers', 'numpy', 'jinja2'))\n"
        "print(heavy)\n"
    )
    env = {**os.environ, "LLM_USER_PATH": os.environ.get("LLM_USER_PATH", "/tmp/flashmoe-import-test")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_pipelined_decode_through_llm_matches_step_by_step(llm_home, monkeypatch):
    """With the fused ops' twins and compiled steps (a GPU backend's configuration: decode needs no
    host round trip), `llm chat` and a prompt with a stop sequence answer the same, token for token,
    and reuse the same cached state, whether decode is pipelined or step by step."""
    from llm_flashmoe.engine.qwen35 import Qwen35Model
    from llm_flashmoe.model import forget_loaded_models

    monkeypatch.setenv("FLASHMOE_KERNELS", "twin")
    monkeypatch.setenv("FLASHMOE_COMPILE", "1")
    steps = []
    real = Qwen35Model.step
    monkeypatch.setattr(Qwen35Model, "step", lambda self, token, cache: steps.append(1) or real(self, token, cache))
    greedy = ["-o", "thinking", "0", "-o", "temperature", "0", "-o", "max_tokens", "10"]
    seen = {}
    for mode in ("0", "auto"):
        monkeypatch.setenv("FLASHMOE_PIPELINE", mode)
        forget_loaded_models()
        steps.clear()
        result = run("chat", "-m", "flashmoe-tiny", *greedy, input="one\ntwo\nquit\n")
        assert result.exit_code == 0, result.output
        chat = [(r["response"], r["response_json"]["cached_prompt_tokens"], r["response_json"]["generated_tokens"])
                for r in logs()[-2:]]
        if mode == "0":
            text = chat[0][0]
            stop = text[len(text) // 2: len(text) // 2 + 2]
        result = run("-m", "flashmoe-tiny", "one", *greedy, "-o", "stop", stop)
        assert result.exit_code == 0, result.output
        row = logs()[-1]
        seen[mode] = (chat, row["response"], row["response_json"]["finish_reason"])
        assert row["response_json"]["pipelined"] == (mode == "auto")
        assert bool(steps) == (mode == "auto"), "pipelined steps ran only when wanted"
    assert seen["auto"] == seen["0"]
    assert seen["0"][2] == "stop_sequence"


def test_a_load_whose_kernels_compile_says_so_once(tiny_hf, monkeypatch, capsys):
    from llm_flashmoe import model

    assert "CUDA kernels compile" in model.compile_notice("cuda")
    assert all(model.compile_notice(b) is None for b in ("plain", "cpu", "twin", "metal"))
    model.forget_loaded_models()
    try:
        model.load(registry.TINY_NAME, tiny_hf, None)   # this CPU's own backend: nothing to wait for
        assert "kernels compile" not in capsys.readouterr().err
        # The CUDA kernels' launchers are built at load without a GPU (they run only when called).
        monkeypatch.setenv("FLASHMOE_KERNELS", "cuda")
        model.forget_loaded_models()
        loaded = model.load(registry.TINY_NAME, tiny_hf, None)
        assert loaded.model.layers[0].ops.backend == "cuda"
        assert capsys.readouterr().err.count("CUDA kernels compile") == 1
        model.load(registry.TINY_NAME, tiny_hf, None)   # the process's loaded model again: no second notice
        assert "kernels compile" not in capsys.readouterr().err
    finally:
        model.forget_loaded_models()
