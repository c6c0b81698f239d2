"""Teacher <-> student wire protocol over the bridge process group (gloo point-to-point).

gloo aborts the receiving process when a message is longer than the buffer posted for it (a shorter
one fills a prefix and leaves the rest as it was), so no message goes out before its size is known:

- preamble (every message, on the message's tag): int64 [MAGIC, VERSION, kind, body bytes, request
  number]. Its size and the meaning of its first two fields never change across versions, and every
  receiver posts it into PREAMBLE_ROOM slots, room enough for any older version's hello (10 and 12
  fields). The receiver checks the magic, the version, the kind and the size the spec allows for that
  kind before it posts the body's receive, into a buffer of exactly that size; a bad preamble is refused
  naming the sender, and nothing more is read from that sender (its body, never received, stays with it).
- hello (kind 1, both ways, once): int64 [MAGIC, VERSION, vocab, tokenizer hash, seq_len, the signal's
  width, its head's top_p*1e6, value dtype, micro-batch, index bytes, the signal's wire code
  (SignalSpec.code), hash of the signal's draw parameters, dataset samples]; each side checks the other's and fails naming both ranks. A peer of another version
  fails on the preamble's version, whatever its hello looks like.
- request (kind 2, student -> teacher): int64 [op, seq, n, sample_ids[mb], tokens[mb * seq_len]].
- reply (kind 3, teacher -> student): one uint8 buffer: int64 header [seq, n, sample_ids[mb]], then the
  signal's indices packed to `index_bytes` bytes each (3 when the vocabulary fits in 24 bits), then the
  kept raw logits in the wire dtype (bf16 on GPU, fp32 on CPU by default). Dropped entries travel as
  -inf values, so the student rebuilds the same SparseLogits the colocated path computes.
- refusal (kind 4, teacher -> student, instead of a reply): int64 [reason code, offending value].

Every wait has the peer timeout; a peer that closes its connection fails at once. Errors name the peer.
Both sides check what they receive (a request's op, count, sample ids and token ids; a reply's count,
indices and values) and refuse it naming the sender, so a faulty peer never becomes a wrong gradient.
"""
from __future__ import annotations

import datetime
import hashlib
import json
from dataclasses import dataclass, field

import numpy as np
import torch

from pd_dist.core.logits import SignalSpec, SparseLogits

MAGIC = 0x5044_4453  # "PDDS"
VERSION = 3  # 2 sent a bare 12-field hello, 1 a 10-field one; 3 put the preamble before every message
OP_WORK, OP_STOP = 1, 2
REFUSED = -1  # StagedTeacherServer's round record: a request refused instead of answered
REFUSE_MALFORMED, REFUSE_TOKENS, REFUSE_SIZE, REFUSE_IDS = 1, 2, 3, 4
REFUSALS = {REFUSE_MALFORMED: "a malformed request (op, sample count or preamble)",
            REFUSE_TOKENS: "token ids outside the vocabulary ({})",
            REFUSE_SIZE: "a request of {} bytes (another size than the handshake agreed)",
            REFUSE_IDS: "sample id {} outside the dataset"}
# Preambles travel on the first three tags (11 is where versions 1 and 2 sent their hello), bodies on
# their own tags: a body left unread after a refused preamble never meets a later preamble's receive.
TAG_HELLO, TAG_REQ, TAG_RESP, TAG_PROBE = 11, 12, 13, 14
TAG_HELLO_BODY, TAG_REQ_BODY, TAG_RESP_BODY = 15, 16, 17
BODY_TAG = {TAG_HELLO: TAG_HELLO_BODY, TAG_REQ: TAG_REQ_BODY, TAG_RESP: TAG_RESP_BODY}
KIND_HELLO, KIND_REQUEST, KIND_REPLY, KIND_REFUSAL = 1, 2, 3, 4
KINDS = {KIND_HELLO: "hello", KIND_REQUEST: "request", KIND_REPLY: "reply", KIND_REFUSAL: "refusal"}
PREAMBLE_FIELDS = ("magic", "version", "kind", "nbytes", "seq")
PREAMBLE_NBYTES = 8 * len(PREAMBLE_FIELDS)
PREAMBLE_ROOM = 32  # int64 slots a preamble is received into: any older hello (<= 12 fields) fits
REFUSAL_NBYTES = 16
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_CODES = {"fp32": 1, "bf16": 2, "fp16": 3}
HELLO_FIELDS = ("magic", "version", "vocab_size", "tokenizer_hash", "seq_len", "top_k", "top_p_x1e6",
                "value_dtype", "micro_batch", "index_bytes", "signal", "signal_params_hash", "n_samples")


