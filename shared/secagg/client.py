"""The client side of SecAgg+: a ClientApp mod, `ClientApp(mods=[secagg_mod])`.

Other messages pass through, except plain training when the run sets `secure-aggregation`
(refused: the update never leaves unmasked). A node keeps its keys, seed and held shares in
`context.state` between stages and deletes them once it has unmasked. Under `dp = "distributed"`
it clips and adds its share of the noise before masking; an enrolled device signs its keys and
verifies its peers (enrollment.py). In full: docs/secure-aggregation.md and docs/privacy.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict

from shared import messages as keys
from shared.flower_compat.dp import add_gaussian_noise_inplace, compute_clip_model_update
from shared.flower_compat.messages import ClientAppCallable
from shared.flower_compat.secagg import share_keys_plaintext_concat, share_keys_plaintext_separate
from shared.secagg import crypto
from shared.secagg import protocol as p
from shared.secagg.encoding import encode, layout_of, numpy_arrays, reduce_modulo
from shared.secagg.enrollment import Enrollment, load_enrollment, sign_keys, verify_peers
from shared.secagg.settings import SWITCH_KEY, SecAggError, SecAggIntegrityError, SecAggSettings

STATE = "secagg-state"  # the ConfigRecord in context.state
_SETTINGS_KEYS = {
    p.THRESHOLD: "threshold",
    p.DEGREE: "neighbours",
    p.CLIPPING_RANGE: "clipping_range",
    p.QUANTIZATION_RANGE: "quantization_range",
    p.MODULUS_BITS: "modulus_bits",
    p.METRIC_CLIPPING_RANGE: "metric_clipping_range",
}


def settings_record(settings: SecAggSettings) -> dict[str, int | float]:
    """The settings as `secagg` ConfigRecord entries (the server sends them at advertise-keys)."""
    return {key: getattr(settings, name) for key, name in _SETTINGS_KEYS.items()}


def settings_from_record(record: ConfigRecord) -> SecAggSettings:
    try:
        return SecAggSettings(**{name: record[key] for key, name in _SETTINGS_KEYS.items()})
    except (KeyError, ValueError, TypeError) as err:
        raise SecAggError(f"unusable settings from the server: {err}") from None


@dataclass(frozen=True)
class NodeState:
    """One node's secrets and view of one secure round."""

    round_id: bytes
    stage: str
    node: int
    settings: SecAggSettings
    sk_c: bytes  # X25519 private key for the share-encryption keys (dropped once they are derived)
    sk_s: bytes  # X25519 private key for pairwise masks (Shamir-shared)
    pk_c: bytes
    pk_s: bytes
    neighbours: tuple[int, ...] = ()
    peers: tuple[int, ...] = ()  # neighbours whose keys arrived at share-keys
    share_keys: tuple[bytes, ...] = ()  # AES-GCM key with each peer, parallel to `peers`
    peer_pk_s: tuple[bytes, ...] = ()
    seed: bytes = b""  # the self-mask seed b (Shamir-shared)
    owners: tuple[int, ...] = ()  # whose shares this node holds (itself first)
    b_shares: tuple[bytes, ...] = ()
    sk_shares: tuple[bytes, ...] = ()

    def to_record(self) -> ConfigRecord:
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "settings"}
        values = {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}
        return ConfigRecord({**values, **settings_record(self.settings)})

    @classmethod
    def from_record(cls, record: ConfigRecord) -> NodeState:
        kwargs = {}
        for f in dataclasses.fields(cls):
            if f.name != "settings":
                value = record[f.name]
                kwargs[f.name] = tuple(value) if f.default == () else value
        return cls(settings=settings_from_record(record), **kwargs)

    def peer_index(self, node: int) -> int:
        return self.peers.index(node)


