"""A library of document stores (format 3): one store per data source, keyed by the source's fingerprint.

``distill.store`` with ``distill.teacher_context: document`` names a directory holding one store per
source, ``source-<fingerprint[:16]>/`` (each a complete store of its own, verified like any other). A
blend reads each of its sources' stores; a source used in two blends, or prepared again at another
``data.seq_len``, has the same fingerprint (its tokens), so it is read from the same store.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from pd_dist.core.logits import SignalSpec
from pd_dist.store.format import MANIFEST, SOURCE_STORE_PREFIX, StoreError, StoreMeta
from pd_dist.store.reader import LogitsStore, _load_manifest


def source_store_dir(root, fingerprint: str) -> Path:
    """Where the library ``root`` keeps the store of the source with ``fingerprint``."""
    return Path(root) / f"{SOURCE_STORE_PREFIX}{fingerprint[:16]}"


def library_stores(root) -> list[Path]:
    """The source stores (directories with a manifest) of the library ``root``, sorted."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob(f"{SOURCE_STORE_PREFIX}*") if (p / MANIFEST).is_file())


def is_window_store(root) -> bool:
    return (Path(root) / MANIFEST).is_file()


def library_metas(root) -> list[tuple[Path, Optional[StoreMeta]]]:
    """Each source store of the library ``root`` with its manifest's metadata (None: unreadable)."""
    out = []
    for p in library_stores(root):
        try:
            out.append((p, _load_manifest(p)[1]))
        except StoreError:
            out.append((p, None))
    return out


def _held(metas) -> str:
    """What the library holds, for a message: each store's source label and fingerprint."""
    held = [f"{m.source or '?'} ({m.data_fingerprint[:16]}, tokenizer {m.tokenizer_hash[:12]})" if m else
            f"{p.name} (unreadable manifest)" for p, m in metas]
    return ", ".join(held) or "nothing"


def open_source_store(root, *, fingerprint: str, label: str, tokenizer_hash: str, vocab_size: int,
                      signal: SignalSpec, teacher_seq_len: Optional[int] = None,
                      verify: bool = False) -> LogitsStore:
    """The library ``root``'s store of one source, checked for this run and opened with its defaults set
    to ``signal``'s truncation (a wider store is re-truncated on load). StoreError, in one line naming
    what differs, for: a window store given as a library, no store for the source (another corpus,
    data.max_chars or tokenizer: the message lists what the library holds), another tokenizer or
    vocabulary, another teacher_seq_len than the run asks, a signal the store cannot serve."""
    root = Path(root)
    if is_window_store(root):
        raise StoreError(f"distill.store {root} is a window store (format 1/2, one data.seq_len), not a library of "
                         "document stores: set distill.teacher_context window to train from it")
    path = source_store_dir(root, fingerprint)
    if not (path / MANIFEST).is_file():
        metas = library_metas(root)
        toks = {m.tokenizer_hash for _, m in metas if m}
        why = (f"the tokenizer differs (the library's: {', '.join(t[:12] for t in sorted(toks))}; the run's: "
               f"{tokenizer_hash[:12]})" if toks and tokenizer_hash not in toks else
               "the source's tokens differ from every stored source's (another corpus, data.max_chars or order)")
        raise StoreError(f"distill.store {root} holds no document store for source {label} (fingerprint "
                         f"{fingerprint[:16]}): {why}; it holds: {_held(metas)}. Generate it with "
                         "launch/generate_logits.py (existing sources are kept)")
    store = LogitsStore(path, verify=verify)
    m = store.meta
    where = f"document store {path} (source {label})"
    if m.context != "document":
        raise StoreError(f"{where} is a window store (format {store.manifest['format_version']}), not a document store")
    if m.data_fingerprint != fingerprint:
        raise StoreError(f"{where} holds source fingerprint {m.data_fingerprint[:16]}, the run's source has "
                         f"{fingerprint[:16]}")
    if m.tokenizer_hash != tokenizer_hash:
        raise StoreError(f"{where}: its tokenizer hash is {m.tokenizer_hash[:12]}, the run's is {tokenizer_hash[:12]}")
    if m.vocab_size != int(vocab_size):
        raise StoreError(f"{where}: its vocab_size is {m.vocab_size}, the run's is {vocab_size}")
    if teacher_seq_len is not None and m.teacher_seq_len != int(teacher_seq_len):
        raise StoreError(f"{where}: the teacher read documents in chunks of {m.teacher_seq_len} tokens, the run "
                         f"asks distill.teacher_seq_len={teacher_seq_len}")
    why = m.signal_spec.cannot_serve(signal, int(vocab_size))
    if why:
        raise StoreError(f"{where} cannot serve the run's signal: {why}")
    top_p, top_k = signal.truncation()
    store.default_top_p, store.default_top_k = float(top_p), min(int(top_k), int(vocab_size))
    return store
