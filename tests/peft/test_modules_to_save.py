"""A task's new head beside an adapter (peft's modules_to_save): a LoRA sequence classifier on a
decoder saves its `score` layer with the adapter, loads in peft on transformers'
LlamaForSequenceClassification with equal logits, and loads back here."""
from __future__ import annotations

import pytest
import torch
from peft_helpers import max_diff, token_ids

from llmkit.interop.hf import load_hf
from llmkit.models.decoder_heads import DecoderForSequenceClassification
from llmkit.peft import get_method
from llmkit.peft.files import load_adapter, read_adapter, save_adapter

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


def _classifier(directory) -> DecoderForSequenceClassification:
    base = load_hf(directory)
    for p in base.parameters():
        p.data = p.data.clone()
    return DecoderForSequenceClassification(base, num_labels=3, pad_id=0).eval()


def _lora_classifier(directory):
    torch.manual_seed(0)
    model = _classifier(directory)
    method = get_method("lora")({"rank": 2, "alpha": 4.0, "target_modules": "q,v", "adapter_dropout": 0.0,
                                 "rslora": False, "lora_init": "default"})
    adapted = method.apply(model)
    adapted.score.requires_grad_(True)
    method.modules_to_save, method.task_type = ["score"], "SEQ_CLS"
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if p.requires_grad:
                p.normal_(0, 0.2)
    return adapted.eval(), method


def test_classifier_adapter_with_its_head_moves_to_peft_and_back(hf_llama_dir, tmp_path):
    ours, method = _lora_classifier(hf_llama_dir)
    save_adapter(ours, method, tmp_path / "adapter")
    config, tensors = read_adapter(tmp_path / "adapter")
    assert config["modules_to_save"] == ["score"] and config["task_type"] == "SEQ_CLS"
    assert "base_model.model.score.weight" in tensors
    ids = token_ids()
    hf = transformers.LlamaForSequenceClassification.from_pretrained(hf_llama_dir, num_labels=3, pad_token_id=0)
    theirs = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    with torch.no_grad():
        expected = ours(ids)
        assert max_diff(theirs(input_ids=ids).logits, expected) < 1e-5
        again, _ = load_adapter(_classifier(hf_llama_dir), tmp_path / "adapter")
        assert max_diff(again(ids), expected) < 1e-5
        assert max_diff(_classifier(hf_llama_dir)(ids), expected) > 1e-3  # the adapter and head matter


def test_the_head_must_exist_on_the_model_it_loads_onto(hf_llama_dir, tmp_path):
    from llmkit.errors import UserError

    ours, method = _lora_classifier(hf_llama_dir)
    save_adapter(ours, method, tmp_path / "adapter")
    with pytest.raises(UserError, match="saves module 'score', which this model lacks"):
        load_adapter(load_hf(hf_llama_dir), tmp_path / "adapter")