def secagg_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Run a SecAgg+ stage when `msg` is one; pass anything else to `call_next`."""
    request = stage_request(msg)
    if request is None:
        _refuse_plaintext_training(msg, context)
        return call_next(msg, context)
    stage = request.get(p.STAGE)
    node = msg.metadata.dst_node_id
    masked: ArrayRecord | None = None
    if stage == p.ADVERTISE_KEYS:
        state, reply = _advertise_keys(request, node, load_enrollment(context.node_config))
    else:
        previous = _load_state(context, request, stage)
        if stage == p.SHARE_KEYS:
            state, reply = _share_keys(previous, request, load_enrollment(context.node_config))
        elif stage == p.MASKED_INPUT:
            state, reply, masked = _masked_input(previous, request, msg, context, call_next)
        else:
            state, reply = _unmask(previous, request)
    if stage == p.UNMASK:
        del context.state[STATE]  # the secrets of this round go; no second unmask
    else:
        context.state[STATE] = state.to_record()
    content = RecordDict({p.RECORD: ConfigRecord({p.STAGE: stage, p.ROUND_ID: state.round_id, **reply})})
    if masked is not None:
        content[p.MASKED] = masked
    return Message(content, reply_to=msg)


def stage_request(msg: Message) -> ConfigRecord | None:
    """The `secagg` record of a secure-aggregation stage message; None for any other message."""
    if msg.metadata.message_type != MessageType.TRAIN or not msg.has_content():
        return None
    record = msg.content.get(p.RECORD)
    return record if isinstance(record, ConfigRecord) else None


def _refuse_plaintext_training(msg: Message, context: Context) -> None:
    if msg.metadata.message_type == MessageType.TRAIN and context.run_config.get(SWITCH_KEY) is True:
        raise SecAggError("secure aggregation is on: refusing to send a plaintext update")


def _load_state(context: Context, request: ConfigRecord, stage: object) -> NodeState:
    if stage not in p.STAGES:
        raise SecAggError(f"unknown secure aggregation stage {stage!r}")
    record = context.state.get(STATE)
    if not isinstance(record, ConfigRecord):
        raise SecAggError(f"stage {stage}: no secure round in progress on this node")
    state = NodeState.from_record(record)
    if request.get(p.ROUND_ID) != state.round_id:
        raise SecAggIntegrityError(f"stage {stage}: message of another round (stale or replayed)")
    expected = p.STAGES[p.STAGES.index(state.stage) + 1] if state.stage != p.UNMASK else None
    if stage != expected:
        raise SecAggError(f"stage {stage} out of order: this node is at {state.stage}, expects {expected}")
    return state


def _advertise_keys(request: ConfigRecord, node: int, enrollment: Enrollment | None) -> tuple[NodeState, dict]:
    settings = settings_from_record(request)
    round_id = request.get(p.ROUND_ID)
    if not isinstance(round_id, bytes) or len(round_id) != crypto.ROUND_ID_BYTES:
        raise SecAggError("advertise-keys: a round id of 16 bytes is required")
    neighbours = tuple(request.get(p.NEIGHBOURS, []))
    _check_ids(neighbours, allowed=None, node=node, what="neighbours")
    if len(neighbours) > settings.neighbours:
        raise SecAggError(f"advertise-keys: {len(neighbours)} neighbours, more than the degree {settings.neighbours}")
    _check_group(len(neighbours) + 1, settings.threshold, "advertise-keys: neighbourhood")
    sk_c, pk_c = crypto.new_key_pair()
    sk_s, pk_s = crypto.new_key_pair()
    state = NodeState(round_id, p.ADVERTISE_KEYS, node, settings, sk_c, sk_s, pk_c, pk_s, neighbours)
    signed = sign_keys(enrollment, round_id, node, pk_c, pk_s) if enrollment else {}
    return state, {p.PUBLIC_KEY_C: pk_c, p.PUBLIC_KEY_S: pk_s, **signed}


def _share_keys(state: NodeState, request: ConfigRecord, enrollment: Enrollment | None) -> tuple[NodeState, dict]:
    peers = tuple(request[p.PEERS])
    pk_c, pk_s = tuple(request[p.PEER_KEYS_C]), tuple(request[p.PEER_KEYS_S])
    _check_ids(peers, allowed=set(state.neighbours), node=state.node, what="peers")
    if not len(peers) == len(pk_c) == len(pk_s):
        raise SecAggError("share-keys: peers and their public keys differ in number")
    all_keys = pk_c + pk_s
    if len(set(all_keys)) != len(all_keys) or {state.pk_c, state.pk_s} & set(all_keys):
        raise SecAggIntegrityError("share-keys: repeated public keys")
    if enrollment is not None:  # before any share is made: a server cannot swap keys or invent peers
        credentials = zip(request.get(p.PEER_CERTIFICATES, []), request.get(p.PEER_SIGNATURES, []))
        verify_peers(enrollment, state.round_id, peers, list(zip(pk_c, pk_s)), list(credentials))
    _check_group(len(peers) + 1, state.settings.threshold, "share-keys: neighbours with keys")
    seed = os.urandom(crypto.SEED_BYTES)
    count, threshold = len(peers) + 1, state.settings.threshold
    b_shares = crypto.split_secret(seed, threshold, count)
    sk_shares = crypto.split_secret(state.sk_s, threshold, count)
    share_keys = crypto.agree_all(state.sk_c, zip(peers, pk_c), "share-key", state.round_id, state.node)
    holders = (state.node, *peers)
    commitments = {
        p.SEED_COMMITMENTS: _commitments(state.round_id, state.node, holders, crypto.SEED_SHARE, b_shares),
        p.KEY_COMMITMENTS: _commitments(state.round_id, state.node, holders, crypto.KEY_SHARE, sk_shares),
    }
    ciphertexts = []
    for i, (peer, key) in enumerate(zip(peers, share_keys, strict=True)):
        plaintext = share_keys_plaintext_concat(state.node, peer, b_shares[i + 1], sk_shares[i + 1])
        aad = crypto.share_aad(state.round_id, p.SHARE_KEYS, state.node, peer)
        ciphertexts.append(crypto.seal(key, plaintext, aad))
    state = dataclasses.replace(
        state, stage=p.SHARE_KEYS, sk_c=b"", peers=peers, share_keys=tuple(share_keys), peer_pk_s=pk_s, seed=seed,
        owners=(state.node,), b_shares=(b_shares[0],), sk_shares=(sk_shares[0],),
    )  # fmt: skip
    return state, {p.DESTINATIONS: list(peers), p.CIPHERTEXTS: ciphertexts, **commitments}


def _commitments(round_id: bytes, owner: int, holders: tuple[int, ...], kind: bytes, shares: list[bytes]) -> list[bytes]:
    return [crypto.commit_share(round_id, owner, holder, kind, share) for holder, share in zip(holders, shares, strict=True)]


def _masked_input(
    state: NodeState, request: ConfigRecord, msg: Message, context: Context, call_next: ClientAppCallable
) -> tuple[NodeState, dict, ArrayRecord]:
    sources, ciphertexts = tuple(request[p.SOURCES]), list(request[p.CIPHERTEXTS])
    seed_commitments, key_commitments = list(request[p.SEED_COMMITMENTS]), list(request[p.KEY_COMMITMENTS])
    if len(sources) != len(set(sources)):
        raise SecAggIntegrityError("masked-input: the same source's share arrived twice (replayed)")
    _check_ids(sources, allowed=set(state.peers), node=state.node, what="sources")
    if not len(sources) == len(ciphertexts) == len(seed_commitments) == len(key_commitments):
        raise SecAggError("masked-input: sources, ciphertexts and commitments differ in number")
    _check_group(len(sources) + 1, state.settings.threshold, "masked-input: neighbours that shared keys")
    held = {}  # source -> (b-share, sk-share); a share that fails to open or verify is refused, not fatal
    for src, blob, commitments in zip(sources, ciphertexts, zip(seed_commitments, key_commitments), strict=True):
        with contextlib.suppress(SecAggIntegrityError):
            held[src] = _open_share(state, src, blob, commitments)
    accepted = tuple(held)
    state = dataclasses.replace(
        state, stage=p.MASKED_INPUT, owners=state.owners + accepted,
        b_shares=state.b_shares + tuple(b for b, _ in held.values()),
        sk_shares=state.sk_shares + tuple(sk for _, sk in held.values()),
    )  # fmt: skip
    reference = numpy_arrays(msg.content[keys.ARRAYS])
    update, weight, metrics = _train(msg, context, call_next)
    distributed_dp = distributed_dp_settings(context.run_config)
    if distributed_dp is not None:  # on this device, before encoding and masking
        update, weight = noised_update(update, reference, *distributed_dp), 1
    layout = layout_of(reference).with_metrics(tuple(sorted(metrics)))
    vector = encode(update, reference, weight, metrics, layout, state.settings)
    crypto.apply_masks(vector, _mask_keys(state, accepted))  # no pairwise mask with a refused source
    reduce_modulo(vector, state.settings.modulus_bits)
    masked = ArrayRecord({p.VECTOR: Array(vector)})
    refused = [src for src in sources if src not in held]
    return state, {p.METRIC_KEYS: list(layout.metric_keys), p.REFUSED: refused}, masked


def _open_share(state: NodeState, src: int, blob: object, commitments: tuple[object, object]) -> tuple[bytes, bytes]:
    """`src`'s (b-share, sk-share) for this node, if authentic and as `src` committed to; else SecAggIntegrityError."""
    if not isinstance(blob, bytes):
        raise SecAggIntegrityError(f"node {state.node}: the share from node {src} is not bytes")
    key = state.share_keys[state.peer_index(src)]
    aad = crypto.share_aad(state.round_id, p.SHARE_KEYS, src, state.node)
    plaintext = crypto.unseal(key, blob, aad, f"node {state.node}: share from node {src}")
    actual_src, dst, b_share, sk_share = share_keys_plaintext_separate(plaintext)
    if (actual_src, dst) != (src, state.node):
        raise SecAggIntegrityError(f"node {state.node}: share from node {src} was made for {actual_src} -> {dst}")
    if not len(b_share) == len(sk_share) == crypto.SHARE_BYTES:
        raise SecAggIntegrityError(f"node {state.node}: the shares from node {src} are not of {crypto.SHARE_BYTES} bytes")
    expected = tuple(
        crypto.commit_share(state.round_id, src, state.node, kind, share)
        for kind, share in ((crypto.SEED_SHARE, b_share), (crypto.KEY_SHARE, sk_share))
    )
    if expected != commitments:
        raise SecAggIntegrityError(f"node {state.node}: the share from node {src} is not the one it committed to")
    return b_share, sk_share


