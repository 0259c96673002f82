"""The server side of SecAgg+ on Flower's Message API: one secure training round over a Grid.

    aggregate = secure_train_round(grid, strategy.configure_train(...), settings, timeout)
    arrays, metrics = strategy.aggregate_train(server_round, [as_mean_reply(aggregate, messages[0])])

The server relays keys (with each enrolled device's certificate and signature, which every
device verifies) and sealed shares, sums the masked vectors and, from the shares the
surviving clients reveal, removes the self masks of the clients whose vectors arrived and the
pairwise masks towards those that dropped after sharing keys. It only ever holds the sum.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence, Sized
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
from cryptography import x509
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid

from shared import messages as keys
from shared.device_errors import describe_error
from shared.flower_compat.messages import npy_view
from shared.flower_compat.secagg import share_keys_plaintext_concat
from shared.secagg import crypto
from shared.secagg import protocol as p
from shared.secagg.client import settings_record
from shared.secagg.encoding import Layout, decode, layout_of, numpy_arrays, reduce_modulo
from shared.secagg.enrollment import verify_keys
from shared.secagg.settings import SecAggError, SecAggIntegrityError, SecAggSettings, SecAggUnverifiedPeer

S = TypeVar("S", bound=Sized)
A = TypeVar("A")
T = TypeVar("T")
_SEALED_SHARES = share_keys_plaintext_concat(0, 0, bytes(crypto.SHARE_BYTES), bytes(crypto.SHARE_BYTES))
CIPHERTEXT_BYTES = crypto.SEAL_OVERHEAD + len(_SEALED_SHARES)  # every sealed pair of shares has this length


@dataclass(frozen=True)
class Survivors:
    """Node ids left after each stage (U0 ⊇ U1 ⊇ U2 ⊇ U3 ⊇ U4 in Bell et al.)."""

    sampled: tuple[int, ...]
    advertised: tuple[int, ...] = ()  # sent public keys
    shared: tuple[int, ...] = ()  # sent sealed shares
    masked: tuple[int, ...] = ()  # sent masked vectors: exactly these updates are in the sum
    unmasked: tuple[int, ...] = ()  # sent the shares that removed the masks


@dataclass(frozen=True)
class SecureAggregate:
    """The weighted sum over the clients in `survivors.masked`, and what FedAvg makes of it."""

    weighted_sum: dict[str, np.ndarray]  # sum_i n_i x_i, each with its tensor's dtype and shape
    mean: dict[str, np.ndarray]  # weighted_sum / num_examples, same dtypes and shapes
    num_examples: int  # sum_i n_i
    metrics: dict[str, float]  # example-weighted means of the clients' scalar metrics
    survivors: Survivors
    failures: dict[int, str] = field(default_factory=dict)  # node -> why it dropped out


Replies = Callable[[Sequence[Message]], bool]  # whether the replies so far let a stage close


@dataclass(frozen=True)
class EarlyClose:
    """How the stages before unmasking may close before every client answered (the caller's cohort).

    `collect(messages, timeout, enough)` sends a stage's messages and returns its replies, stopping
    once `enough(replies)` holds (`fedserver.cohort.collect_replies`); each stage before unmasking
    waits at most `stage_timeout` s; the masked-input stage closes once `wanted` vectors are in and
    every client's secrets still have `threshold` holders among their senders: the others, late,
    are dropouts to the protocol.
    """

    collect: Callable[[list[Message], float | None, Replies | None], Iterable[Message]]
    wanted: int | None = None
    stage_timeout: float | None = None


def secure_train_round(
    grid: Grid,
    train_messages: Iterable[Message],
    settings: SecAggSettings,
    timeout: float | None = None,
    enrollment_ca: x509.Certificate | None = None,
    on_error: Callable[[int, int], None] | None = None,
    early: EarlyClose | None = None,
) -> SecureAggregate:
    """Run one SecAgg+ round with the clients `train_messages` address; train and sum securely.

    Every message must carry the same arrays (FedAvg and its kin send one global model); each
    client trains on its own message's content. A client that fails, answers wrongly or not
    in time drops out, as does one that finds a protocol message tampered with or replayed (its
    error reply says so: `SecureAggregate.failures`). Every entry of every reply is validated
    (types, sizes, node ids) before use: a reply that fails is its client dropping out, never an
    exception. Each client commits to every share it deals; a share its receiver refuses leaves
    its dealer or receiver out of the sum (`_settle_disputes`), and a client revealing a share
    unlike its commitment is named and its shares unused. The round completes while every stage
    keeps at least `threshold` clients and every secret to rebuild has `threshold` shares, else
    raises SecAggError with nothing aggregated. A rebuilt key that does not match its public key,
    or a decoded mean outside the clipping range (a malformed vector spoiled the sum), raise
    SecAggIntegrityError, the round not aggregated. `timeout` bounds the whole round: each stage
    waits what is left of it.

    With `enrollment_ca`, a client whose keys its enrolled node key did not sign, or whose
    certificate another client sent first, is dropped at advertise-keys: its neighbours, which
    verify every peer themselves, would otherwise refuse the round.

    `on_error(node, code)` is told of each error reply, at any stage, as it arrives: the round may
    still fail later, and the caller keeps its own count of who refused or failed. `early`: see EarlyClose.
    """
    secure_round = _SecureRound(grid, list(train_messages), settings, timeout, enrollment_ca, on_error, early)
    return secure_round.run()


def as_mean_reply(aggregate: SecureAggregate, reply_to: Message) -> Message:
    """One training reply holding the weighted mean and `num-examples` = the total count.

    A strategy that averages weighted by `num-examples` (FedAvg, FedProx, FedAdam, FedYogi,
    FedAdagrad, FedAvgM) aggregates this single reply to exactly `aggregate.mean`.
    """
    arrays = ArrayRecord({name: Array(np.asarray(value, order="C")) for name, value in aggregate.mean.items()})
    metrics = MetricRecord({**aggregate.metrics, keys.NUM_EXAMPLES: aggregate.num_examples})
    return Message(RecordDict({keys.ARRAYS: arrays, keys.METRICS: metrics}), reply_to=reply_to)


@dataclass
class _SecureRound:
    grid: Grid
    train: list[Message]
    settings: SecAggSettings
    timeout: float | None
    enrollment_ca: x509.Certificate | None = None
    on_error: Callable[[int, int], None] | None = None
    early: EarlyClose | None = None
    round_id: bytes = field(default_factory=lambda: os.urandom(crypto.ROUND_ID_BYTES))
    failures: dict[int, str] = field(default_factory=dict)  # node -> why it dropped out
    credentials: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)  # node -> (certificate, signature)
    commitments: dict[int, dict[int, tuple[bytes, bytes]]] = field(default_factory=dict)  # owner -> holder -> (b, sk)
    deadline: float | None = None  # the whole round's: each stage waits only what is left of `timeout`

    def __post_init__(self) -> None:
        self.deadline = None if self.timeout is None else time.monotonic() + self.timeout

    def run(self) -> SecureAggregate:
        by_node = _by_node(self.train)
        reference = _common_arrays(self.train)
        nodes = tuple(by_node)
        self._require(nodes, "sampled")
        graph = p.neighbour_graph(nodes, self.settings.degree(len(nodes)))
        public_keys = self._advertise_keys(graph)
        inbox = self._share_keys(graph, public_keys)
        total, layout, held = self._masked_inputs(by_node, inbox, layout_of(reference))
        shares, unmasked = self._unmask(held)
        self._remove_masks(total, shares, public_keys, held)
        weighted_sum, mean, count, metrics = decode(total, reference, layout, self.settings)
        survivors = Survivors(*(tuple(sorted(s)) for s in (nodes, public_keys, inbox, held, unmasked)))
        return SecureAggregate(weighted_sum, mean, count, metrics, survivors, dict(self.failures))

    # ------------------------------------------------------------------ stages

    def _advertise_keys(self, graph: Mapping[int, frozenset[int]]) -> dict[int, tuple[bytes, bytes]]:
        """U1: the clients that sent two public keys, with them."""
        base = {p.STAGE: p.ADVERTISE_KEYS, p.ROUND_ID: self.round_id, **settings_record(self.settings)}
        requests = {node: {**base, p.NEIGHBOURS: sorted(graph[node])} for node in graph}
        replies = self._exchange(p.ADVERTISE_KEYS, requests)
        return self._require(self._screen(p.ADVERTISE_KEYS, _records(replies), self._advertised), p.ADVERTISE_KEYS)

    def _advertised(self, node: int, record: ConfigRecord) -> tuple[bytes, bytes]:
        """A client's two public keys, once screened (and with an enrollment CA, verified)."""
        advertised, credentials = (record.get(p.PUBLIC_KEY_C), record.get(p.PUBLIC_KEY_S)), _credentials(record)
        if not all(map(_is_key, advertised)) or credentials is None:
            raise _Malformed("malformed public keys, certificate or signature")
        if self.enrollment_ca is not None:
            try:
                verify_keys(self.enrollment_ca, self.round_id, node, advertised, credentials)
            except SecAggUnverifiedPeer as err:
                raise _Malformed(str(err)) from None
            # verified first: a client replaying another's certificate cannot push that client out
            if any(credentials[0] == other for other, _ in self.credentials.values()):
                raise _Malformed("the certificate of another client (one device counted twice)")
        self.credentials[node] = credentials
        return advertised

    def _share_keys(
        self, graph: Mapping[int, frozenset[int]], public_keys: Mapping[int, tuple[bytes, bytes]]
    ) -> dict[int, dict[int, bytes]]:
        """U2, each with the sealed shares addressed to it by others in U2 (its inbox)."""
        peers = {node: sorted(graph[node] & public_keys.keys()) for node in public_keys}
        requests = {
            node: {
                p.STAGE: p.SHARE_KEYS, p.ROUND_ID: self.round_id, p.PEERS: peers[node],
                p.PEER_KEYS_C: [public_keys[peer][0] for peer in peers[node]],
                p.PEER_KEYS_S: [public_keys[peer][1] for peer in peers[node]],
                p.PEER_CERTIFICATES: [self.credentials[peer][0] for peer in peers[node]],
                p.PEER_SIGNATURES: [self.credentials[peer][1] for peer in peers[node]],
            }  # fmt: skip
            for node in public_keys
        }
        replies = self._exchange(p.SHARE_KEYS, requests)
        sent = self._screen(p.SHARE_KEYS, _records(replies), lambda node, record: self._dealt(node, record, peers[node]))
        inbox = {node: {src: sent[src][node] for src in sent if node in sent[src]} for node in sent}
        return self._require(inbox, p.SHARE_KEYS)

    def _dealt(self, node: int, record: ConfigRecord, peers: list[int]) -> dict[int, bytes]:
        """The sealed shares a client addressed to each of exactly its peers; its commitments are kept."""
        destinations = _node_ids(record.get(p.DESTINATIONS), peers, "destinations")
        if len(destinations) != len(peers):
            raise _Malformed("shares not addressed to exactly its peers")
        ciphertexts = _byte_strings(record.get(p.CIPHERTEXTS), "ciphertexts", len(peers), CIPHERTEXT_BYTES)
        holders = [node, *destinations]
        seed = _byte_strings(record.get(p.SEED_COMMITMENTS), "seed commitments", len(holders), crypto.DIGEST_BYTES)
        key = _byte_strings(record.get(p.KEY_COMMITMENTS), "key commitments", len(holders), crypto.DIGEST_BYTES)
        self.commitments[node] = dict(zip(holders, zip(seed, key), strict=True))
        return dict(zip(destinations, ciphertexts, strict=True))

    def _masked_inputs(
        self, by_node: Mapping[int, Message], inbox: Mapping[int, Mapping[int, bytes]], layout: Layout
    ) -> tuple[np.ndarray, Layout, dict[int, list[int]]]:
        """The sum of the masked vectors of U3, the vector layout, and U3: each node with the
        sources whose shares it holds (and masked towards)."""
        requests = {}
        for node, shares in inbox.items():
            record = {p.STAGE: p.MASKED_INPUT, p.ROUND_ID: self.round_id, p.SOURCES: list(shares),
                      p.CIPHERTEXTS: list(shares.values()),
                      p.SEED_COMMITMENTS: [self.commitments[src][node][0] for src in shares],
                      p.KEY_COMMITMENTS: [self.commitments[src][node][1] for src in shares]}  # fmt: skip
            requests[node] = RecordDict({**by_node[node].content, p.RECORD: ConfigRecord(record)})
        wanted = self.early.wanted if self.early is not None else None
        replies = self._exchange(p.MASKED_INPUT, requests, None if wanted is None else self._can_close(inbox, wanted))
        claims = self._screen(p.MASKED_INPUT, _records(replies), lambda node, record: _claims(record, list(inbox[node])))
        layout = layout.with_metrics(_most_common(metric_keys for metric_keys, _ in claims.values()))
        vectors = self._screen(
            p.MASKED_INPUT, {node: replies[node][1] for node in claims},
            lambda node, reply: _masked_vector(reply, claims[node][0], layout, self.settings.dtype),
        )  # fmt: skip
        refused = {node: set(claims[node][1]) for node in vectors}
        for node in self._settle_disputes(refused):
            del vectors[node]
        total = np.zeros(layout.length, dtype=self.settings.dtype)
        for vector in vectors.values():
            np.add(total, vector, out=total)
        held = {node: [src for src in inbox[node] if src not in refused[node]] for node in vectors}
        return total, layout, self._require(held, p.MASKED_INPUT)

    def _can_close(self, inbox: Mapping[int, Mapping[int, bytes]], wanted: int) -> Replies:
        """Whether the masked-input replies so far let the stage close: `wanted` vectors, and each
        client of U2 (sent or not) with `threshold` holders of its shares (itself among them) sent."""
        holders = {owner: {owner} | {node for node, sources in inbox.items() if owner in sources} for owner in inbox}
        t = self.settings.threshold

        def enough(replies: Sequence[Message]) -> bool:
            sent = {reply.metadata.src_node_id for reply in replies if not reply.has_error()} & inbox.keys()
            return len(sent) >= wanted and all(len(held & sent) >= t for held in holders.values())

        return enough

    def _settle_disputes(self, refused: Mapping[int, set[int]]) -> list[int]:
        """The clients left out of the sum so that no two in it dispute a share, each named.

        A refused share means its dealer or its receiver lies (or the server tampered with it):
        which, no one can tell without revealing shares, so clients are left out until no dispute
        is left between two summed ones, each time the one in most disputes (among equals the
        accused). A client that refuses several neighbours' shares is left out alone.
        """
        disputes = {(node, src) for node, sources in refused.items() for src in sources if src in refused}
        dropped = []
        while disputes:
            counts = Counter(n for dispute in disputes for n in dispute)
            accused = Counter(src for _, src in disputes)
            node = max(counts, key=lambda n: (counts[n], accused[n], -n))
            self.failures[node] = f"{p.MASKED_INPUT}: {_dispute_reason(node, disputes)}"
            disputes = {dispute for dispute in disputes if node not in dispute}
            dropped.append(node)
        return dropped

    def _unmask(self, held: Mapping[int, list[int]]) -> tuple[dict[int, list[bytes]], list[int]]:
        """The shares revealed by U4, each as its owner committed to: b-shares of U3, sk-shares of
        the dropped (U2 \\ U3 and the disputed), by owner. A client revealing another share is left out."""
        requests, kinds = {}, {}
        for node, sources in held.items():
            owners = [node, *sources]
            kinds[node] = {owner: 0 if owner in held else 1 for owner in owners}  # index into a commitment pair
            alive = [o for o in owners if o in held]
            dropped = [o for o in owners if o not in held]
            requests[node] = {p.STAGE: p.UNMASK, p.ROUND_ID: self.round_id, p.ALIVE: alive, p.DROPPED: dropped}
        replies = self._exchange(p.UNMASK, requests)
        revealed = self._screen(p.UNMASK, _records(replies), lambda node, record: self._revealed(node, record, kinds[node]))
        shares: dict[int, list[bytes]] = {}
        for by_owner in revealed.values():
            for owner, share in by_owner.items():
                shares.setdefault(owner, []).append(share)
        return shares, self._require(list(revealed), p.UNMASK)

    def _revealed(self, holder: int, record: ConfigRecord, kinds: Mapping[int, int]) -> dict[int, bytes]:
        """The shares `holder` revealed by owner, if each is the one its owner committed to."""
        owners = _node_ids(record.get(p.OWNERS), kinds, "owners")
        shares = _byte_strings(record.get(p.SHARES), "shares", len(owners), crypto.SHARE_BYTES)
        for owner, share in zip(owners, shares, strict=True):
            kind = (crypto.SEED_SHARE, crypto.KEY_SHARE)[kinds[owner]]
            if crypto.commit_share(self.round_id, owner, holder, kind, share) != self.commitments[owner][holder][kinds[owner]]:
                raise _Malformed(f"a share of node {owner} that is not the one node {owner} committed to")
        return dict(zip(owners, shares, strict=True))

    def _remove_masks(
        self,
        total: np.ndarray,
        shares: Mapping[int, list[bytes]],
        public_keys: Mapping[int, tuple[bytes, bytes]],
        held: Mapping[int, list[int]],
    ) -> None:
        """Subtract each survivor's self mask; undo survivors' pairwise masks with the dropped."""
        t = self.settings.threshold
        mask_keys: list[tuple[bytes, int]] = []
        for node in held:
            seed = crypto.rebuild_secret(shares.get(node, []), t, f"self-mask seed of node {node}")
            mask_keys.append((crypto.derive(seed, "self-mask", self.round_id), -1))
        dropped = sorted({src for sources in held.values() for src in sources} - held.keys())
        for node in dropped:  # shared keys, so the survivors holding its shares masked towards it
            sk_s = crypto.rebuild_secret(shares.get(node, []), t, f"masking key of dropped node {node}")
            if crypto.public_of(sk_s) != public_keys[node][1]:
                raise SecAggIntegrityError(f"the masking key rebuilt for node {node} does not match its public key")
            survivors = sorted(survivor for survivor, sources in held.items() if node in sources)
            peers = [(survivor, public_keys[survivor][1]) for survivor in survivors]
            pair_keys = crypto.agree_all(sk_s, peers, "pair-mask", self.round_id, node)
            undo = [-1 if survivor < node else 1 for survivor in survivors]  # the survivor added +1 towards larger ids
            mask_keys.extend(zip(pair_keys, undo, strict=True))
        crypto.apply_masks(total, mask_keys)
        reduce_modulo(total, self.settings.modulus_bits)

    # ------------------------------------------------------------------ messaging

    def _exchange(
        self, stage: str, requests: Mapping[int, Mapping | RecordDict], enough: Replies | None = None
    ) -> dict[int, tuple[ConfigRecord, Message]]:
        """Send each node its request; the replies of this stage and round, by node, within what
        is left of the round's time (before unmasking, at most `early.stage_timeout`), `enough` closing it sooner."""
        left = None if self.deadline is None else self.deadline - time.monotonic()
        if left is not None and left <= 0:
            raise SecAggError(f"secure aggregation stopped at {stage}: its time ({self.timeout:g} s) ran out")
        cap = self.early.stage_timeout if self.early is not None and stage != p.UNMASK else None
        if cap is not None:
            left = cap if left is None else min(left, cap)
        group_id = self.train[0].metadata.group_id
        messages = [
            Message(_content(request), dst_node_id=node, message_type=MessageType.TRAIN, group_id=group_id)
            for node, request in requests.items()
        ]
        replies: dict[int, tuple[ConfigRecord, Message]] = {}
        received = (
            self.grid.send_and_receive(messages, timeout=left)
            if self.early is None
            else self.early.collect(messages, left, enough)
        )
        for reply in received:
            node = reply.metadata.src_node_id
            if node not in requests or node in replies:
                continue
            record = self._reply_record(stage, node, reply)
            if record is not None:
                replies[node] = (record, reply)
        for node in requests:
            if node not in replies:
                self.failures.setdefault(node, f"{stage}: no reply")
        return replies

    def _screen(self, stage: str, items: Mapping[int, A], read: Callable[[int, A], T]) -> dict[int, T]:
        """`read(node, item)` of each item, by node; a client whose reply fails validation (`read`
        raises _Malformed) drops out with the reason: what a client sends never raises here."""
        screened = {}
        for node, item in items.items():
            try:
                screened[node] = read(node, item)
            except _Malformed as err:
                self.failures[node] = f"{stage}: {err}"
        return screened

    def _reply_record(self, stage: str, node: int, reply: Message) -> ConfigRecord | None:
        if reply.has_error():  # whatever it says, a client's error is that client dropping out
            self.failures[node] = f"{stage}: {describe_error(int(reply.error.code), reply.error.reason)}"
            if self.on_error is not None:
                self.on_error(node, int(reply.error.code))
            return None
        record = reply.content.get(p.RECORD)
        if not isinstance(record, ConfigRecord) or record.get(p.STAGE) != stage or record.get(p.ROUND_ID) != self.round_id:
            self.failures[node] = f"{stage}: a reply of another stage or round"
            return None
        return record

    def _require(self, survivors: S, stage: str) -> S:
        """`survivors` when at least `threshold` remain, else SecAggError (nothing is aggregated)."""
        count = len(survivors)
        if count < self.settings.threshold:
            reasons = "; ".join(f"node {n}: {why}" for n, why in list(self.failures.items())[:5])
            raise SecAggError(
                f"secure aggregation stopped at {stage}: {count} clients left, threshold "
                f"{self.settings.threshold}; nothing was aggregated" + (f" ({reasons})" if reasons else "")
            )
        return survivors


class _Malformed(Exception):
    """A reply entry that fails validation: its client drops out, with this as the reason."""


def _records(replies: Mapping[int, tuple[ConfigRecord, Message]]) -> dict[int, ConfigRecord]:
    return {node: record for node, (record, _) in replies.items()}


def _node_ids(value: object, allowed: Collection[int], what: str) -> list[int]:
    """`value` if a list of distinct node ids, each in `allowed`."""
    if not isinstance(value, list) or any(type(i) is not int for i in value) or len(set(value)) != len(value):
        raise _Malformed(f"{what}: not a list of distinct node ids")
    if not set(value) <= set(allowed):
        raise _Malformed(f"{what}: nodes {sorted(set(value) - set(allowed))[:5]} it was not given")
    return value


def _byte_strings(value: object, what: str, count: int, size: int) -> list[bytes]:
    """`value` if a list of `count` byte strings of `size` bytes each."""
    if not isinstance(value, list) or len(value) != count or any(not isinstance(v, bytes) or len(v) != size for v in value):
        raise _Malformed(f"{what}: not {count} byte strings of {size} bytes")
    return value


def _names(value: object, what: str) -> tuple[str, ...]:
    """`value` as a tuple if a list of at most MAX_METRIC_KEYS distinct, bounded names."""
    if (
        not isinstance(value, list) or len(value) > p.MAX_METRIC_KEYS or len(set(value)) != len(value)
        or any(not isinstance(v, str) or len(v) > p.MAX_NAME_CHARS for v in value)
    ):  # fmt: skip
        raise _Malformed(f"{what}: not a list of at most {p.MAX_METRIC_KEYS} distinct names")
    return tuple(value)


def _claims(record: ConfigRecord, sources: list[int]) -> tuple[tuple[str, ...], list[int]]:
    """A masked-input reply's metric names and the sources whose shares it refused."""
    return _names(record.get(p.METRIC_KEYS), "metric keys"), _node_ids(record.get(p.REFUSED), sources, "refused")


def _masked_vector(reply: Message, metric_keys: tuple[str, ...], layout: Layout, dtype: np.dtype) -> np.ndarray:
    """The reply's masked vector, if of `layout` (with the metrics the others send) and `dtype`."""
    if metric_keys != layout.metric_keys:
        raise _Malformed(f"metrics {list(metric_keys)[:5]} differ from the others'")
    arrays = reply.content.get(p.MASKED)
    try:
        vector = npy_view(arrays[p.VECTOR]) if isinstance(arrays, ArrayRecord) and p.VECTOR in arrays else None
    except ValueError:
        vector = None
    if vector is None or vector.dtype != dtype or vector.shape != (layout.length,):
        raise _Malformed("no masked vector of the agreed type and length")
    return vector


def _dispute_reason(node: int, disputes: Collection[tuple[int, int]]) -> str:
    accusers = sorted(receiver for receiver, dealer in disputes if dealer == node)
    refusals = sorted(dealer for receiver, dealer in disputes if receiver == node)
    named = (("its shares refused by", accusers), ("refused the shares of", refusals))
    return "; ".join(f"{what} {nodes}" for what, nodes in named if nodes)


def _content(request: Mapping | RecordDict) -> RecordDict:
    return request if isinstance(request, RecordDict) else RecordDict({p.RECORD: ConfigRecord(dict(request))})


def _by_node(messages: list[Message]) -> dict[int, Message]:
    by_node = {m.metadata.dst_node_id: m for m in messages}
    if len(by_node) != len(messages):
        raise SecAggError("secure aggregation needs one training message per client")
    return by_node


def _common_arrays(messages: list[Message]) -> dict[str, np.ndarray]:
    """The arrays every message carries (the update reference); different ones raise."""
    if not messages:
        raise SecAggError("no training messages: nothing to aggregate")
    first = messages[0].content[keys.ARRAYS]
    for message in messages[1:]:
        other = message.content[keys.ARRAYS]
        if other is not first and (
            list(other) != list(first) or any(other[k].data != first[k].data for k in first)
        ):
            raise SecAggError("secure aggregation needs every client to receive the same arrays")
    return numpy_arrays(first)


def _is_key(value: object) -> bool:
    return isinstance(value, bytes) and len(value) == 32


def _credentials(record: ConfigRecord) -> tuple[bytes, bytes] | None:
    """An advertise-keys reply's (certificate, signature): (b"", b"") if unsigned, None if malformed."""
    certificate, signature = record.get(p.CERTIFICATE, b""), record.get(p.SIGNATURE, b"")
    if not all(isinstance(v, bytes) and len(v) <= p.MAX_SIGNED_BYTES for v in (certificate, signature)):
        return None
    return (certificate, signature) if bool(certificate) == bool(signature) else None


def _most_common(values: Iterable[tuple[str, ...]]) -> tuple[str, ...]:
    counts = Counter(values)
    return counts.most_common(1)[0][0] if counts else ()
