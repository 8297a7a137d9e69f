"""The llm model: options, and one prompt's path llm messages -> chat -> engine -> llm events.

`execute` renders `prompt.messages` (the whole conversation: llm 0.36 puts
`-c`/`--cid` history and tool results there) with the model's chat
template, feeds the tokens to the process's one `Session` for that model
(which skips the prefix an earlier turn already ran), and streams the
decoded output through the chat layer's parser: reasoning becomes llm
reasoning events, the answer plain text, and tool calls `llm.ToolCall`s.

Only llm and pydantic are imported at module level: `llm models` builds
these objects on every start, and must not pay for mlx or tokenizers.
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import llm
from pydantic import Field, field_validator

from . import registry
from .errors import FlashMoeError

DEFAULT_MAX_TOKENS = 8192
# What the reference program found best for the 397B (its own top-k is 10;
# K <= 3 collapsed): SPEC section 1.
DEFAULT_K_397B = 4
NUM_EXPERTS_397B = 512
# Qwen3.5's published settings for thinking mode, used when a directory has
# no generation_config.json.
FALLBACK_SAMPLING = {"temperature": 0.6, "top_p": 0.95, "top_k": 20, "min_p": 0.0}
DISK_NEEDED = "about 209 GB for the converted model, plus room for one layer (about 3.5 GB) while converting"

# Tests only: extra logits processors `fn(generated_ids, logits) -> logits`,
# run after the model's own, to steer the real engine's output (for example
# into the exact tokens of a tool call). Never set outside tests.
TEST_LOGITS_PROCESSORS: list = []


def how_to_get_397b(model_dir: Path) -> str:
    return (
        f"{registry.BUILTIN_NAME} has no model files yet (looked in {model_dir}). "
        f"Download the published MLX 4-bit checkpoint {registry.PUBLISHED_CHECKPOINT} "
        f"(`hf download {registry.PUBLISHED_CHECKPOINT} --local-dir SRC`), then run "
        f"`llm flashmoe convert SRC DEST`, which packs its experts for streaming from SSD and "
        f"registers DEST as {registry.BUILTIN_NAME}; it needs {DISK_NEEDED}, and SRC can be "
        f"deleted afterwards. A directory converted earlier can be registered with "
        f"`llm flashmoe add DEST --name {registry.BUILTIN_NAME}`. To try the plugin without "
        f"any download: `llm flashmoe demo`."
    )


class FlashMoeOptions(llm.Options):
    max_tokens: Optional[int] = Field(
        None, ge=1, description=f"Most tokens to generate, reasoning included (default {DEFAULT_MAX_TOKENS})"
    )
    temperature: Optional[float] = Field(
        None, ge=0, le=2, description="Sampling temperature; 0 is greedy (default: the model's, 0.6)"
    )
    top_p: Optional[float] = Field(
        None, gt=0, le=1, description="Nucleus sampling: keep the most likely tokens up to this mass (default 0.95)"
    )
    top_k: Optional[int] = Field(None, ge=0, description="Sample among the k most likely tokens; 0: no limit (default 20)")
    min_p: Optional[float] = Field(
        None, ge=0, le=1, description="Drop tokens less likely than min_p times the most likely one (default 0)"
    )
    seed: Optional[int] = Field(None, ge=0, description="Random seed for reproducible sampling (0 is a valid seed)")
    stop: Optional[Union[str, list[str]]] = Field(
        None, description='Stop the answer where this text appears (a string, or a JSON list such as \'["a", "b"]\')'
    )
    thinking: Optional[bool] = Field(None, description="Let the model think before answering (default on)")
    thinking_budget: Optional[int] = Field(
        None, ge=0, description="Most reasoning tokens; then </think> is forced so an answer comes"
    )
    experts_per_token: Optional[int] = Field(
        None, ge=1, description="Experts per token, K (default 4 for the 397B, else the model's own top-k)"
    )
    context_length: Optional[int] = Field(
        None, ge=1, description="Most tokens of conversation plus answer (default: the model's limit)"
    )
    constrain_tools: Optional[bool] = Field(
        None, description="Mask tokens that would break a tool call's format or argument types (default on)"
    )

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value):
        if value is None:
            return None
        if isinstance(value, str) and value.startswith("["):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                pass  # a literal string that starts with "["
        stops = [value] if isinstance(value, str) else list(value)
        if not stops or any(not isinstance(s, str) or not s for s in stops):
            raise ValueError("stop must be a non-empty string or a list of non-empty strings")
        return stops if len(stops) > 1 or not isinstance(value, str) else value


@dataclass
class LoadedModel:
    """One model directory loaded in this process, with its one conversation state."""

    path: Path
    model: object          # engine.qwen35.Qwen35Model
    tokenizer: object      # chat.ChatTokenizer
    template: str | None   # the directory's chat template (None: built-in renderer)
    sampling: dict         # defaults from generation_config.json
    session: object        # engine.generate.Session


# Loaded models by directory. At most one is kept: a second one would double
# the resident weights (about 6 GB for the 397B).
_LOADED: dict[Path, LoadedModel] = {}


def compile_notice(backend: str) -> str | None:
    """The line shown when a process loads a model on `backend`, if its first answer will wait for
    kernels to compile: on CUDA, MLX compiles each fused kernel with NVRTC in every process (MLX
    0.32.4 keeps only its own kernels on disk), about 20 s a process on an H200."""
    if backend != "cuda":
        return None
    return ("llm-flashmoe: this process's first answer waits while the CUDA kernels compile (about 20 s on an "
            "H200; a machine's first run also compiles MLX's own kernels, a few minutes, which MLX keeps on disk). "
            "`llm chat` pays it once a session.")


def forget_loaded_models() -> None:
    """Drop the cached models, as a new process would start (tests use this)."""
    _LOADED.clear()


def default_experts_per_token(cfg) -> int:
    if cfg.num_experts == NUM_EXPERTS_397B:
        return min(DEFAULT_K_397B, cfg.num_experts_per_tok)
    return cfg.num_experts_per_tok


def _sampling_defaults(model_dir: Path) -> dict:
    defaults = dict(FALLBACK_SAMPLING)
    path = model_dir / "generation_config.json"
    if path.is_file():
        try:
            published = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise FlashMoeError(f"{path} is not valid JSON ({error}); copy it again from the checkpoint.") from error
        for key in defaults:
            if isinstance(published.get(key), (int, float)) and not isinstance(published.get(key), bool):
                defaults[key] = published[key]
    return defaults


def check_model_dir(name: str, model_dir: Path) -> None:
    """A one-paragraph error for a directory that cannot be a model (before loading anything)."""
    if not model_dir.is_dir() or not any(model_dir.iterdir()):
        if name == registry.BUILTIN_NAME:
            raise FlashMoeError(how_to_get_397b(model_dir))
        raise FlashMoeError(
            f"The directory of model {name}, {model_dir}, does not exist or is empty. If it moved, "
            f"run `llm flashmoe add NEW_DIR --name {name}`; to forget it, `llm flashmoe remove {name}`."
        )
    from .experts import format as expert_format

    if expert_format.is_packed_dir(model_dir) and expert_format.conversion_status(model_dir) != "complete":
        expert_format.read_manifest(model_dir)  # raises the message saying how to resume
    if not (model_dir / "config.json").is_file():
        raise FlashMoeError(
            f"{model_dir} has no config.json, so it is not a complete model directory (an interrupted "
            "download or conversion?). Finish the download, or run `llm flashmoe convert` again: it resumes."
        )


def load(name: str, model_dir: Path, experts_per_token: int | None) -> LoadedModel:
    """The process's loaded model for `model_dir` (loading it once), with K set."""
    model_dir = model_dir.resolve()
    loaded = _LOADED.get(model_dir)
    if loaded is None:
        from .chat import load_chat_template, load_tokenizer
        from .config import load_config
        from .engine.generate import Session
        from .engine.load import load_model

        check_model_dir(name, model_dir)
        cfg = load_config(model_dir)
        k = experts_per_token or default_experts_per_token(cfg)
        _check_k(cfg, k)
        tokenizer = load_tokenizer(model_dir)
        template = load_chat_template(model_dir)
        sampling = _sampling_defaults(model_dir)
        _LOADED.clear()
        model = load_model(model_dir, experts_per_token=k)
        ops = model.layers[0].ops if model.layers else None
        notice = compile_notice(ops.backend if ops is not None else "plain")
        if notice:
            print(notice, file=sys.stderr)
        loaded = LoadedModel(model_dir, model, tokenizer, template, sampling, Session(model))
        _LOADED[model_dir] = loaded
    else:
        k = experts_per_token or default_experts_per_token(loaded.model.cfg)
        _set_experts_per_token(loaded, k)
    return loaded


