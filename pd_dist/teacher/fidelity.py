"""`pd-dist store info --fidelity`: a store's signal against its teacher's full distribution.

On a sample of positions, the store's signal is read and the teacher (the store's own, by the path its
manifest records and checked against the weights hash) recomputes its full logits there, as the store
was made: a window store's samples as windows (with data.document_mask if the store has it), a
document store's records in document context. The metrics are pd_dist.core.fidelity's, averaged over
the positions, beside the store's bytes per token, so truncations can be compared by fidelity per byte.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch

from pd_dist.core.fidelity import mean_fidelity, signal_fidelity
from pd_dist.data import PackedDataset
from pd_dist.models import ModelConfig, body_hidden, build_model, final_norm_and_head, model_identity
from pd_dist.store import StoreError
from pd_dist.store.reader import LogitsStore, store_info


def store_fidelity(root, data: PackedDataset, positions: int = 2048, seed: int = 0,
                   log: Callable[[str], None] = lambda *_: None, teacher=None) -> dict:
    """Mean fidelity metrics of the store at ``root`` over about ``positions`` positions drawn with
    ``seed``, with the store's bytes per token. ``data``: the prepared data the store was written from
    (a window store's data fingerprint, or a document store's source among the data's sources).
    ``teacher``: the teacher's directory (default: where the manifest records it; a teacher pre-trained
    by pd-dist is recorded by name). StoreError, in one line, when the teacher or the data is not the
    store's."""
    store = LogitsStore(root)
    meta = store.meta
    path = Path(teacher) if teacher is not None else Path(meta.teacher.get("name", ""))
    if not (path / "config.json").is_file():
        raise StoreError(f"{root}: its teacher {path} is not readable here (the manifest records where it was)")
    if model_identity(path, str(path))["weights_hash"] != meta.teacher.get("weights_hash"):
        raise StoreError(f"{root}: the teacher at {path} is not the one that wrote the store (weights differ)")
    model = build_model(ModelConfig(path=str(path)), meta.vocab_size, seed=0).eval()
    body, head = final_norm_and_head(model)
    spec = meta.signal_spec
    tau, loss_tau = float(getattr(spec, "temperature", 1.0)), float(spec.loss_temperature)
    rng = np.random.default_rng(seed)
    parts = []
    with torch.no_grad():
        if meta.context == "document":
            src = [i for i, e in enumerate(data.sources) if e["fingerprint"] == meta.data_fingerprint]
            if not src:
                raise StoreError(f"{root}: none of {data.path}'s sources is the store's ({meta.source}, fingerprint "
                                 f"{meta.data_fingerprint})")
            from pd_dist.teacher.document import DocumentTeacher
            from pd_dist.teacher.inference import FrozenTeacher

            dt = DocumentTeacher(FrozenTeacher(model, torch.device("cpu"), torch.float32, spec, 1024), data,
                                 meta.teacher_seq_len, 8)
            R, N = meta.seq_len, meta.n_tokens
            for r in rng.permutation(-(-N // R))[:max(1, -(-positions // R))]:
                a = int(r) * R
                n = min(R, N - a)
                stored = store.get_spans([a], n)[0]
                logits = dt.hidden(src[0], [a], n)[0] @ head.weight.T
                parts.append(signal_fidelity(logits, stored.without_lse(), tau, loss_tau))
        else:
            if data.fingerprint != meta.data_fingerprint:
                raise StoreError(f"{root}: written from data {meta.data_fingerprint}, not {data.path}'s "
                                 f"({data.fingerprint})")
            eos = data.document_eos(meta.document_mask)
            ids = rng.permutation(len(store))[:max(1, -(-positions // meta.seq_len))]
            for i in ids:
                stored = store.get_batch([int(i)])[0]
                toks = torch.from_numpy(data.batch([int(i)]))[:, :-1]
                logits = body_hidden(body, toks, eos)[0] @ head.weight.T
                parts.append(signal_fidelity(logits, stored.without_lse(), tau, loss_tau))
    out = mean_fidelity(parts)
    info = store_info(root)
    out.update(positions=sum(int(p["tv"].numel()) for p in parts), bytes_per_token=info["bytes_per_token"],
               signal=info["signal"]["describe"])
    log(f"{root}: fidelity on {out['positions']:,} positions: head mass {out['head_mass']:.4f}, TV {out['tv']:.4f}, "
        f"KL(p_hat||p) {out['reverse_kl']:.4f}, KL(p||p_tail) {out['forward_kl']:.4f}, JSD {out['jsd']:.4f} nats; "
        f"{out['bytes_per_token']:.1f} bytes/token")
    return out