def _mask_keys(state: NodeState, sources: tuple[int, ...]) -> list[tuple[bytes, int]]:
    """The self mask (+) and one pairwise mask per source: + towards larger ids, - towards smaller."""
    peers = [(src, state.peer_pk_s[state.peer_index(src)]) for src in sources]
    pair_keys = crypto.agree_all(state.sk_s, peers, "pair-mask", state.round_id, state.node)
    signs = [1 if state.node < src else -1 for src in sources]
    return [(crypto.derive(state.seed, "self-mask", state.round_id), 1), *zip(pair_keys, signs, strict=True)]


def _train(msg: Message, context: Context, call_next: ClientAppCallable) -> tuple[dict[str, np.ndarray], int, dict]:
    """Run the wrapped ClientApp on the round's training content; its arrays, count and metrics."""
    original = msg.content
    msg.content = RecordDict({name: record for name, record in original.items() if name != p.RECORD})
    try:
        reply = call_next(msg, context)
    finally:
        msg.content = original
    if reply.has_error():
        raise SecAggError(f"training failed: {reply.error.reason}")
    array_records = list(reply.content.array_records.values())
    metric_records = list(reply.content.metric_records.values())
    if len(array_records) != 1 or len(metric_records) != 1:
        raise SecAggError("the training reply must hold exactly one ArrayRecord and one MetricRecord")
    metrics: MetricRecord = metric_records[0]
    if keys.NUM_EXAMPLES not in metrics:
        raise SecAggError(f"the training reply's metrics lack '{keys.NUM_EXAMPLES}'")
    weight = metrics[keys.NUM_EXAMPLES]
    if isinstance(weight, float) and weight.is_integer():
        weight = int(weight)
    if not isinstance(weight, int):
        raise SecAggError(f"'{keys.NUM_EXAMPLES}' must be a whole number, got {weight!r}")
    scalars = {k: float(v) for k, v in metrics.items() if k != keys.NUM_EXAMPLES and isinstance(v, (int, float))}
    return numpy_arrays(array_records[0]), weight, scalars


