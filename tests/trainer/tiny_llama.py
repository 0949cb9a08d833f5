"""A tiny random Llama (transformers folder + BPE tokenizer trained on the demo corpus) for fast trainer tests."""

from __future__ import annotations

from pathlib import Path

import torch

from trainer.config import DataConfig
from trainer.data import iter_documents

D_MODEL = 64
N_LAYERS = 3


def build_tiny_llama(folder: Path, vocab_size: int = 512, max_documents: int = 3000, train_steps: int = 150) -> Path:
    """Write a LlamaForCausalLM (d_model 64, 3 layers), briefly trained on the corpus, and its tokenizer to folder.

    The short training matters: in a random model zeroing a layer's output does not hurt the loss, so the
    evaluation's "loss recovered" would be undefined.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    docs = list(iter_documents(DataConfig(max_documents=max_documents)))
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(
        docs,
        trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=["<unk>", "<s>", "</s>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    config = LlamaConfig(
        vocab_size=bpe.get_vocab_size(),
        hidden_size=D_MODEL,
        intermediate_size=128,
        num_hidden_layers=N_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    _pretrain(model, tokenizer, docs, train_steps)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _pretrain(model, tokenizer, docs: list[str], steps: int, seq: int = 64, batch: int = 16) -> None:
    ids = [t for d in docs for t in tokenizer(d)["input_ids"] + [tokenizer.eos_token_id]]
    data = torch.tensor(ids[: len(ids) // seq * seq]).view(-1, seq)  # [n, seq]
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        rows = data[torch.randint(0, data.shape[0], (batch,), generator=gen)]
        loss = model(input_ids=rows, labels=rows).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