def _check_k(cfg, k: int) -> None:
    if not 1 <= k <= cfg.num_experts_per_tok:
        raise FlashMoeError(
            f"experts_per_token must be between 1 and this model's top-k, {cfg.num_experts_per_tok}; "
            f"got {k}. Fewer experts read less from disk (4 works well for the 397B; 3 or fewer degrade it)."
        )


def _set_experts_per_token(loaded: LoadedModel, k: int) -> None:
    model = loaded.model
    if model.experts_per_token == k:
        return
    _check_k(model.cfg, k)
    model.set_experts_per_token(k)
    # States computed with another K would mix two models' outputs.
    loaded.session.reset()


# --- llm messages -> chat messages -------------------------------------------


def chat_messages(llm_messages) -> list:
    """llm's `prompt.messages` as the chat layer's `Message`s, the system prompt once."""
    from llm.parts import AttachmentPart, ReasoningPart, TextPart, ToolCallPart, ToolResultPart

    from .chat import Message, ToolCall

    result = []
    for message in llm_messages:
        text = "".join(p.text for p in message.parts if isinstance(p, TextPart))
        if any(isinstance(p, AttachmentPart) for p in message.parts):
            raise FlashMoeError("Attachments are not supported: Qwen3.5 flash models read text only.")
        if message.role == "system":
            # llm carries the system prompt forward in each turn's chain;
            # the model should read it once.
            if text.strip() and not any(m.role == "system" and m.content == text for m in result):
                result.append(Message("system", text))
        elif message.role == "user":
            result.append(Message("user", text))
        elif message.role == "assistant":
            reasoning = "".join(p.text for p in message.parts if isinstance(p, ReasoningPart) and not p.redacted)
            calls = [
                ToolCall(p.tool_call_id, p.name, dict(p.arguments or {}))
                for p in message.parts
                if isinstance(p, ToolCallPart)
            ]
            result.append(Message("assistant", text, reasoning=reasoning or None, tool_calls=calls))
        elif message.role == "tool":
            for part in message.parts:
                if isinstance(part, ToolResultPart):
                    output = part.output if part.output else (f"Error: {part.exception}" if part.exception else "")
                    result.append(Message("tool", output, tool_call_id=part.tool_call_id, name=part.name))
    return result


