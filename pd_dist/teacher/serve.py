"""A teacher rank's entry: load the teacher (plain, ZeRO-3 partitioned, or a pipeline stage), publish
its held-out loss, serve its students, and complete distill.write_through's store when the run ends.
The weights come ready from the orchestration (pd_dist.run): nothing here trains."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Optional

import torch

from pd_dist.cluster.failover import first_live_replica, job_finished
from pd_dist.cluster.topology import Topology
from pd_dist.config import ExperimentConfig
from pd_dist.core.monitor import Monitor
from pd_dist.core.runtime import device, model_dtype
from pd_dist.data import PackedDataset
from pd_dist.models import ModelConfig, build_model, partitioned_builder
from pd_dist.store import StoreMeta
from pd_dist.store.format import MANIFEST
from pd_dist.teacher.document import DocumentTeacher, context_teacher, teacher_held_out_loss
from pd_dist.teacher.generate import SourceRecords, checked_library_chunk, document_fill, source_store
from pd_dist.teacher.inference import FrozenTeacher
from pd_dist.teacher.pipelined import TeacherPipeline
from pd_dist.teacher.server import Lockstep, StagedTeacherServer, TeacherServer
from pd_dist.teacher.specs import signal_spec, teacher_identity, teacher_store_meta, wire_spec
from pd_dist.teacher.stores import (SPOOL_DIR, DocumentRecords, WriteThrough, latest_records, complete_store,
                                    describe_repair, record_dtype, store_state)
from pd_dist.teacher.val_loss import publish_teacher_val_loss, write_store_teacher_eval

Log = Callable[[str], None]


def serve_teacher(cfg: ExperimentConfig, topo: Topology, data: PackedDataset, weights: ModelConfig,
                  log: Log = print, pair=None) -> None:
    """A teacher rank: load the teacher from ``weights`` (ready: the orchestration pre-trained it if it
    had to), then serve its students until each is done. With teacher.zero_stage 3 the weights are
    partitioned over all teacher ranks, which then run their forwards in lockstep. ``pair``
    (distill.cross_tokenizer, a teacher.crosstok.CrossTokenizer): the teacher reads the data as its own
    tokenizer cuts it and answers in the student's vocabulary, so the wire is as with one tokenizer."""
    d = cfg.distill
    dtype = model_dtype(cfg.train.precision)
    if cfg.teacher.pipeline_stages > 1:
        return _serve_pipelined_teacher(cfg, topo, data, weights, dtype)
    lockstep = gather = None
    if cfg.teacher.zero_stage == 3:
        import deepspeed

        model = _partitioned_teacher(cfg, weights, data.vocab_size, dtype)
        gather = deepspeed.zero.GatheredParameters
        lockstep = Lockstep(device=device() if topo.backend == "nccl" else torch.device("cpu"))
    else:
        model = build_model(weights, (pair.align.teacher if pair else data).vocab_size, seed=cfg.train.seed)
    tdata = pair.align.teacher if pair is not None else data
    teacher = context_teacher(cfg, FrozenTeacher(
        model, device(), dtype, signal_spec(cfg), cfg.train.loss_chunk_size, gather=gather,
        keep_lse=bool(d.write_through), document_eos=tdata.document_eos(cfg.data.document_mask)), data, pair)
    val_loss = teacher_held_out_loss(teacher, data, cfg.train.micro_batch_size)
    publish_teacher_val_loss(topo, val_loss)
    spec = wire_spec(cfg, data)
    max_batch = cfg.teacher.micro_batch_size or cfg.train.micro_batch_size * topo.students_per_teacher
    me = f"[teacher {topo.rank}] "
    answer, through, todo = teacher, None, []
    if d.write_through:
        stores = write_through_stores(cfg, data, weights, teacher)
        found = [store_state(root, meta) for root, meta in stores]  # raises for a store of other inputs
        todo = [(root, meta) for (root, meta), f in zip(stores, found) if not f.sound]
        if not todo:
            print(f"{me}the write-through store {d.write_through} is complete already: not written again",
                  flush=True)
        else:
            for (root, _), f in zip(stores, found):
                if not f.sound and (root / MANIFEST).exists():
                    print(f"{me}the write-through store {root} is damaged: {describe_repair(f)}, "
                          "rewritten when the run completes it", flush=True)
            answer = through = WriteThrough(teacher, Path(d.write_through), f"teacher{topo.rank:05d}",
                                            data.seq_len, stores[0][1].width)
    # One event directory per teacher replica: their throughputs differ.
    tb = Monitor(True, Path(cfg.output_dir) / "tensorboard" / f"teacher{topo.rank}")
    server = TeacherServer(topo, spec, answer, max_batch, log=lambda s: print(me + s, flush=True),
                           metrics=lambda n, m: (tb.scalars(n, m), tb.flush()))
    how = f", weights partitioned over {topo.role_size} teacher ranks (ZeRO-3)" if lockstep else ""
    print(f"{me}serving students {server.students} ({spec.bytes_per_token():.0f} wire bytes/token, "
          f"{spec.value_dtype} values{how})", flush=True)
    try:
        stats = server.serve(lockstep)
    finally:
        tb.close()
    el = time.perf_counter() - stats.started
    print(f"{me}done: {stats.requests} requests, {stats.tokens} tokens, {stats.tokens / max(el, 1e-9):,.0f} "
          f"tok/s, forward busy {stats.forward_s / max(el, 1e-9):.0%}", flush=True)
    if through is not None:
        through.close()
        print(f"{me}kept {through.kept} served samples for the write-through store {d.write_through}", flush=True)
        _complete_write_through(cfg, topo, data, todo, teacher, stats.finished, val_loss, me, log)


