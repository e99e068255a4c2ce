"""`py:failing_factories:NAME` models that fail the way user code does: a factory that raises, and a T5 whose
forward returns a cache object the ONNX exporter cannot handle."""

import torch


def broken():
    raise RuntimeError("factory exploded on purpose")


def t5():
    import transformers

    torch.manual_seed(0)
    cfg = transformers.T5Config(
        vocab_size=64, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2, decoder_start_token_id=0
    )
    model = transformers.T5ForConditionalGeneration(cfg).eval()
    ids = torch.randint(0, 64, (2, 5))
    return model, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "decoder_input_ids": ids}
