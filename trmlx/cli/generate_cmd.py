"""`trmlx generate RUN_DIR --prompt "..."`: stream a completion from a fine-tuned model (or `--interactive`).

The prompt is formatted exactly as in training (template, task prefix or chat template) unless `--raw`. When stdout
is not a terminal only the generated text is printed, so the output can be piped.
"""

from __future__ import annotations

import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import click

from trmlx.cli.common import console, emit, json_option
from trmlx.cli.eval_cmd import Target, resolve_target
from trmlx.errors import UserError
from trmlx.recipe.schema import BACKEND_NAMES

if TYPE_CHECKING:
    from trmlx.backend import Backend, GenerationSettings, LoadedModel


def _model_target(model_path: str, backend: str | None) -> Target:
    """A bare model folder, no run and no adapter: default recipe fields, so the prompt is used as written; the
    task (causal or seq2seq) is the model's own kind, read from its config.json."""
    from trmlx.models import check_model_folder, folder_kind
    from trmlx.recipe.schema import ModelConfig, Recipe

    path = Path(model_path).expanduser()
    if not path.exists():
        raise UserError(f"--model: {model_path}: no such folder; expected a Hugging Face model folder")
    path = path.resolve()
    if not path.is_dir():
        check_model_folder(str(path), key="--model")  # the one-line "a file; expected a model folder"
    found = folder_kind(path, "--model")
    if found.kind == "embedding":
        raise UserError(f"--model: {model_path}: model_type {found.model_type!r} is an embedding model (an "
                        "encoder): it turns text into vectors and does not generate; use it in an embedding recipe "
                        "(task = \"embedding\") with trmlx search RECIPE --corpus FILE QUERY, or trmlx eval RECIPE")
    check_model_folder(str(path), found.kind, key="--model")
    return Target(Recipe(name=path.name, task=found.kind, model=ModelConfig(path=str(path))), None,
                  backend or "mlx", None)


def prompt_ids(text: str, target: Target, tokenizer: Any, raw: bool, chat: bool = False) -> list[int]:
    """Token ids of a user prompt: as is with --raw; a user turn in the chat template when the model was trained on
    conversations (`chat`, see trains_on_conversations); else formatted like a training record whose input is text."""
    from trmlx.data.chat import chat_prompt_ids
    from trmlx.data.examples import encode_prompt, format_example
    from trmlx.data.prepare import Record

    if chat and not raw:
        return chat_prompt_ids([{"role": "user", "content": text}], tokenizer, "--prompt")
    if not raw:
        record = Record({"source": text, "input": text, "target": ""}, origin="--prompt")
        try:
            text, _ = format_example(record, target.recipe, tokenizer)
        except KeyError as err:
            raise UserError(f"the recipe's template uses {{{err.args[0]}}}, which a single --prompt cannot fill; "
                            "pass --raw and write the whole prompt") from None
    return encode_prompt(text, tokenizer)


def _complete(backend: "Backend", loaded: "LoadedModel", ids: list[int], settings: "GenerationSettings",
              seed: int | None, write: Callable[[str], None]) -> dict[str, Any]:
    """Stream one completion through `write`, stopping at a stop string; return its text and speed."""
    from trmlx.evaluate import StreamDecoder

    decoder = StreamDecoder(loaded.tokenizer, settings.stop)
    pieces: list[str] = []
    start = time.perf_counter()
    for token in backend.stream(loaded, ids, replace(settings, seed=seed)):
        pieces.append(decoder.push(token))
        write(pieces[-1])
        if decoder.stopped:
            break
    pieces.append(decoder.flush())
    write(pieces[-1])
    seconds = time.perf_counter() - start
    count = len(decoder.ids)
    return {"text": "".join(pieces), "tokens": count, "seconds": round(seconds, 4),
            "tokens_per_second": round(count / seconds, 2) if seconds > 0 else None}


@click.command("generate")
@click.argument("target", required=False, metavar="[RUN_DIR|RECIPE]")
@click.option("--prompt", "-p", default=None, help="Text to complete (formatted like the training prompts).")
@click.option("--interactive", "-i", is_flag=True, help="Read prompts in a loop; `exit` or end of input quits.")
@click.option("--model", "model_path", default=None, metavar="DIR",
              help="A model folder to use without a run (no adapter, prompt used as written); its config.json says "
                   "whether it runs as a decoder LM or an encoder-decoder (T5/mT5).")
