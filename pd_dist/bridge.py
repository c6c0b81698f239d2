"""Teacher <-> student wire protocol over the bridge process group (gloo point-to-point).

Messages are fixed-size tensors, so receivers post their buffers ahead of time:

- hello (both ways, once): int64 [MAGIC, VERSION, vocab, tokenizer hash, seq_len, top_k, top_p*1e6,
  value dtype, micro-batch, index bytes, signal kind, hash of the signal's draw parameters]; each side
  checks the other's and fails naming both ranks. (Version 2 added the last two fields.)
- request (student -> teacher): int64 [op, seq, n, sample_ids[mb], tokens[mb * seq_len]].
- response (teacher -> student): one uint8 buffer: int64 header [seq, n, sample_ids[mb]], then the
  signal's indices packed to `index_bytes` bytes each (3 when the vocabulary fits in 24 bits), then the
  kept raw logits in the wire dtype (bf16 on GPU, fp32 on CPU by default). Dropped entries travel as
  -inf values, so the student rebuilds the same SparseLogits the colocated path computes. A refused
  request is answered with n = REFUSED and [reason code, offending value] in the sample-id slots.

Every wait has the peer timeout; a peer that closes its connection fails at once. Errors name the peer.
Both sides check what they receive (a request's op, count and token ids; a reply's count, indices and
values) and refuse it naming the sender, so a faulty peer never becomes a wrong gradient. Every buffer
size is a function of the hello's fields and the hello has one size, so once the handshake agrees no
message can reach a buffer of another size (gloo aborts the process when one does).
"""
from __future__ import annotations

import datetime
import hashlib
from dataclasses import dataclass

import numpy as np
import torch

from .logits import SparseLogits

MAGIC = 0x5044_4453  # "PDDS"
VERSION = 2
OP_WORK, OP_STOP = 1, 2
REFUSED = -1  # a response's n when the teacher refused the request
REFUSE_MALFORMED, REFUSE_TOKENS = 1, 2
REFUSALS = {REFUSE_MALFORMED: "a malformed request (op or sample count)",
            REFUSE_TOKENS: "token ids outside the vocabulary"}
TAG_HELLO, TAG_REQ, TAG_RESP, TAG_PROBE = 11, 12, 13, 14
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_CODES = {"fp32": 1, "bf16": 2, "fp16": 3}
HELLO_FIELDS = ("magic", "version", "vocab_size", "tokenizer_hash", "seq_len", "top_k", "top_p_x1e6",
                "value_dtype", "micro_batch", "index_bytes", "signal", "signal_params_hash")
SIGNAL_CODES = {"top_p_k": 0, "sampled": 1, "head_tail": 2}


class PeerError(RuntimeError):
    """A peer is gone, silent past the timeout, or speaks another protocol. The message names it."""


class BadRequest(PeerError):
    """A student's request that the teacher refuses (only that student is ended)."""

    def __init__(self, message: str, code: int, value: int = 0):
        super().__init__(message)
        self.code, self.value = code, value


def tokenizer_hash_int(hex_hash: str) -> int:
    return int(hashlib.sha256(hex_hash.encode()).hexdigest()[:15], 16)


@dataclass(frozen=True)
class WireSpec:
    """What both sides must agree on; determines every buffer size."""
    vocab_size: int
    tokenizer_hash: str
    seq_len: int
    top_k: int
    top_p: float
    value_dtype: str      # fp32 | bf16 | fp16
    micro_batch: int
    signal: str = "top_p_k"  # pd_dist.logits.SIGNAL_KINDS; top_k is the signal's width
    signal_params: str = ""  # canonical JSON of the draws' parameters (SignalSpec.params)

    @property
    def index_bytes(self) -> int:
        return 2 if self.vocab_size <= 1 << 16 else (3 if self.vocab_size <= 1 << 24 else 4)

    @property
    def width(self) -> int:
        return min(self.top_k, self.vocab_size)

    def hello(self) -> torch.Tensor:
        return torch.tensor([MAGIC, VERSION, self.vocab_size, tokenizer_hash_int(self.tokenizer_hash),
                             self.seq_len, self.top_k, round(self.top_p * 1e6), DTYPE_CODES[self.value_dtype],
                             self.micro_batch, self.index_bytes, SIGNAL_CODES[self.signal],
                             tokenizer_hash_int(self.signal_params)], dtype=torch.int64)

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
        """Wire bytes per token for a full response (header amortised)."""
        return self.response_nbytes() / (self.micro_batch * self.seq_len)


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


def encode_refusal(spec: WireSpec, seq: int, code: int, value: int, out: torch.Tensor) -> torch.Tensor:
    """Fill `out` (uint8, response_nbytes) with the answer to a refused request."""
    h = spec.response_layout()[0]
    head = torch.zeros(2 + spec.micro_batch, dtype=torch.int64)
    head[0], head[1], head[2] = seq, REFUSED, code
    if spec.micro_batch > 1:
        head[3] = value
    out.zero_()
    out[:h] = head.view(torch.uint8)
    return out


def decode_response(spec: WireSpec, buf: torch.Tensor, sender: str = "the teacher"
                    ) -> tuple[int, np.ndarray, SparseLogits]:
    """(request number, sample ids, sparse logits) of one response; a refusal, or a reply whose count,
    indices (outside the vocabulary) or values (NaN, +inf, a position with nothing kept) are out of
    range, is a PeerError naming ``sender``."""
    h, ib, vb = spec.response_layout()
    head = buf[:h].view(torch.int64)
    seq, n = int(head[0]), int(head[1])
    if n == REFUSED:
        code = int(head[2])
        detail = f" ({int(head[3])})" if spec.micro_batch > 1 and code == REFUSE_TOKENS else ""
        raise PeerError(f"{sender} refused request {seq}: {REFUSALS.get(code, f'reason {code}')}{detail}")
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
    if not bool(torch.isfinite(vals).any(-1).all()):
        raise PeerError(f"{sender} answered request {seq} with a position that keeps no entry")
    return seq, ids, SparseLogits(idx, vals)


def check_request(r: torch.Tensor, spec: WireSpec, me_desc: str, student: str) -> tuple[int, int, int]:
    """(op, request number, samples) of a received request; a BadRequest naming the student for
    anything but a stop or a work request of 1..micro_batch samples whose token ids are in the
    vocabulary."""
    op, seq, n = int(r[0]), int(r[1]), int(r[2])
    if op == OP_STOP:
        return op, seq, n
    if op != OP_WORK or not 0 < n <= spec.micro_batch:
        raise BadRequest(f"{me_desc}: malformed request {seq} from student {student} (op {op}, {n} samples; "
                         f"1..{spec.micro_batch} allowed)", REFUSE_MALFORMED)
    off = 3 + spec.micro_batch
    tok = r[off:off + n * spec.seq_len]
    bad = (tok < 0) | (tok >= spec.vocab_size)
    if bool(bad.any()):
        v = int(tok[bad][0])
        raise BadRequest(f"{me_desc}: request {seq} from student {student} has token id {v} outside the "
                         f"vocabulary [0, {spec.vocab_size})", REFUSE_TOKENS, v)
    return op, seq, n


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
    mine = spec.hello()
    theirs = torch.zeros_like(mine)
    r = bridge.recv([theirs], peer, TAG_HELLO)
    s = bridge.send([mine], peer, TAG_HELLO)
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