def distributed_dp_settings(run_config: Mapping[str, object]) -> tuple[float, float, float] | None:
    """(C, z, m) from the run config where it sets `dp = "distributed"`, else None."""
    if run_config.get("dp") != "distributed":
        return None
    names = ("dp-clipping-norm", "dp-noise-multiplier", "clients-per-round")
    try:
        clipping_norm, noise_multiplier, expected_cohort = (float(run_config[name]) for name in names)  # type: ignore
    except (KeyError, TypeError, ValueError):
        raise SecAggError(f"dp 'distributed' needs numbers for {', '.join(names)} in the run config") from None
    if not (math.isfinite(clipping_norm) and clipping_norm > 0 and math.isfinite(noise_multiplier)
            and noise_multiplier >= 0 and math.isfinite(expected_cohort) and expected_cohort >= 1):  # fmt: skip
        raise SecAggError(
            f"dp 'distributed' needs dp-clipping-norm > 0, dp-noise-multiplier >= 0 and clients-per-round >= 1, "
            f"got {clipping_norm}, {noise_multiplier}, {expected_cohort}"
        )
    return clipping_norm, noise_multiplier, expected_cohort


def noised_update(
    update: Mapping[str, np.ndarray],
    reference: Mapping[str, np.ndarray],
    clipping_norm: float,
    noise_multiplier: float,
    expected_cohort: float,
) -> dict[str, np.ndarray]:
    """reference + clip(update - reference, C) + N(0, (zC)^2 / m), in float64 (Flower's clipping
    and noise): m such shares sum to noise of std zC, what central DP adds to the sum."""
    if set(update) != set(reference) or any(update[name].shape != reference[name].shape for name in reference):
        return dict(update)  # `encode` refuses it: nothing is sent
    base = [np.asarray(reference[name], dtype=np.float64) for name in reference]
    model = [np.array(update[name], dtype=np.float64) for name in reference]  # copies: written below
    if any(not np.array_equal(new, old) for new, old in zip(model, base, strict=True)):
        compute_clip_model_update(model, base, clipping_norm)  # a zero update has no norm to divide by
    delta = [new - old for new, old in zip(model, base, strict=True)]
    add_gaussian_noise_inplace(delta, noise_multiplier * clipping_norm / math.sqrt(expected_cohort))
    return {name: old + d for name, old, d in zip(reference, base, delta, strict=True)}


