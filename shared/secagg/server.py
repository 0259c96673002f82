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
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sized
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
from cryptography import x509
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid

from shared import messages as keys
from shared.device_errors import describe_error
from shared.secagg import crypto
from shared.secagg import protocol as p
from shared.secagg.client import settings_record
from shared.secagg.encoding import Layout, decode, layout_of, numpy_arrays, reduce_modulo
from shared.secagg.enrollment import verify_keys
from shared.secagg.settings import SecAggError, SecAggIntegrityError, SecAggSettings, SecAggUnverifiedPeer

S = TypeVar("S", bound=Sized)


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


def secure_train_round(
    grid: Grid,
    train_messages: Iterable[Message],
    settings: SecAggSettings,
    timeout: float | None = None,
    enrollment_ca: x509.Certificate | None = None,
    on_error: Callable[[int, int], None] | None = None,
) -> SecureAggregate:
    """Run one SecAgg+ round with the clients `train_messages` address; train and sum securely.

    Every message must carry the same arrays (FedAvg and its kin send one global model); each
    client trains on its own message's content. A client that fails, answers wrongly or not
    in time drops out, as does one that finds a protocol message tampered with or replayed (its
    error reply says so: `SecureAggregate.failures`); the round completes while every stage keeps
    at least `threshold` clients and every secret to rebuild has `threshold` shares, else raises
    SecAggError with nothing aggregated. A rebuilt key that does not match its public key, or a
    decoded mean outside the clipping range (a malformed vector spoiled the sum), raise
    SecAggIntegrityError: no client can be blamed, the round is not aggregated.

    With `enrollment_ca`, a client whose keys its enrolled node key did not sign, or whose
    certificate another client sent first, is dropped at advertise-keys: its neighbours, which
    verify every peer themselves, would otherwise refuse the round.

    `on_error(node, code)` is told of each error reply, at any stage, as it arrives: the round may
    still fail later, and the caller keeps its own count of who refused or failed.
    """
    secure_round = _SecureRound(grid, list(train_messages), settings, timeout, enrollment_ca, on_error)
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
    round_id: bytes = field(default_factory=lambda: os.urandom(crypto.ROUND_ID_BYTES))
    failures: dict[int, str] = field(default_factory=dict)  # node -> why it dropped out
    credentials: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)  # node -> (certificate, signature)

    def run(self) -> SecureAggregate:
        by_node = _by_node(self.train)
        reference = _common_arrays(self.train)
        nodes = tuple(by_node)
        self._require(nodes, "sampled")
        graph = p.neighbour_graph(nodes, self.settings.degree(len(nodes)))
        public_keys = self._advertise_keys(graph)
        inbox = self._share_keys(graph, public_keys)
        total, layout, masked = self._masked_inputs(by_node, inbox, layout_of(reference))
        shares, unmasked = self._unmask(inbox, masked)
        self._remove_masks(total, shares, graph, public_keys, list(inbox), masked)
        weighted_sum, mean, count, metrics = decode(total, reference, layout, self.settings)
        survivors = Survivors(*(tuple(sorted(s)) for s in (nodes, public_keys, inbox, masked, unmasked)))
        return SecureAggregate(weighted_sum, mean, count, metrics, survivors, dict(self.failures))

    # ------------------------------------------------------------------ stages

    def _advertise_keys(self, graph: Mapping[int, frozenset[int]]) -> dict[int, tuple[bytes, bytes]]:
        """U1: the clients that sent two public keys, with them."""
        base = {p.STAGE: p.ADVERTISE_KEYS, p.ROUND_ID: self.round_id, **settings_record(self.settings)}
        requests = {node: {**base, p.NEIGHBOURS: sorted(graph[node])} for node in graph}
        public_keys = {}
        for node, (record, _) in self._exchange(p.ADVERTISE_KEYS, requests).items():
            advertised, credentials = (record.get(p.PUBLIC_KEY_C), record.get(p.PUBLIC_KEY_S)), _credentials(record)
            failure = self._screen_keys(node, advertised, credentials)
            if failure is None:
                public_keys[node], self.credentials[node] = advertised, credentials
            else:
                self.failures[node] = f"advertise-keys: {failure}"
        return self._require(public_keys, p.ADVERTISE_KEYS)

    def _screen_keys(self, node: int, advertised: tuple, credentials: tuple[bytes, bytes] | None) -> str | None:
        """Why a client's advertised keys cannot be relayed, or None."""
        if not all(map(_is_key, advertised)) or credentials is None:
            return "malformed public keys, certificate or signature"
        if self.enrollment_ca is None:
            return None
        try:
            verify_keys(self.enrollment_ca, self.round_id, node, advertised, credentials)
        except SecAggUnverifiedPeer as err:
            return str(err)
        # verified first: a client replaying another's certificate cannot push that client out
        if any(credentials[0] == other for other, _ in self.credentials.values()):
            return "the certificate of another client (one device counted twice)"
        return None

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
        sent: dict[int, dict[int, bytes]] = {}
        for node, (record, _) in self._exchange(p.SHARE_KEYS, requests).items():
            destinations, ciphertexts = record.get(p.DESTINATIONS, []), record.get(p.CIPHERTEXTS, [])
            if sorted(destinations) == peers[node] and len(destinations) == len(ciphertexts):
                sent[node] = dict(zip(destinations, ciphertexts, strict=True))
            else:
                self.failures[node] = "share-keys: shares not addressed to exactly its peers"
        inbox = {node: {src: sent[src][node] for src in sent if node in sent[src]} for node in sent}
        return self._require(inbox, p.SHARE_KEYS)

    def _masked_inputs(
        self, by_node: Mapping[int, Message], inbox: Mapping[int, Mapping[int, bytes]], layout: Layout
    ) -> tuple[np.ndarray, Layout, list[int]]:
        """The sum of the masked vectors of U3, the vector layout, and U3."""
        requests = {}
        for node, shares in inbox.items():
            record = {p.STAGE: p.MASKED_INPUT, p.ROUND_ID: self.round_id, p.SOURCES: list(shares),
                      p.CIPHERTEXTS: list(shares.values())}  # fmt: skip
            requests[node] = RecordDict({**by_node[node].content, p.RECORD: ConfigRecord(record)})
        replies = self._exchange(p.MASKED_INPUT, requests)
        metric_keys = _most_common(tuple(record.get(p.METRIC_KEYS, [])) for record, _ in replies.values())
        layout = layout.with_metrics(metric_keys)
        total = np.zeros(layout.length, dtype=self.settings.dtype)
        masked = []
        for node, (record, reply) in replies.items():
            vector = self._masked_vector(node, record, reply, layout)
            if vector is not None:
                np.add(total, vector, out=total)
                masked.append(node)
        return total, layout, self._require(masked, p.MASKED_INPUT)

    def _masked_vector(self, node: int, record: ConfigRecord, reply: Message, layout: Layout) -> np.ndarray | None:
        arrays = reply.content.get(p.MASKED)
        vector = arrays[p.VECTOR].numpy() if isinstance(arrays, ArrayRecord) and p.VECTOR in arrays else None
        if tuple(record.get(p.METRIC_KEYS, [])) != layout.metric_keys:
            self.failures[node] = f"masked-input: metrics {record.get(p.METRIC_KEYS)} differ from the others'"
        elif vector is None or vector.dtype != self.settings.dtype or vector.shape != (layout.length,):
            self.failures[node] = "masked-input: no masked vector of the agreed type and length"
        else:
            return vector
        return None

    def _unmask(self, inbox: Mapping[int, Mapping[int, bytes]], masked: list[int]) -> tuple[dict, list[int]]:
        """The shares revealed by U4: b-shares of U3 and sk-shares of U2 \\ U3, by owner."""
        alive_set = set(masked)
        requests, asked = {}, {}
        for node in masked:
            owners = [node, *inbox[node]]
            alive = [o for o in owners if o in alive_set]
            dropped = [o for o in owners if o not in alive_set]
            asked[node] = set(owners)
            requests[node] = {p.STAGE: p.UNMASK, p.ROUND_ID: self.round_id, p.ALIVE: alive, p.DROPPED: dropped}
        shares: dict[int, list[bytes]] = {}
        unmasked = []
        for node, (record, _) in self._exchange(p.UNMASK, requests).items():
            owners, revealed = record.get(p.OWNERS, []), record.get(p.SHARES, [])
            if len(owners) != len(revealed) or not set(owners) <= asked[node]:
                self.failures[node] = "unmask: shares of nodes it was not asked about"
                continue
            for owner, share in zip(owners, revealed, strict=True):
                shares.setdefault(owner, []).append(share)
            unmasked.append(node)
        return shares, self._require(unmasked, p.UNMASK)

    def _remove_masks(
        self,
        total: np.ndarray,
        shares: Mapping[int, list[bytes]],
        graph: Mapping[int, frozenset[int]],
        public_keys: Mapping[int, tuple[bytes, bytes]],
        shared: list[int],
        masked: list[int],
    ) -> None:
        """Subtract each survivor's self mask; undo survivors' pairwise masks with the dropped."""
        t = self.settings.threshold
        alive = set(masked)
        mask_keys: list[tuple[bytes, int]] = []
        for node in masked:
            seed = crypto.rebuild_secret(shares.get(node, []), t, f"self-mask seed of node {node}")
            mask_keys.append((crypto.derive(seed, "self-mask", self.round_id), -1))
        dropped = [node for node in shared if node not in alive and graph[node] & alive]
        for node in dropped:  # shared keys, so its neighbours in U3 masked towards it
            sk_s = crypto.rebuild_secret(shares.get(node, []), t, f"masking key of dropped node {node}")
            if crypto.public_of(sk_s) != public_keys[node][1]:
                raise SecAggIntegrityError(f"the masking key rebuilt for node {node} does not match its public key")
            survivors = sorted(graph[node] & alive)
            peers = [(survivor, public_keys[survivor][1]) for survivor in survivors]
            pair_keys = crypto.agree_all(sk_s, peers, "pair-mask", self.round_id, node)
            undo = [-1 if survivor < node else 1 for survivor in survivors]  # the survivor added +1 towards larger ids
            mask_keys.extend(zip(pair_keys, undo, strict=True))
        crypto.apply_masks(total, mask_keys)
        reduce_modulo(total, self.settings.modulus_bits)

    # ------------------------------------------------------------------ messaging

    def _exchange(
        self, stage: str, requests: Mapping[int, Mapping | RecordDict]
    ) -> dict[int, tuple[ConfigRecord, Message]]:
        """Send each node its request; the well-formed replies of this stage and round, by node."""
        group_id = self.train[0].metadata.group_id
        messages = [
            Message(_content(request), dst_node_id=node, message_type=MessageType.TRAIN, group_id=group_id)
            for node, request in requests.items()
        ]
        replies: dict[int, tuple[ConfigRecord, Message]] = {}
        for reply in self.grid.send_and_receive(messages, timeout=self.timeout):
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
