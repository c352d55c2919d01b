"""DecoderLM's packed-sample and embedding inputs: `segment_ids` (block-diagonal causal attention,
SFT packing) and `inputs_embeds` (prompt tuning)."""
import torch

from llmkit.config import ModelConfig
from llmkit.models.decoder import DecoderLM


def _model(position: str = "rope") -> DecoderLM:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=61, context_length=32, n_layers=2, d_model=32, n_heads=4, n_kv_heads=2,
                      position=position, norm="rmsnorm", mlp="swiglu", d_ff=64, bias=False)
    return DecoderLM(cfg).eval()


def test_packed_samples_equal_separate_runs():
    """Two samples packed in one row (their own positions, segment ids) give each the logits it gets alone."""
    for position in ("rope", "learned"):
        model = _model(position)
        a, b = torch.randint(0, 61, (1, 7)), torch.randint(0, 61, (1, 5))
        packed = torch.cat([a, b], dim=1)
        pos = torch.cat([torch.arange(7), torch.arange(5)])[None]
        seg = torch.tensor([[0] * 7 + [1] * 5])
        with torch.no_grad():
            out = model(packed, position_ids=pos, segment_ids=seg)
            alone_a, alone_b = model(a), model(b)
        torch.testing.assert_close(out[:, :7], alone_a, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out[:, 7:], alone_b, atol=1e-5, rtol=1e-5)


def test_changing_one_packed_sample_changes_no_other():
    model = _model()
    x = torch.randint(0, 61, (1, 12))
    pos = torch.cat([torch.arange(6), torch.arange(6)])[None]
    seg = torch.tensor([[0] * 6 + [1] * 6])
    y = x.clone()
    y[0, 2] = (y[0, 2] + 1) % 61  # a token of the first sample
    with torch.no_grad():
        ox, oy = model(x, position_ids=pos, segment_ids=seg), model(y, position_ids=pos, segment_ids=seg)
    assert torch.equal(ox[:, 6:], oy[:, 6:])
    assert not torch.allclose(ox[:, 2:6], oy[:, 2:6])  # within the sample it does change


def test_inputs_embeds_equal_token_ids():
    model = _model()
    x = torch.randint(0, 61, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(model(None, inputs_embeds=model.embed(x)), model(x), atol=0, rtol=0)