def tool_specs(llm_tools) -> list:
    from .chat import ToolSpec

    specs = []
    for tool in llm_tools or ():
        schema = getattr(tool, "input_schema", None) or {"type": "object", "properties": {}}
        specs.append(ToolSpec(tool.name, getattr(tool, "description", "") or "", schema))
    return specs


# --- stop strings ---------------------------------------------------------------


class StopMatcher:
    """Cuts streamed text at the first stop string, holding back what could start one."""

    def __init__(self, stops: list[str]):
        self.stops = stops
        self.held = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        if not self.stops or self.stopped:
            return "" if self.stopped else text
        self.held += text
        hits = [i for i in (self.held.find(s) for s in self.stops) if i != -1]
        if hits:
            out, self.held, self.stopped = self.held[: min(hits)], "", True
            return out
        keep = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(self.held)), 0, -1):
                if self.held.endswith(stop[:n]):
                    keep = max(keep, n)
                    break
        out = self.held[: len(self.held) - keep]
        self.held = self.held[len(self.held) - keep :]
        return out

    def flush(self) -> str:
        out, self.held = ("" if self.stopped else self.held), ""
        return out


# --- the model --------------------------------------------------------------------


def _reasoning_event(text: str):
    from llm.parts import StreamEvent

    return StreamEvent(type="reasoning", chunk=text)


