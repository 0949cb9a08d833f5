import torch

from trainer.buffer import ActivationStream
from trainer.data import ChunkPlan

ROWS = 10  # activations per chunk


def source(chunk: int) -> torch.Tensor:
    # Row r of chunk c carries the id c * ROWS + r, so batches can be traced back.
    return (chunk * ROWS + torch.arange(ROWS, dtype=torch.float32))[:, None].expand(ROWS, 4).clone()


def ids(batch: torch.Tensor) -> list[int]:
    return batch[:, 0].long().tolist()


def test_one_epoch_emits_each_training_activation_once_shuffled():
    plan = ChunkPlan.build(n_contexts=100, contexts_per_chunk=5, eval_fraction=0.2)  # 16 training chunks
    stream = ActivationStream(source, plan, d=4, batch_size=10, capacity=40, rank=0, world=1, seed=0)
    emitted = []
    while stream.position < len(plan.train):  # chunk-sized refills land exactly on the epoch boundary
        emitted += ids(stream.next_batch())
    assert stream.position == len(plan.train)
    buffered = ids(stream._buf[: stream._n])
    assert sorted(emitted + buffered) == sorted(c * ROWS + r for c in plan.train for r in range(ROWS))
    assert emitted != sorted(emitted)


def test_ranks_see_disjoint_chunks_and_resume_continues_the_schedule():
    plan = ChunkPlan.build(n_contexts=200, contexts_per_chunk=5, eval_fraction=0.1)
    streams = [
        ActivationStream(source, plan, d=4, batch_size=8, capacity=32, rank=r, world=2, seed=3) for r in range(2)
    ]
    chunks = [{i // ROWS for _ in range(5) for i in ids(s.next_batch())} for s in streams]
    assert chunks[0].isdisjoint(chunks[1])
    resumed = ActivationStream(
        source, plan, d=4, batch_size=8, capacity=32, rank=0, world=2, seed=3, position=streams[0].position
    )
    later = {i // ROWS for i in ids(resumed.next_batch())}
    schedule = plan.rank_schedule(0, 0, 2, 3)
    assert later <= set(schedule[streams[0].position :])