def write_through_stores(cfg: ExperimentConfig, data: PackedDataset, weights: ModelConfig,
                         teacher) -> list[tuple[Path, StoreMeta]]:
    """(directory, meta) of each store distill.write_through completes: the one window store or, in
    document context, the library's document store of each of the data's sources (a store already there
    keeps its own layout: generate.source_store). StoreError, in one line, for a library of another
    chunk than the teacher reads (``teacher.T``) or a window store where a library belongs."""
    root = Path(cfg.distill.write_through)
    if cfg.distill.teacher_context != "document":
        return [(root, teacher_store_meta(cfg, data, weights))]
    checked_library_chunk(root, "distill.write_through", teacher.T,
                          f"this run's teacher reads chunks of {teacher.T} (distill.teacher_seq_len)")
    ident = teacher_identity(cfg, weights)
    return [source_store(cfg, data, s, ident, teacher.T, root) for s in range(len(data.sources))]


def _complete_write_through(cfg: ExperimentConfig, topo: Topology, data: PackedDataset,
                            todo: list[tuple[Path, StoreMeta]], teacher, finished_here: bool,
                            val_loss: Optional[float], me: str, log: Log) -> None:
    """Complete distill.write_through's stores ``todo`` (write_through_stores: those not sound), only
    when every student trained to the end of the run (a stopped or interrupted run leaves the spools for
    its resumed run to continue). The teacher ranks share the shards; with topology.teacher_failover (a
    replica may be gone, so no collective among them) the first live replica completes it alone."""
    root = Path(cfg.distill.write_through)
    share = dict(rank=topo.dp_rank, ranks=topo.dp_size, barrier=topo.barrier)
    if topo.teacher_failover:
        first = first_live_replica(topo)
        if first != topo.dp_rank:
            print(f"{me}teacher replica {first} completes the write-through store {root}", flush=True)
            return
        finished, share = job_finished(topo), {}
    else:
        finished = int(topo.role_sum(torch.tensor([int(finished_here)]))[0]) == topo.role_size
    if not finished:
        print(f"{me}the students stopped before the end of the run: the write-through spools stay in {root} "
              "for the resumed run", flush=True)
        return
    micro = cfg.generate.micro_batch_size or cfg.train.micro_batch_size
    if cfg.distill.teacher_context == "document":
        complete_document_write_through(root, todo, data, teacher, micro, log, **share)
    else:
        complete_store(root, todo[0][1], data, teacher, micro, source="write_through", fill_from="the teacher",
                       log=log, **share)
    if share.get("rank", 0) == 0:  # runs trained from the store report the teacher's held-out loss
        write_store_teacher_eval(root, data, val_loss)


