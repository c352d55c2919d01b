"""`llmkit generate` and `llmkit chat` end to end on a tiny saved model with a character tokenizer."""
from __future__ import annotations

import string
import subprocess
import sys

import pytest
import torch

from llmkit.cli.chat import chat_loop, fit_prompt
from llmkit.cli.main import main
from llmkit.config import ModelConfig
from llmkit.model_io import save_model
from llmkit.models.decoder import DecoderLM
from llmkit.tokenizers.char import CharTokenizer


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    tok = CharTokenizer.train(string.printable)
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("tiny", vocab_size=tok.vocab_size, context_length=256, init_std=0.3)
    path = tmp_path_factory.mktemp("chatmodel")
    save_model(DecoderLM(cfg), path, tokenizer=tok)
    return path


def cli(capsys, *argv) -> str:
    assert main([str(a) for a in argv]) == 0
    return capsys.readouterr().out


def test_generate_cli_greedy_is_deterministic_and_speculative_matches(capsys, model_dir):
    base = ("generate", model_dir, "--prompt", "Hello", "--greedy", "--max-new-tokens", "20")
    first, second = cli(capsys, *base), cli(capsys, *base)
    assert first == second and first.startswith("Hello") and len(first) > len("Hello\n")
    assert cli(capsys, *base, "--draft", model_dir, "--num-draft-tokens", "3") == first


def test_generate_cli_accepts_every_decoding_option(capsys, model_dir):
    out = cli(capsys, "generate", model_dir, "--prompt", "ab", "--max-new-tokens", "12", "--seed", "3",
              "--temperature", "0.8", "--top-k", "20", "--top-p", "0.9", "--min-p", "0.01", "--typical-p", "0.95",
              "--repetition-penalty", "1.2", "--frequency-penalty", "0.3", "--presence-penalty", "0.1")
    assert out.startswith("ab")
    beams = cli(capsys, "generate", model_dir, "--prompt", "ab", "--max-new-tokens", "8", "--num-beams", "3",
                "--length-penalty", "0.8", "--early-stopping")
    assert beams.startswith("ab")


def test_generate_cli_stop_string_cuts_the_output(capsys, model_dir):
    free = cli(capsys, "generate", model_dir, "--prompt", "Hi", "--greedy", "--max-new-tokens", "30")[2:].rstrip("\n")
    stop = free[6:8]
    cut = cli(capsys, "generate", model_dir, "--prompt", "Hi", "--greedy", "--max-new-tokens", "30", "--stop", stop)
    assert cut == "Hi" + free[:free.index(stop)] + "\n"


def test_chat_loop_keeps_history_and_reset_forgets_it():
    seen: list[list[dict]] = []

    def reply(messages):
        seen.append([dict(m) for m in messages])
        yield f"reply{len(messages)}"

    import io
    out = io.StringIO()
    chat_loop(io.StringIO("hello\nmore\n/reset\nagain\n/exit\nignored\n"), out, reply, "be brief", interactive=False)
    assert [len(m) for m in seen] == [2, 4, 2]  # system + user; + assistant + user; after reset
    assert seen[1][2] == {"role": "assistant", "content": "reply2"}
    assert "(conversation cleared)" in out.getvalue() and "ignored" not in str(seen)


def test_fit_prompt_drops_the_oldest_turns_first():
    tok = CharTokenizer.train(string.printable)
    msgs = [{"role": "system", "content": "sys"}] + [{"role": r, "content": c * 40} for r, c in
                                                     [("user", "a"), ("assistant", "b"), ("user", "c")]]
    ids, kept = fit_prompt(tok, msgs, budget=150)

    def length(messages):
        return len(tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True)))
    assert length(msgs) > 150  # it had to drop something
    # the system message and the newest turns, as many as fit: one more older turn would not
    n = len(kept) - 1
    assert 1 <= n < 3 and kept == [msgs[0]] + msgs[-n:]
    assert ids == tok.encode(tok.apply_chat_template(kept, add_generation_prompt=True)) and len(ids) <= 150
    assert length([msgs[0]] + msgs[-(n + 1):]) > 150


def test_chat_cli_over_a_stdin_pipe(model_dir):
    proc = subprocess.run([sys.executable, "-m", "llmkit", "chat", str(model_dir), "--greedy", "--max-new-tokens", "10"],
                          input="hello there\n/reset\nhello there\n/exit\n", capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    replies = [line for line in proc.stdout.splitlines() if line.startswith("assistant> ")]
    assert len(replies) == 2 and replies[0] == replies[1]  # after /reset the same greedy reply
    assert "(conversation cleared)" in proc.stdout
