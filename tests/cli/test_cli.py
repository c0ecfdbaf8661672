"""`pagoda <verb>`: help texts, params, list, generate, the chat REPL, and one-line errors."""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer as Backend
from tokenizers import decoders, models, pre_tokenizers, trainers

import pagoda.cli.generate as cli_generate
from pagoda.cli import build_parser, main
from pagoda.errors import InvalidRequestError
from pagoda.hub.loader import load_model
from pagoda.model.config import ModelConfig
from pagoda.model.hf_checkpoint import save_hf_checkpoint
from pagoda.model.transformer import Transformer
from pagoda.tokenizer import Tokenizer, render_chat

CONTEXT = 32  # the tiny model's context window
REPO = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------ helpers
def cli(capsys, *argv: str) -> tuple[int, str, str]:
    """Run `pagoda argv...` in-process; return (exit code, stdout, stderr)."""
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def pagoda(*argv: str, stdin: str = "", timeout: int = 120) -> subprocess.CompletedProcess:
    """Run `python -m pagoda.cli argv...` in a fresh interpreter (PAGODA_HOME is inherited)."""
    return subprocess.run([sys.executable, "-m", "pagoda.cli", *map(str, argv)], input=stdin,
                          capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def assert_one_line_error(code: int, err: str, *needles: str) -> str:
    assert code != 0
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error:"), err
    for needle in needles:
        assert needle in lines[0]
    return lines[0]


def tiny_tokenizer() -> Tokenizer:
    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(["hello world, the quick brown fox jumps"] * 5, trainer)
    return Tokenizer(backend, eos_token="<|im_end|>")


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    """A random tiny Llama with a 32-token context in the Hugging Face layout, + its tokenizer."""
    folder = tmp_path_factory.mktemp("tiny") / "tiny-llama"
    tok = tiny_tokenizer()
    torch.manual_seed(0)
    cfg = ModelConfig.from_name("tiny-llama", max_seq_len=CONTEXT, vocab_size=tok.vocab_size,
                                init_std=0.3)
    save_hf_checkpoint(Transformer(cfg), folder)
    tok.save(folder)
    return folder


@pytest.fixture
def patched_smol(monkeypatch, smol, smol_gguf):
    """Make the CLI's loader return the session's real model instead of loading it again."""
    calls = []

    def fake_load(name, device=None, dtype=None):
        calls.append(name)
        assert name == str(smol_gguf)
        return smol

    monkeypatch.setattr(cli_generate, "load_model", fake_load)
    return calls


def verbs() -> list[str]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sorted(sub.choices)


# ------------------------------------------------------------------ help
def test_verbs_are_registered():
    assert {"pull", "list", "params", "generate", "chat"} <= set(verbs())


@pytest.mark.parametrize("verb", verbs())
def test_every_verb_help_has_an_example(capsys, verb):
    with pytest.raises(SystemExit) as exit_:
        main([verb, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "example" in out and f"pagoda {verb}" in out
    assert "--json" in out


def test_top_level_help_and_no_verb(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    assert "example" in capsys.readouterr().out
    code, out, _ = cli(capsys)
    assert code == 2 and "verbs" in out


# ------------------------------------------------------------------ params / list
def test_params_gpt3_json(capsys):
    code, out, err = cli(capsys, "params", "gpt3-175b", "--json")
    assert code == 0 and err == ""
    report = json.loads(out)
    assert report["total"] == 174604259328
    assert report["name"] == "gpt3-175b"


def test_params_smollm2_table(capsys):
    code, out, _ = cli(capsys, "params", "smollm2-135m")
    assert code == 0
    assert "134,515,008" in out


def test_params_of_folders_and_config_files(capsys, tiny_folder):
    expected = sum(p.numel() for p in load_model(str(tiny_folder), device="cpu")
                   .model.parameters())
    for target in (tiny_folder, tiny_folder / "pagoda_config.json", tiny_folder / "config.json"):
        code, out, _ = cli(capsys, "params", target, "--json")
        assert code == 0, target
        report = json.loads(out)
        assert report["total"] == expected
        assert report["memory"]["context_tokens"] == CONTEXT


@pytest.mark.real_model
def test_params_reads_a_gguf_header(capsys, smol_gguf):
    code, out, _ = cli(capsys, "params", smol_gguf, "--json")
    assert code == 0
    assert json.loads(out)["total"] == 134515008


def test_list_json(capsys):
    code, out, _ = cli(capsys, "list", "--json")
    assert code == 0
    listing = json.loads(out)
    assert "smollm2-135m-instruct" in listing["available"]
    for model in listing["pulled"]:
        assert {"name", "path", "format", "size_bytes", "source"} <= set(model)


# ------------------------------------------------------------------ generate
def test_generate_tiny_json_and_plain(capsys, tiny_folder):
    args = ["generate", tiny_folder, "hello world", "--max-tokens", "6", "--temperature", "0"]
    code, out, _ = cli(capsys, *args, "--json")
    assert code == 0
    result = json.loads(out)
    assert set(result) >= {"text", "token_ids", "finish_reason", "usage", "timings"}
    tok = Tokenizer.from_file(tiny_folder)
    prompt_ids = tok.encode("hello world", add_special_tokens=True)
    assert result["usage"] == {"prompt_tokens": len(prompt_ids), "completion_tokens": 6}
    assert len(result["token_ids"]) == 6 and result["finish_reason"] == "length"
    assert result["text"] == tok.decode(result["token_ids"], skip_special_tokens=True)
    code, plain, _ = cli(capsys, *args)
    assert code == 0 and plain == result["text"] + "\n"


def test_generate_reads_the_prompt_from_stdin(capsys, monkeypatch, tiny_folder):
    args = ["generate", tiny_folder, "--max-tokens", "3", "--temperature", "0", "--json"]
    code, out, _ = cli(capsys, *args[:2], "hello world", *args[2:])
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello world"))
    code2, out2, _ = cli(capsys, *args[:2], "-", *args[2:])
    assert code == code2 == 0
    assert json.loads(out)["token_ids"] == json.loads(out2)["token_ids"]


@pytest.mark.real_model
def test_generate_json_end_to_end(smol_gguf):
    run = pagoda("generate", smol_gguf, "The capital of France is", "--max-tokens", "8",
                 "--temperature", "0", "--json")
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    assert "Paris" in result["text"]
    assert len(result["token_ids"]) == result["usage"]["completion_tokens"] <= 8
    assert result["usage"]["prompt_tokens"] == 5
    assert set(result["timings"]) == {"prefill_s", "decode_s", "prefill_tok_s", "decode_tok_s"}
    assert all(v > 0 for v in result["timings"].values())
    assert "Traceback" not in run.stderr


@pytest.mark.real_model
def test_generate_plain_prints_only_the_completion(capsys, patched_smol, smol_gguf):
    args = ["generate", smol_gguf, "The capital of France is", "--max-tokens", "8",
            "--temperature", "0"]
    code, out, _ = cli(capsys, *args, "--json")
    text = json.loads(out)["text"]
    code2, plain, _ = cli(capsys, *args)
    assert code == code2 == 0
    assert plain == text + "\n"
    assert "Paris" in plain and "capital of France" not in plain
    assert patched_smol == [str(smol_gguf)] * 2


@pytest.mark.real_model
def test_generate_chat_uses_the_template(capsys, patched_smol, smol, smol_gguf):
    question = "What is the capital of France?"
    code, out, _ = cli(capsys, "generate", smol_gguf, question, "--chat", "--temperature", "0",
                       "--max-tokens", "24", "--json")
    assert code == 0
    result = json.loads(out)
    assert "Paris" in result["text"]
    tok = smol.tokenizer
    messages = [{"role": "user", "content": question}]
    expected = tok.encode(render_chat(tok, messages), add_special_tokens=False)
    assert result["usage"]["prompt_tokens"] == len(expected)
    code, out, _ = cli(capsys, "generate", smol_gguf, question, "--chat", "--system",
                       "You are a pirate.", "--temperature", "0", "--max-tokens", "1", "--json")
    system = [{"role": "system", "content": "You are a pirate."}, *messages]
    expected = tok.encode(render_chat(tok, system), add_special_tokens=False)
    assert json.loads(out)["usage"]["prompt_tokens"] == len(expected)


# ------------------------------------------------------------------ errors
@pytest.mark.parametrize("verb", ["generate", "chat", "pull", "params"])
def test_unknown_model_lists_known_names(capsys, verb):
    args = [verb, "no-such-model"] + (["hi"] if verb == "generate" else [])
    code, _, err = cli(capsys, *args)
    assert_one_line_error(code, err, "no-such-model", "smollm2-135m-instruct")


def test_unknown_preset_for_params_lists_presets(capsys):
    code, _, err = cli(capsys, "params", "gpt5-ultra")
    assert_one_line_error(code, err, "gpt5-ultra", "gpt3-175b", "tiny-llama")


@pytest.mark.parametrize(
    ("options", "needle"),
    [(["--temperature", "-1"], "temperature"), (["--top-p", "1.5"], "top_p"),
     (["--top-k", "-2"], "top_k"), (["--max-tokens", "0"], "max_tokens"),
     (["--min-p", "1.5"], "min_p")],
)
def test_bad_sampling_options(capsys, options, needle):
    # validated before the model is touched: the name need not even exist
    for verb in ("generate", "chat"):
        args = [verb, "no-such-model"] + (["hi"] if verb == "generate" else []) + options
        code, _, err = cli(capsys, *args)
        assert_one_line_error(code, err, needle)


def test_empty_prompt(capsys, tiny_folder, monkeypatch):
    code, _, err = cli(capsys, "generate", tiny_folder, "")
    assert_one_line_error(code, err, "empty")
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    code, _, err = cli(capsys, "generate", tiny_folder, "-")
    assert_one_line_error(code, err, "empty")


def test_prompt_longer_than_the_context(capsys, tiny_folder):
    prompt = "hello world " * 40
    n = len(Tokenizer.from_file(tiny_folder).encode(prompt))
    assert n > CONTEXT
    code, _, err = cli(capsys, "generate", tiny_folder, prompt, "--max-tokens", "1")
    assert_one_line_error(code, err, str(n), str(CONTEXT))
    code, _, err = cli(capsys, "generate", tiny_folder, "hello", "--max-tokens", "40")
    assert_one_line_error(code, err, "40", str(CONTEXT))


def test_corrupt_safetensors_folder(capsys, tiny_folder, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_folder, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    code, _, err = cli(capsys, "generate", broken, "hello")
    assert_one_line_error(code, err, "model.safetensors")
    (broken / "config.json").write_text("{not json")
    (broken / "pagoda_config.json").unlink()
    code, _, err = cli(capsys, "generate", broken, "hello")
    assert_one_line_error(code, err, "config.json")


def test_missing_paths(capsys, tmp_path):
    code, _, err = cli(capsys, "generate", tmp_path / "nothing.gguf", "hi")
    assert_one_line_error(code, err, "nothing.gguf")
    code, _, err = cli(capsys, "generate", tmp_path, "hi")  # a folder that is no model
    assert_one_line_error(code, err, str(tmp_path))


@pytest.mark.real_model
@pytest.mark.parametrize("size", [100, 3_000_000])
def test_truncated_gguf(capsys, smol_gguf, tmp_path, size):
    cut = tmp_path / "cut.gguf"
    with open(smol_gguf, "rb") as f:
        cut.write_bytes(f.read(size))
    code, _, err = cli(capsys, "generate", cut, "hi")
    assert_one_line_error(code, err, "cut.gguf")


def test_debug_shows_the_exception(tiny_folder):
    with pytest.raises(InvalidRequestError):
        main(["generate", str(tiny_folder), "", "--debug"])


def test_internal_errors_are_one_line(capsys, monkeypatch):
    def broken(args):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr("pagoda.cli.models.cmd_list", broken)
    code, _, err = cli(capsys, "list")
    assert code == 2 and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and "RuntimeError" in err and "--debug" in err


def test_errors_end_to_end_without_traceback(tmp_path):
    run = pagoda("generate", "no-such-model", "hi")
    assert_one_line_error(run.returncode, run.stderr, "smollm2-135m-instruct")
    assert run.stdout == ""


# ------------------------------------------------------------------ chat REPL
def chat(capsys, monkeypatch, stdin: str, *argv: str) -> tuple[int, str]:
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    code, out, err = cli(capsys, "chat", *argv)
    assert "Traceback" not in err
    return code, out


def test_chat_repl_uses_the_whole_small_context(capsys, monkeypatch, tiny_folder):
    # the default --max-tokens (512) is more than a 32-token context: replies use what is left
    turns = ["hello", "hello world", "the quick brown fox", "jumps"]
    seen: list[list[dict]] = []
    real_fit = cli_generate._fit

    def spy(loaded, messages, reserve):
        ids = real_fit(loaded, messages, reserve)
        seen.append([dict(m) for m in messages])
        assert len(ids) < CONTEXT
        return ids

    monkeypatch.setattr(cli_generate, "_fit", spy)
    code, out = chat(capsys, monkeypatch, "\n".join(turns) + "\n/exit\n", tiny_folder,
                     "--temperature", "0")
    assert code == 0
    assert out.count("tok/s") == len(turns), out  # every turn got a reply
    assert "context window" not in " ".join(out.split())
    assert [s[-1]["content"] for s in seen] == turns
    assert len(seen[1]) == 1  # the first exchange filled the context and was dropped


def test_chat_repl_survives_a_turn_that_cannot_fit(capsys, monkeypatch, tiny_folder):
    long_system = "hello world " * 20
    code, out = chat(capsys, monkeypatch, "hi\nhi again\n", tiny_folder, "--system",
                     long_system, "--temperature", "0")
    assert code == 0
    out = " ".join(out.split())  # rich wraps long lines
    assert out.count("context window") == 2 and "/reset" in out and "tok/s" not in out


def test_chat_repl_reset_and_exit(capsys, monkeypatch, tiny_folder):
    seen: list[list[dict]] = []
    real_fit = cli_generate._fit
    monkeypatch.setattr(cli_generate, "_fit", lambda loaded, messages, reserve: (
        seen.append([dict(m) for m in messages]) or real_fit(loaded, messages, reserve)))
    stdin = "hello\n\nworld\n/reset\nfox\n/quit\nnever read\n"
    code, out = chat(capsys, monkeypatch, stdin, tiny_folder, "--temperature", "0",
                     "--max-tokens", "3")
    assert code == 0
    assert "conversation cleared" in out
    assert [len(s) for s in seen] == [1, 3, 1]  # blank lines are skipped; /reset forgets
    assert seen[2] == [{"role": "user", "content": "fox"}]
    code, out = chat(capsys, monkeypatch, "hello\n", tiny_folder, "--max-tokens", "2")
    assert code == 0 and out.count("tok/s") == 1  # EOF ends the session cleanly


def test_chat_eof_end_to_end(tiny_folder):
    run = pagoda("chat", tiny_folder, "--temperature", "0", "--max-tokens", "4", stdin="hello\n")
    assert run.returncode == 0, run.stderr
    assert "ready" in run.stdout and "tok/s" in run.stdout and "Traceback" not in run.stderr


@pytest.mark.real_model
def test_chat_repl_end_to_end(smol_gguf):
    run = pagoda("chat", smol_gguf, "--temperature", "0", "--max-tokens", "16",
                 stdin="Hello\n/reset\nWhat is 2+2?\n/exit\n")
    assert run.returncode == 0, run.stderr
    assert "Traceback" not in run.stderr
    assert "conversation cleared" in run.stdout
    assert run.stdout.count("tok/s") == 2
    replies = run.stdout.split(">>> ")[1:]
    assert len(replies) == 4  # Hello, /reset, the question, /exit
    assert replies[0].strip() and replies[2].strip()