# The first handshake waits for the other side to start (and, with no teacher.path, for the teacher's
# own pre-training); a peer that dies meanwhile still fails it at once.
STARTUP_TIMEOUT_S = 3600.0


class PeerError(RuntimeError):
    """A peer is gone, silent past the timeout, or speaks another protocol. The message names it."""


class BadMessage(PeerError):
    """A message the protocol does not allow here; ``code`` (REFUSALS) and ``value`` (the offending
    value) are what a teacher's refusal carries, ``seq`` the request number it answers."""

    def __init__(self, message: str, code: int, value: int = 0, seq: int = -1):
        super().__init__(message)
        self.code, self.value, self.seq = code, value, seq


class BadRequest(BadMessage):
    """A student's request that the teacher refuses (only that student is ended)."""


def tokenizer_hash_int(hex_hash: str) -> int:
    return int(hashlib.sha256(hex_hash.encode()).hexdigest()[:15], 16)


@dataclass(frozen=True)
class WireSpec:
    """What both sides must agree on; determines every buffer size. The teacher signal is ``signal``
    (a SignalSpec): the handshake carries its width, its head's top_p, its wire code and a hash of its
    draw parameters, so a student and a teacher that disagree on any of them fail it."""
    vocab_size: int
    tokenizer_hash: str
    seq_len: int
    signal: SignalSpec
    value_dtype: str      # fp32 | bf16 | fp16
    micro_batch: int
    n_samples: int = field(kw_only=True)  # the dataset's samples: request ids must lie in [0, n_samples)
    # data.document_mask: the teacher's answers depend on it (hashed with the draw parameters; absent
    # when off, so peers of versions before it agree)
    document_mask: bool = field(default=False, kw_only=True)
    # distill.teacher_context document: the chunk the teacher reads documents in (0: window context);
    # hashed likewise, absent when 0
    document_chunk: int = field(default=0, kw_only=True)
    # distill.cross_tokenizer (map | uld; "" when off): the answer is the teacher's signal formed for the
    # student's tokens, where a position no teacher position aligns with keeps no entry; hashed likewise
    cross_tokenizer: str = field(default="", kw_only=True)

    def __post_init__(self):
        if not isinstance(self.signal, SignalSpec):
            raise ValueError(f"WireSpec.signal must be a SignalSpec, got {self.signal!r}")
        if self.value_dtype not in DTYPE_CODES:
            raise ValueError(f"WireSpec.value_dtype must be one of {', '.join(DTYPE_CODES)}, got {self.value_dtype!r}")
        if isinstance(self.n_samples, bool) or int(self.n_samples) != self.n_samples or self.n_samples < 1:
            raise ValueError(f"WireSpec.n_samples must be an integer >= 1, got {self.n_samples!r}")

    @property
    def index_bytes(self) -> int:
        return 2 if self.vocab_size <= 1 << 16 else (3 if self.vocab_size <= 1 << 24 else 4)

    @property
    def width(self) -> int:
        """Entries per position on the wire (the signal's width at this vocabulary)."""
        return self.signal.width(self.vocab_size)

    def hello(self) -> torch.Tensor:
        params = self.signal.params() | ({"document_mask": True} if self.document_mask else {}) | (
            {"document_chunk": int(self.document_chunk)} if self.document_chunk else {}) | (
            {"cross_tokenizer": self.cross_tokenizer} if self.cross_tokenizer else {})
        params = json.dumps(params, sort_keys=True)
        return torch.tensor([MAGIC, VERSION, self.vocab_size, tokenizer_hash_int(self.tokenizer_hash),
                             self.seq_len, self.width, round(self.signal.wire_top_p() * 1e6),
                             DTYPE_CODES[self.value_dtype], self.micro_batch, self.index_bytes, self.signal.code,
                             tokenizer_hash_int(params), self.n_samples], dtype=torch.int64)

    def request_numel(self) -> int:
        return 3 + self.micro_batch + self.micro_batch * self.seq_len

    def response_layout(self) -> tuple[int, int, int]:
        """(header bytes, index bytes, value bytes) of one response."""
        n = self.micro_batch * self.seq_len * self.width
        vbytes = torch.finfo(DTYPES[self.value_dtype]).bits // 8
        return 8 * (2 + self.micro_batch), n * self.index_bytes, n * vbytes

    def response_nbytes(self) -> int:
        return sum(self.response_layout())

    def bytes_per_token(self) -> float:
        """Wire bytes per token for a full reply (its preamble and header amortised)."""
        return (PREAMBLE_NBYTES + self.response_nbytes()) / (self.micro_batch * self.seq_len)