@click.option("--adapter", type=click.Path(file_okay=False), default=None,
              help="PEFT or mlx-lm adapter folder (default RUN_DIR/adapter).")
@click.option("--no-adapter", is_flag=True, help="Use the base model of the run, without its adapter.")
@click.option("--raw", is_flag=True, help="Send the prompt text as is: no template, prefix or chat formatting.")
@click.option("--backend", type=click.Choice(BACKEND_NAMES), default=None,
              help="Framework to run on (default: the run's backend, else mlx).")
@click.option("--temperature", type=click.FloatRange(min=0), default=None,
              help="0 = greedy (default eval.temperature).")
@click.option("--top-k", type=click.IntRange(min=0), default=None,
              help="Sample from the k most likely tokens; 0 = off.")
@click.option("--top-p", type=click.FloatRange(0, 1), default=None, help="Nucleus sampling threshold; 1 = off.")
@click.option("--repetition-penalty", type=click.FloatRange(min=0.5, max=3), default=None,
              help="> 1 discourages repeating the last 20 tokens.")
@click.option("--max-tokens", type=click.IntRange(min=1), default=None,
              help="Most new tokens (default eval.max_new_tokens).")
@click.option("--stop", multiple=True, help="Stop before this text (repeatable).")
@click.option("--seed", type=int, default=None, help="Seed for sampling, for reproducible output.")
@json_option
def generate(target: str | None, prompt: str | None, interactive: bool, model_path: str | None,
             adapter: str | None, no_adapter: bool, raw: bool, backend: str | None, temperature: float | None,
             top_k: int | None, top_p: float | None, repetition_penalty: float | None, max_tokens: int | None,
             stop: tuple[str, ...], seed: int | None, as_json: bool) -> None:
    """Complete a prompt with a run's model and adapter, streaming tokens as they come."""
    from trmlx.backend import get_backend
    from trmlx.data.prepare import trains_on_conversations
    from trmlx.evaluate import generation_settings

    if (prompt is None) == (not interactive):
        raise UserError("give --prompt TEXT or --interactive (one of them)")
    if interactive and as_json:
        raise UserError("--json prints one result; use it with --prompt, not --interactive")
    if model_path and target:
        raise UserError("give a RUN_DIR/RECIPE or --model PATH, not both")
    if model_path:
        if adapter:
            raise UserError("--model runs a bare model; to add an adapter give a RUN_DIR or RECIPE with --adapter")
        resolved = _model_target(model_path, backend)
    elif target:
        resolved = resolve_target(target, adapter, backend, use_adapter=not no_adapter)
    else:
        raise UserError("give a RUN_DIR, a RECIPE or --model PATH")
    settings = generation_settings(resolved.recipe, temperature=temperature, top_k=top_k, top_p=top_p,
                                   repetition_penalty=repetition_penalty, max_new_tokens=max_tokens,
                                   stop=tuple(stop) or None)
    runner = get_backend(resolved.backend)
    loaded = runner.load(resolved.recipe, resolved.adapter)
    chat = not raw and trains_on_conversations(resolved.recipe)  # read once, before the first prompt
    tty = sys.stdout.isatty() and not as_json

    def write(piece: str) -> None:
        if piece and not as_json:
            sys.stdout.write(piece)
            sys.stdout.flush()

    def run_once(text: str) -> dict[str, Any]:
        ids = prompt_ids(text, resolved, loaded.tokenizer, raw, chat)
        result = _complete(runner, loaded, ids, settings, seed, write)
        write("\n")
        if tty:
            console().print(f"[dim]{result['tokens']} tokens, {result['tokens_per_second'] or 0:,.1f} tokens/s"
                            "[/dim]", highlight=False)
        return result

    if not interactive:
        result = run_once(prompt)
        if as_json:
            emit({"prompt": prompt, **result}, True, lambda _: None)
        return
    while True:
        if tty:
            sys.stdout.write("> ")
            sys.stdout.flush()
        line = sys.stdin.readline()
        if not line or line.strip() == "exit":
            return
        if line.strip():
            run_once(line.rstrip("\n"))