def _unmask(state: NodeState, request: ConfigRecord) -> tuple[NodeState, dict]:
    alive, dropped = tuple(request[p.ALIVE]), tuple(request[p.DROPPED])
    owners = set(state.owners)
    if set(alive) & set(dropped):
        raise SecAggIntegrityError("unmask: a node is listed as both alive and dropped")
    if len(set(alive)) != len(alive) or len(set(dropped)) != len(dropped) or not set(alive + dropped) <= owners:
        raise SecAggError("unmask: the lists name nodes this node holds no shares of, or repeat one")
    if state.node not in alive:
        raise SecAggIntegrityError("unmask: this node sent its masked vector yet is listed as dropped")
    _check_group(len(alive), state.settings.threshold, "unmask: surviving share owners")
    index = {owner: i for i, owner in enumerate(state.owners)}
    shares = [state.b_shares[index[n]] for n in alive] + [state.sk_shares[index[n]] for n in dropped]
    return dataclasses.replace(state, stage=p.UNMASK), {p.OWNERS: list(alive + dropped), p.SHARES: shares}


def _check_ids(ids: tuple, allowed: set[int] | None, node: int, what: str) -> None:
    if any(not isinstance(i, int) for i in ids) or len(set(ids)) != len(ids) or node in ids:
        raise SecAggError(f"{what}: node ids must be distinct integers other than this node's")
    if allowed is not None and not set(ids) <= allowed:
        raise SecAggError(f"{what}: {sorted(set(ids) - allowed)} are not this node's neighbours")


def _check_group(size: int, threshold: int, what: str) -> None:
    if size < threshold:
        raise SecAggError(f"{what}: {size}, fewer than the threshold {threshold}")