def check_hello(mine: torch.Tensor, theirs: torch.Tensor, me: str, peer: str) -> None:
    diffs = [f"{name} {int(a)} here vs {int(b)} there" for name, a, b in
             zip(HELLO_FIELDS, mine.tolist(), theirs.tolist()) if a != b]
    if diffs:
        raise PeerError(f"handshake between {me} and {peer} failed: " + "; ".join(diffs))


def pack_indices(idx: torch.Tensor, nbytes: int) -> torch.Tensor:
    """int64 indices -> little-endian `nbytes`-byte integers, flat uint8."""
    b = idx.to(torch.int32).contiguous().view(torch.uint8).reshape(-1, 4)
    return b[:, :nbytes].reshape(-1) if nbytes < 4 else b.reshape(-1)


def unpack_indices(raw: torch.Tensor, nbytes: int, shape) -> torch.Tensor:
    b = raw.reshape(-1, nbytes)
    if nbytes < 4:
        b = torch.cat([b, torch.zeros(b.shape[0], 4 - nbytes, dtype=torch.uint8)], dim=1)
    return b.contiguous().view(torch.int32).reshape(shape).to(torch.int64)


def encode_response(spec: WireSpec, seq: int, sample_ids: np.ndarray, sparse: SparseLogits,
                    out: torch.Tensor) -> torch.Tensor:
    """Fill `out` (uint8, response_nbytes) with one response; `sparse` is [n, seq_len, width], n <= mb."""
    h, ib, vb = spec.response_layout()
    n = len(sample_ids)
    head = torch.zeros(2 + spec.micro_batch, dtype=torch.int64)
    head[0], head[1] = seq, n
    head[2:2 + n] = torch.as_tensor(sample_ids, dtype=torch.int64)
    out[:h] = head.view(torch.uint8)
    per = spec.seq_len * spec.width
    out[h:h + n * per * spec.index_bytes] = pack_indices(sparse.indices.reshape(n, -1), spec.index_bytes)
    vals = sparse.values.reshape(n, -1).to(DTYPES[spec.value_dtype]).contiguous().view(torch.uint8).reshape(-1)
    out[h + ib:h + ib + vals.numel()] = vals
    return out


def encode_refusal(code: int, value: int) -> torch.Tensor:
    """The body of a refusal: int64 [reason code (REFUSALS), offending value]."""
    return torch.tensor([code, value], dtype=torch.int64)


def refusal_error(body: torch.Tensor, seq: int, sender: str) -> PeerError:
    """The PeerError a student raises for a refusal of its request ``seq`` (``body``: REFUSAL_NBYTES)."""
    code, value = (int(x) for x in body.view(torch.int64)[:2])
    return PeerError(f"{sender} refused request {seq}: " + REFUSALS.get(code, f"reason {code} ({{}})").format(value))


