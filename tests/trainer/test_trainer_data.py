import pytest
import torch

from trainer.config import DataConfig
from trainer.data import ChunkPlan, SpecialTokens, fortune_files, iter_documents, tokenize_contexts


def test_fortune_corpus_is_found_and_split_into_documents():
    files = fortune_files(["ascii-art", "LICENSE"])
    assert files and all(f.name not in ("ascii-art", "LICENSE") for f in files)
    docs = list(iter_documents(DataConfig(max_documents=50)))
    assert len(docs) == 50
    assert all(doc.strip() and "\n%\n" not in doc for doc in docs)


def test_jsonl_and_text_sources(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "first doc"}\n\n{"text": "second doc"}\n')
    (tmp_path / "b.txt").write_text("plain text file")
    assert list(iter_documents(DataConfig(format="jsonl", paths=[str(tmp_path / "*.jsonl")]))) == [
        "first doc",
        "second doc",
    ]
    assert list(iter_documents(DataConfig(format="text", paths=[str(tmp_path / "b.txt")]))) == ["plain text file"]


def test_contexts_start_with_bos_and_pack_documents(tiny_llama):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_llama))
    cfg = DataConfig(context_size=16)
    docs = ["the quick brown fox jumps over the lazy dog"] * 20
    contexts = tokenize_contexts(docs, tok, cfg)
    special = SpecialTokens.from_tokenizer(tok)
    assert contexts.shape[1] == 16 and contexts.dtype == torch.int32
    assert (contexts[:, 0] == special.bos).all()
    body = contexts[:, 1:].reshape(-1).tolist()
    one_doc = tok(docs[0], add_special_tokens=False)["input_ids"] + [special.separator]
    assert body == (one_doc * 20)[: len(body)]


def test_chunk_plan_holds_out_spread_chunks_and_deals_equal_shards():
    plan = ChunkPlan.build(n_contexts=1000, contexts_per_chunk=10, eval_fraction=0.1)
    assert len(plan.held_out) == 10 and set(plan.train).isdisjoint(plan.held_out)
    assert max(plan.held_out) - min(plan.held_out) > 50  # spread across the corpus
    shards = [plan.rank_schedule(epoch=0, rank=r, world=3, seed=0) for r in range(3)]
    assert len({len(s) for s in shards}) == 1
    assert set().union(*map(set, shards)) <= set(plan.train)
    assert sum(map(len, shards)) == len({c for s in shards for c in s})  # disjoint
    assert plan.rank_schedule(1, 0, 3, 0) != shards[0]  # a new order each epoch
    with pytest.raises(ValueError):
        ChunkPlan.build(n_contexts=5, contexts_per_chunk=10, eval_fraction=0.1)
