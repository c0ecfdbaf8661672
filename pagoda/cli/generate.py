"""Verbs that run the model: `generate` (one completion) and `chat` (a streaming REPL)."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace

from rich.console import Console

from pagoda.cli import add_verb
from pagoda.errors import ContextLengthError, InvalidRequestError
from pagoda.hub.loader import LoadedModel, load_model
from pagoda.infer.completion import stream_text
from pagoda.infer.generate import Timings
from pagoda.infer.sampling import SamplingParams
from pagoda.tokenizer import render_chat

DEFAULT_MODEL = "smollm2-135m-instruct"
_err = Console(stderr=True)


def _sampling_options(p: argparse.ArgumentParser, max_tokens: int) -> None:
    p.add_argument("--max-tokens", type=int, default=max_tokens, help="most tokens to generate")
    p.add_argument("--temperature", type=float, default=0.7, help="0 = greedy (default 0.7)")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus mass (default 0.95)")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely (0 = off)")
    p.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min-p x top")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats")
    p.add_argument("--presence-penalty", type=float, default=0.0)
    p.add_argument("--frequency-penalty", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None, help="make sampling reproducible")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: best available)")
    p.add_argument("--dtype", default=None, help="fp32, bf16, fp16 (default: best for device)")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = add_verb(subparsers, "generate", "continue a prompt and print only the completion",
                 'pagoda generate smollm2-135m-instruct "The capital of France is" '
                 "--max-tokens 20 --temperature 0 --json", cmd_generate)
    p.add_argument("model", help="model name or path (see `pagoda list`)")
    p.add_argument("prompt", help="prompt text, or - to read it from standard input")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    p.add_argument("--system", default=None, help="system prompt (with --chat)")
    _sampling_options(p, max_tokens=128)

    p = add_verb(subparsers, "chat", "chat with a model in the terminal (streamed)",
                 'pagoda chat --system "You are a terse assistant."', cmd_chat)
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL,
                   help=f"model name or path (default {DEFAULT_MODEL}, pulled on first use)")
    p.add_argument("--system", default=None, help="system prompt")
    _sampling_options(p, max_tokens=512)


def _params(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(
        temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
        repetition_penalty=args.repetition_penalty, presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty, seed=args.seed, max_tokens=args.max_tokens,
        stop=args.stop).validated()


def _load(args: argparse.Namespace) -> LoadedModel:
    with _err.status(f"loading {args.model} ..."):
        return load_model(args.model, device=args.device, dtype=args.dtype)


def cmd_generate(args: argparse.Namespace) -> None:
    params = _params(args)  # validate before the slow load
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    if not prompt:
        raise InvalidRequestError("the prompt is empty")
    loaded = _load(args)
    tok = loaded.tokenizer
    if args.chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + \
            [{"role": "user", "content": prompt}]
        ids = tok.encode(render_chat(tok, messages), add_special_tokens=False)
    else:
        ids = tok.encode(prompt, add_special_tokens=True)
    timings, text, token_ids, finish = Timings(), [], [], None
    for delta in stream_text(loaded.model, tok, [ids], [params], timings):
        text.append(delta.text)
        token_ids.append(delta.token.token_id)
        finish = delta.finish_reason or finish
        if not args.json:
            print(delta.text, end="", flush=True)
    if args.json:
        print(json.dumps({
            "model": args.model, "text": "".join(text), "token_ids": token_ids,
            "finish_reason": finish,
            "usage": {"prompt_tokens": len(ids), "completion_tokens": len(token_ids)},
            "timings": timings.to_dict()}, ensure_ascii=False))
    else:
        print()


def _fit(loaded: LoadedModel, messages: list[dict], reserve: int) -> list[int]:
    """Token ids of the conversation, dropping the oldest turns until it fits the context."""
    tok, context = loaded.tokenizer, loaded.model.cfg.max_seq_len
    while True:
        ids = tok.encode(render_chat(tok, messages), add_special_tokens=False)
        first = 1 if messages and messages[0]["role"] == "system" else 0
        if len(ids) + reserve <= context or len(messages) - first <= 1:
            return ids
        del messages[first:first + 2]  # oldest user/assistant exchange


def cmd_chat(args: argparse.Namespace) -> None:
    params = _params(args)
    loaded = _load(args)
    system = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(system)
    out = Console(highlight=False, quiet=args.json)  # --json: one JSON line per reply only
    out.print(f"[bold]{args.model}[/] ready. /reset starts over, /exit quits "
              "(Ctrl-C stops a reply).")
    while True:
        try:
            line = input("" if args.json else ">>> ").strip()
        except EOFError:
            out.print()
            return
        if line in ("/exit", "/quit"):
            return
        if line == "/reset":
            messages = list(system)
            out.print("[dim](conversation cleared)[/]")
            continue
        if not line:
            continue
        messages.append({"role": "user", "content": line})
        ids = _fit(loaded, messages, reserve=min(params.max_tokens or 256, 256))
        room = loaded.model.cfg.max_seq_len - len(ids)  # a long reply may use what is left
        turn = replace(params, max_tokens=max(1, min(params.max_tokens or room, room)))
        reply, timings, n_tokens = [], Timings(), 0
        try:
            for delta in stream_text(loaded.model, loaded.tokenizer, [ids], [turn], timings):
                reply.append(delta.text)
                n_tokens += 1
                if not args.json:
                    print(delta.text, end="", flush=True)
        except KeyboardInterrupt:
            out.print(" [dim](stopped)[/]", end="")
        except ContextLengthError as exc:
            out.print(f"[red]{exc}[/] — use /reset")
            messages.pop()
            continue
        messages.append({"role": "assistant", "content": "".join(reply)})
        if args.json:
            print(json.dumps({"role": "assistant", "content": "".join(reply),
                              "usage": {"prompt_tokens": len(ids),
                                        "completion_tokens": n_tokens},
                              "timings": timings.to_dict()}, ensure_ascii=False), flush=True)
            continue
        print()
        out.print(f"[dim]{timings.decode_tok_s:.1f} tok/s[/]")