def decode_response(spec: WireSpec, buf: torch.Tensor, sender: str = "the teacher"
                    ) -> tuple[int, np.ndarray, SparseLogits]:
    """(request number, sample ids, sparse logits) of one reply; a reply whose count, indices (outside
    the vocabulary, or one token twice among a position's kept entries) or values (NaN, +inf, a position
    with nothing kept, unless across tokenizers) are out of range is a PeerError naming ``sender``."""
    h, ib, vb = spec.response_layout()
    head = buf[:h].view(torch.int64)
    seq, n = int(head[0]), int(head[1])
    if not 0 < n <= spec.micro_batch:
        raise PeerError(f"{sender} answered request {seq} with {n} samples (1..{spec.micro_batch} expected)")
    ids = head[2:2 + n].numpy().copy()
    shape = (n, spec.seq_len, spec.width)
    per = spec.seq_len * spec.width
    idx = unpack_indices(buf[h:h + n * per * spec.index_bytes], spec.index_bytes, shape)
    dt = DTYPES[spec.value_dtype]
    vbytes = torch.finfo(dt).bits // 8
    # A copy, never a view: the buffer is reused for the next answer.
    vals = buf[h + ib:h + ib + n * per * vbytes].view(dt).reshape(shape).to(torch.float32, copy=True)
    bad = (idx < 0) | (idx >= spec.vocab_size)
    if bool(bad.any()):
        raise PeerError(f"{sender} answered request {seq} with token index {int(idx[bad][0])} outside the "
                        f"vocabulary [0, {spec.vocab_size})")
    if bool(torch.isnan(vals).any()) or bool((vals == float("inf")).any()):
        raise PeerError(f"{sender} answered request {seq} with NaN or +inf logits")
    kept = torch.isfinite(vals)
    if not spec.cross_tokenizer and not bool(kept.any(-1).all()):  # across tokenizers: unaligned positions
        raise PeerError(f"{sender} answered request {seq} with a position that keeps no entry")
    if spec.width > 1:
        # A token kept twice would count twice in the loss. Dropped slots (index 0 by convention) get
        # distinct negative keys; numpy sorts short int32 rows several times faster than torch.
        key = np.where(kept.numpy(), idx.numpy().astype(np.int32),
                       -1 - np.arange(spec.width, dtype=np.int32)).reshape(-1, spec.width)
        key.sort(axis=-1)
        dup = key[:, 1:] == key[:, :-1]
        if dup.any():
            row, col = (int(x[0]) for x in np.nonzero(dup))
            raise PeerError(f"{sender} answered request {seq} with token index {int(key[row, col])} twice at "
                            f"sample {ids[row // spec.seq_len]}, position {row % spec.seq_len}")
    return seq, ids, SparseLogits(idx, vals)


def check_request(r: torch.Tensor, spec: WireSpec, me_desc: str, student: str) -> tuple[int, int, int]:
    """(op, request number, samples) of a received request; a BadRequest naming the student for
    anything but a stop or a work request of 1..micro_batch samples whose ids lie in the dataset
    [0, n_samples) and whose token ids are in the vocabulary."""
    op, seq, n = int(r[0]), int(r[1]), int(r[2])
    if op == OP_STOP:
        return op, seq, n
    if op != OP_WORK or not 0 < n <= spec.micro_batch:
        raise BadRequest(f"{me_desc}: malformed request {seq} from student {student} (op {op}, {n} samples; "
                         f"1..{spec.micro_batch} allowed)", REFUSE_MALFORMED, 0, seq)
    ids = r[3:3 + n]
    bad = (ids < 0) | (ids >= spec.n_samples)
    if bool(bad.any()):
        v = int(ids[bad][0])
        raise BadRequest(f"{me_desc}: request {seq} from student {student} has sample id {v} outside the "
                         f"dataset [0, {spec.n_samples})", REFUSE_IDS, v, seq)
    off = 3 + spec.micro_batch
    tok = r[off:off + n * spec.seq_len]
    bad = (tok < 0) | (tok >= spec.vocab_size)
    if bool(bad.any()):
        v = int(tok[bad][0])
        raise BadRequest(f"{me_desc}: request {seq} from student {student} has token id {v} outside the "
                         f"vocabulary [0, {spec.vocab_size})", REFUSE_TOKENS, v, seq)
    return op, seq, n


def preamble(kind: int, nbytes: int, seq: int = 0) -> torch.Tensor:
    """The preamble announcing a message of ``kind`` whose body has ``nbytes`` bytes."""
    return torch.tensor([MAGIC, VERSION, kind, nbytes, seq], dtype=torch.int64)


