"""`llmkit chat` on a character-level run: the char tokenizer's plain "User: ... / Assistant: ..."
template is made of characters its vocabulary has, so the model answers; a vocabulary that lacks even
those gets one error line at start, not a refusal of every message."""
from __future__ import annotations

import io
import string

import pytest
import torch

from cli_helpers import assert_one_line_error, run_cli
from llmkit.cli.chat import check_template, turn_stops
from llmkit.config import ModelConfig
from llmkit.errors import UserError
from llmkit.model_io import save_model
from llmkit.models.decoder import DecoderLM
from llmkit.tokenizers import CharTokenizer
from llmkit.tokenizers.chat import PLAIN_CHAT_TEMPLATE


def chat(capsys, monkeypatch, run_dir, text: str, *flags: str) -> tuple[int, str, str]:
    monkeypatch.setattr("sys.stdin", io.StringIO(text))
    return run_cli(capsys, "chat", str(run_dir), *flags)


def test_chat_on_a_trained_char_run_answers(capsys, monkeypatch, run_dir):
    code, out, err = chat(capsys, monkeypatch, run_dir, "Hello there\nAnd you\n/exit\n",
                          "--max-new-tokens", "24", "--seed", "1")
    assert code == 0 and err == "", err
    replies = [line for line in out.split("assistant> ")[1:]]
    assert len(replies) == 2 and all(r.strip() for r in replies), out  # some text streamed for each turn


def test_chat_on_a_char_run_with_beams_answers(capsys, monkeypatch, run_dir):
    code, out, err = chat(capsys, monkeypatch, run_dir, "Hello\n", "--max-new-tokens", "8", "--num-beams", "3")
    assert code == 0 and err == "" and out.startswith("assistant> "), err


def test_char_template_is_plain_text_and_its_reply_stops_at_the_next_turn():
    tok = CharTokenizer.train(string.ascii_letters + " :\n")
    assert tok.chat_template == PLAIN_CHAT_TEMPLATE
    text = tok.apply_chat_template([{"role": "system", "content": "Be kind"}, {"role": "user", "content": "Hi"},
                                    {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye"}],
                                   add_generation_prompt=True)
    assert text == "System: Be kind\nUser: Hi\nAssistant: Hello\nUser: Bye\nAssistant: "
    assert tok.decode(tok.encode(text)) == text
    stops, _ = turn_stops(tok)
    assert "\nUser:" in stops and "\nSystem:" in stops
    check_template(tok, "a system message")  # every character is there: no error


def test_a_vocabulary_without_the_template_letters_is_one_line_at_start(capsys, monkeypatch, tmp_path):
    tok = CharTokenizer.train("0123456789 +-=\n")
    torch.manual_seed(0)
    save_model(DecoderLM(ModelConfig.from_preset("tiny", vocab_size=tok.vocab_size)), tmp_path / "digits", tokenizer=tok)
    code, out, err = chat(capsys, monkeypatch, tmp_path / "digits", "1+1=\n")
    assert_one_line_error(code, err, "cannot encode its chat template")
    assert "its vocabulary lacks ':AUaeinrst'" in err
    assert "assistant>" not in out  # refused before the first message, not on it


def test_check_template_names_the_missing_characters():
    tok = CharTokenizer.train("User Assistant\n")  # no ":"
    with pytest.raises(UserError, match=r"vocabulary lacks ':'"):
        check_template(tok, None)
    with pytest.raises(UserError, match=r"vocabulary lacks ':Smy'"):  # the system label needs S, m, y too
        check_template(tok, "be brief")


def test_at_a_terminal_a_message_with_unknown_characters_is_one_line_and_the_chat_goes_on():
    from llmkit.cli.chat import chat_loop, fit_prompt

    tok = CharTokenizer.train(string.ascii_letters + " :\n")
    asked = []

    def reply(messages):
        ids, _ = fit_prompt(tok, messages, 10_000)
        asked.append([m["content"] for m in messages])
        yield "ok"

    out, err = io.StringIO(), io.StringIO()
    chat_loop(io.StringIO("café\nhello\n"), out, reply, None, interactive=True, err=err)
    assert err.getvalue().count("\n") == 1 and err.getvalue().startswith("error: ") and "é" in err.getvalue()
    assert asked == [["hello"]]  # the refused turn is not kept in the conversation
    with pytest.raises(UserError, match="outside the character vocabulary"):  # a pipe: exit 2 at once
        chat_loop(io.StringIO("café\nhello\n"), io.StringIO(), reply, None, interactive=False)
