"""A Llama-3.1-8B-shaped model directory for `--load-format dummy`, with no downloads: a small
byte-level BPE tokenizer trained here, and the 8B geometry in config.json (SGLang initialises the
weights at random, so no weight files are needed).

    python benchmarks/gpu/make_model.py /tmp/m8b
"""

import json
import os
import sys

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, PreTrainedTokenizerFast

out = sys.argv[1] if len(sys.argv) > 1 else "/tmp/m8b"
tok = Tokenizer(models.BPE(unk_token=None))
tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
tok.decoder = decoders.ByteLevel()
trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<s>", "</s>", "<pad>"],
                              initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
tok.train_from_iterator(["The quick brown fox jumps over the lazy dog. " * 20], trainer)
ft = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
ft.save_pretrained(out)
cfg = LlamaConfig(architectures=["LlamaForCausalLM"], vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=131072,
                  rope_theta=500000.0, bos_token_id=ft.bos_token_id, eos_token_id=ft.eos_token_id,
                  pad_token_id=ft.pad_token_id, torch_dtype="bfloat16", tie_word_embeddings=False)
cfg.save_pretrained(out)
assert json.load(open(os.path.join(out, "config.json"))).get("architectures"), "config.json lacks architectures"
print("saved", out, sorted(os.listdir(out)))