def check_preamble(head: torch.Tensor, sizes: dict[int, int], what: str) -> tuple[int, int]:
    """(kind, request number) of a received preamble (``head``: PREAMBLE_ROOM int64, zeroed before the
    receive) whose kind is one of ``sizes`` and whose body has the size ``sizes`` gives that kind;
    otherwise a BadMessage, ``what`` (naming both sides) first."""
    magic, version, kind, nbytes, seq = (int(x) for x in head[:len(PREAMBLE_FIELDS)])
    if magic != MAGIC:
        raise BadMessage(f"{what}: not a pd-dist message (first word {magic:#x}, {MAGIC:#x} expected)",
                         REFUSE_MALFORMED)
    if version != VERSION:
        raise BadMessage(f"{what}: protocol version {VERSION} here vs {version} there", REFUSE_MALFORMED)
    name = KINDS.get(kind, f"a message of kind {kind}")
    if kind not in sizes:
        raise BadMessage(f"{what}: {name} {seq} where a {' or '.join(KINDS[k] for k in sizes)} belongs",
                         REFUSE_MALFORMED, kind, seq)
    if nbytes != sizes[kind]:
        raise BadMessage(f"{what}: {name} {seq} of {nbytes} bytes ({sizes[kind]} expected)", REFUSE_SIZE,
                         nbytes, seq)
    return kind, seq


def recv_preamble(bridge, peer: int, tag: int) -> tuple[torch.Tensor, object]:
    """Post the receive of ``peer``'s next preamble on ``tag``: (buffer, work)."""
    head = torch.zeros(PREAMBLE_ROOM, dtype=torch.int64)
    return head, bridge.recv([head], peer, tag)


def send_message(bridge, peer: int, tag: int, kind: int, body: torch.Tensor, seq: int = 0) -> list:
    """Send one message: its preamble on ``tag``, then ``body`` (its bytes) on the body tag. Returns both
    works; ``body`` must stay untouched until they complete."""
    head = preamble(kind, body.numel() * body.element_size(), seq)
    return [bridge.send([head], peer, tag), bridge.send([body], peer, BODY_TAG[tag])]


def wait_all(works, timeout_s: float, what: str) -> None:
    for w in works:
        wait(w, timeout_s, what)


def wait(work, timeout_s: float, what: str) -> None:
    """Wait for a P2P op with the peer timeout; translate gloo's errors into one clear line."""
    try:
        ok = work.wait(datetime.timedelta(seconds=timeout_s))
    except RuntimeError as e:
        text = str(e)
        reason = "closed the connection (exited or crashed)" if "closed" in text.lower() or \
            "reset" in text.lower() else ("was silent for " + f"{timeout_s:g}s" if "timed out" in text.lower()
                                          or "timeout" in text.lower() else text.splitlines()[0][:200])
        raise PeerError(f"{what}: peer {reason}") from None
    if ok is False:
        raise PeerError(f"{what}: peer was silent for {timeout_s:g}s")


def exchange_hello(bridge, spec: WireSpec, peer: int, me_desc: str, peer_desc: str, timeout_s: float) -> None:
    """Both sides send their preamble, check the other's, then exchange and check the hellos. The
    preamble's receive has room for an older version's bare hello, which fails here on its version
    field; an older peer reads this preamble as a hello of another version and fails the same way."""
    mine = spec.hello()
    what = f"handshake between {me_desc} and {peer_desc} failed"
    head, r = recv_preamble(bridge, peer, TAG_HELLO)
    s = bridge.send([preamble(KIND_HELLO, mine.numel() * 8)], peer, TAG_HELLO)
    wait(s, timeout_s, f"handshake with {peer_desc}")
    wait(r, timeout_s, f"handshake with {peer_desc}")
    check_preamble(head, {KIND_HELLO: mine.numel() * 8}, what)
    theirs = torch.zeros_like(mine)
    r = bridge.recv([theirs], peer, TAG_HELLO_BODY)
    s = bridge.send([mine], peer, TAG_HELLO_BODY)
    wait(s, timeout_s, f"handshake with {peer_desc}")
    wait(r, timeout_s, f"handshake with {peer_desc}")
    check_hello(mine, theirs, me_desc, peer_desc)


def peer_is_gone(bridge, peer: int, timeout_s: float = 2.0) -> bool:
    """True when the connection to `peer` is closed (it exited or crashed).

    Used to name the root cause when a collective failed because some rank left: a recv on a closed
    pair fails at once, on a live one it just times out (nobody sends on this tag)."""
    try:
        bridge.recv([torch.zeros(1, dtype=torch.int64)], peer, TAG_PROBE).wait(
            datetime.timedelta(seconds=timeout_s))
    except RuntimeError as e:
        return "closed" in str(e).lower() or "reset" in str(e).lower()
    return False