class FlashMoeModel(llm.Model):
    can_stream = True
    supports_tools = True
    supports_schema = True
    Options = FlashMoeOptions

    def __init__(self, model_id: str, model_dir: Path):
        self.model_id = model_id
        self.model_dir = Path(model_dir)

    def __str__(self) -> str:
        return f"FlashMoE: {self.model_id}"

    def execute(self, prompt, stream, response, conversation=None):
        try:
            yield from self._execute(prompt, response)
        except FlashMoeError as error:
            raise llm.ModelError(str(error)) from None

    def _execute(self, prompt, response):
        from .chat import AnswerText, OutputParser, ReasoningText, ToolCallEvent, render_prompt

        options = prompt.options
        loaded = load(self.model_id, self.model_dir, options.experts_per_token)
        cfg, tokenizer = loaded.model.cfg, loaded.tokenizer
        thinking = True if options.thinking is None else options.thinking

        messages = chat_messages(prompt.messages)
        tools = tool_specs(prompt.tools)
        text = render_prompt(messages, tools, thinking=thinking, template=loaded.template)
        ids = tokenizer.encode(text)

        context_length = options.context_length or cfg.max_position_embeddings
        if context_length > cfg.max_position_embeddings:
            raise FlashMoeError(
                f"context_length {context_length} is past this model's limit of {cfg.max_position_embeddings} tokens."
            )
        if len(ids) >= context_length:
            raise FlashMoeError(
                f"The conversation is {len(ids)} tokens long, which reaches the context_length of "
                f"{context_length}. Start a new conversation, shorten the prompt, or raise "
                f"-o context_length (this model's limit: {cfg.max_position_embeddings})."
            )
        max_tokens = min(options.max_tokens or DEFAULT_MAX_TOKENS, context_length - len(ids))

        from .engine.sampling import SamplingParams

        defaults = loaded.sampling
        params = SamplingParams(
            temperature=defaults["temperature"] if options.temperature is None else options.temperature,
            top_p=defaults["top_p"] if options.top_p is None else options.top_p,
            top_k=defaults["top_k"] if options.top_k is None else options.top_k,
            min_p=defaults["min_p"] if options.min_p is None else options.min_p,
            seed=options.seed,
        )
        # The prompt itself says whether the model starts inside <think>.
        starts_in_reasoning = text.endswith("<think>\n")
        processors = []
        if options.thinking_budget is not None:
            from .chat.thinking_budget import ThinkingBudget

            processors.append(ThinkingBudget(options.thinking_budget, starts_in_reasoning=starts_in_reasoning))
        # Tool calls and --schema answers valid by construction (constrain/).
        from .constrain import constraint_processor

        constraint = constraint_processor(
            tokenizer, tools=tools, schema=prompt.schema, max_tokens=max_tokens,
            starts_in_reasoning=starts_in_reasoning, constrain_tools=options.constrain_tools is not False,
        )
        if constraint is not None:
            processors.append(constraint)
        processors.extend(TEST_LOGITS_PROCESSORS)

        stops = options.stop
        stop = StopMatcher([stops] if isinstance(stops, str) else list(stops or []))
        parser = OutputParser(tools, starts_in_reasoning=starts_in_reasoning)
        decoder = tokenizer.stream_decoder()
        session = loaded.session
        calls = []

        def events(parsed):
            for event in parsed:
                if isinstance(event, ReasoningText):
                    yield _reasoning_event(event.text)
                elif isinstance(event, AnswerText):
                    out = stop.feed(event.text)
                    if out:
                        yield out
                elif isinstance(event, ToolCallEvent) and not stop.stopped:
                    calls.append(event)

        tokens = session.generate(
            ids,
            params=params,
            max_tokens=max_tokens,
            stop_token_ids=sorted(set(tokenizer.eos_token_ids) | set(cfg.eos_token_ids)),
            logits_processors=processors,
            vocab_size=tokenizer.vocab_size,
        )
        try:
            for token in tokens:
                yield from events(parser.feed(decoder.add(token)))
                if stop.stopped:
                    break
        finally:
            tokens.close()
        if not stop.stopped:
            yield from events(parser.feed(decoder.flush()))
            yield from events(parser.finish())
            tail = stop.flush()
            if tail:
                yield tail

        for call in calls:
            response.add_tool_call(llm.ToolCall(name=call.name, arguments=call.arguments))
        stats = session.stats
        finish_reason = "stop_sequence" if stop.stopped else ("tool_calls" if calls else stats.finish_reason)
        details = {"cached_prompt_tokens": stats.prompt_tokens - stats.processed_tokens}
        response.set_usage(input=stats.prompt_tokens, output=stats.generated_tokens, details=details)
        response.response_json = {
            **stats.as_dict(),
            "finish_reason": finish_reason,
            "experts_per_token": loaded.model.experts_per_token,
            "sampling": {"temperature": params.temperature, "top_p": params.top_p, "top_k": params.top_k,
                         "min_p": params.min_p, "seed": params.seed},
            "thinking": thinking,
            # Identifies the exact prompt text without storing it again each turn.
            "prompt_sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
            "tool_call_warnings": [w for c in calls for w in c.warnings],
            "model_dir": str(loaded.path),
        }


def stats_line(stats: dict) -> str:
    """One line for humans from a response_json / GenerationStats.as_dict()."""
    mb = stats.get("peak_memory_bytes", 0) / 1e6
    n, nbytes, gpu_hits = stats.get("experts_read", 0), stats.get("expert_bytes", 0), stats.get("expert_gpu_cache_hits")
    if n and not nbytes and not gpu_hits:   # a model whose experts all stay in memory (an unconverted one)
        experts = f"{n} experts used, all held in memory"
    else:
        experts = (f"{n} experts read ({nbytes / 1e6:.1f} MB, {stats.get('expert_page_cache_hits', 0)} from page cache"
                   + (f", {gpu_hits} more found in the GPU cache" if gpu_hits else "") + ")")
    return (
        f"{stats.get('generated_tokens', 0)} tokens at {stats.get('decode_tokens_per_second', 0):.2f} tok/s; "
        f"prompt {stats.get('prompt_tokens', 0)} tokens ({stats.get('cached_prompt_tokens', 0)} cached) "
        f"at {stats.get('prompt_tokens_per_second', 0):.1f} tok/s; "
        f"first token after {stats.get('time_to_first_token_s', 0):.2f} s; {experts}; peak memory {mb:.0f} MB"
    )
