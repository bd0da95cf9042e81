"""Small Hugging Face folders with random weights, as ``save_pretrained`` writes them: a
Wav2Vec2 CTC model (config.json, model.safetensors, preprocessor_config.json) and a BERT
encoder (config.json, model.safetensors, vocab.txt-free: ids only). Seeded: the same bytes
each run."""

from __future__ import annotations

from pathlib import Path


def wav2vec2_ctc(folder: Path) -> Path:
    """A 2-layer Wav2Vec2ForCTC (hidden 128, 32 tokens; 1.7 MB of FP32 weights) with its
    feature extractor's config, saved to ``folder``."""
    import torch
    from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2ForCTC

    config = Wav2Vec2Config(
        hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
        conv_dim=(64, 64, 64), conv_kernel=(10, 3, 3), conv_stride=(5, 2, 2),
        num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2, vocab_size=32,
        do_stable_layer_norm=True, feat_extract_norm="layer",
    )  # fmt: skip
    torch.manual_seed(0)
    Wav2Vec2ForCTC(config).eval().save_pretrained(folder)
    Wav2Vec2FeatureExtractor().save_pretrained(folder)
    return folder


def bert(folder: Path) -> Path:
    """A 2-layer BertModel (hidden 128, vocabulary 1000) saved to ``folder``: text inputs
    (input_ids, attention_mask), outputs last_hidden_state and pooler_output."""
    import torch
    from transformers import BertConfig, BertModel

    config = BertConfig(
        vocab_size=1000, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=256, max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(0)
    BertModel(config).eval().save_pretrained(folder)
    return folder