def complete_document_write_through(lib: Path, todo: list[tuple[Path, StoreMeta]], data: PackedDataset,
                                    teacher: DocumentTeacher, micro_batch: int, log: Log = print, rank: int = 0,
                                    ranks: int = 1, barrier: Callable[[], None] = lambda: None) -> None:
    """Complete each document store ``todo`` of the library ``lib`` from the windows the teacher replicas
    spooled in ``lib`` (their records cut into the stores' records: DocumentRecords), the records no
    spooled window covers filled by ``teacher``; then rank 0 removes the spools."""
    spool_dir = lib / SPOOL_DIR
    width = todo[0][1].width
    latest = latest_records(spool_dir, record_dtype(data.seq_len, width)) if spool_dir.is_dir() else {}
    labels = {e["fingerprint"]: s for s, e in enumerate(data.sources)}
    for root, meta in todo:
        s = labels[meta.data_fingerprint]
        R, N = meta.seq_len, meta.n_tokens
        records = DocumentRecords(latest, data, s, R, N)
        complete_store(root, meta, SourceRecords(data, s, R), document_fill(teacher, s, R, N), micro_batch,
                       source="write_through", fill_from="the teacher", log=log, rank=rank, ranks=ranks,
                       barrier=barrier, spooled=records.spooled())
    if rank == 0 and spool_dir.is_dir():
        for f in spool_dir.glob("*"):
            f.unlink()
        spool_dir.rmdir()
    barrier()


def _serve_pipelined_teacher(cfg: ExperimentConfig, topo: Topology, data: PackedDataset, weights: ModelConfig,
                             dtype: torch.dtype) -> None:
    """A teacher replica over teacher.pipeline_stages ranks: its first stage takes the requests, its last
    answers, all stages of all replicas step in lockstep (StagedTeacherServer)."""
    spec = wire_spec(cfg, data)
    pipe = TeacherPipeline(weights, topo, data.vocab_size, spec.micro_batch, dtype, spec.signal,
                           cfg.train.loss_chunk_size, cfg.train.seed,
                           document_eos=data.document_eos(cfg.data.document_mask))
    replica = topo.dp_rank
    entry, exit_ = topo.layout.entry(replica), topo.layout.exit(replica)
    loss = pipe.val_loss(data)
    if topo.rank == exit_:
        publish_teacher_val_loss(topo, loss, as_rank=entry)
    me = f"[teacher {topo.rank}] "
    server = StagedTeacherServer(topo, spec, pipe, topo.pipe_group, entry, exit_,
                                 Lockstep(device=device() if topo.backend == "nccl" else torch.device("cpu")))
    role = {entry: "takes the requests of", exit_: "answers"}.get(topo.rank, "is a middle stage for")
    print(f"{me}stage {topo.stage}/{topo.stages} of teacher replica {replica}: {role} students "
          f"{server.students}", flush=True)
    stats = server.serve()
    el = time.perf_counter() - stats.started
    print(f"{me}done: {stats.requests} answers, {stats.tokens} tokens, forward busy "
          f"{stats.forward_s / max(el, 1e-9):.0%}", flush=True)


def _partitioned_teacher(cfg: ExperimentConfig, weights: ModelConfig, vocab_size: int, dtype: torch.dtype):
    """The teacher built inside zero.Init on the teacher world and wrapped in a DeepSpeed ZeRO-3
    inference engine (no optimizer), which gathers each layer's weights as the forward reaches it."""
    import deepspeed

    from pd_dist.config import deepspeed_base

    zero = deepspeed_base(cfg, "teacher")[1].get("zero_optimization", {})
    ds = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
          "zero_optimization": {**zero, "stage": 3}, "bf16": {"enabled": dtype == torch.bfloat16},
          "steps_per_print": 10 ** 9}
    build = partitioned_builder(weights, vocab_size, seed=cfg.train.seed, dtype=dtype)
    with deepspeed.zero.Init(config_dict_or_path=ds):
        model = build()
    engine, _, _, _ = deepspeed.initialize(model=model, config=ds)
    return engine.module
