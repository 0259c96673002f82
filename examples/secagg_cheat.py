"""A ClientApp of which one node cheats in secure aggregation: Flowerbed's own, its SecAgg+ replies
tampered with, one fault a secure round, in turn.

    fedsim run --client-app examples.secagg_cheat:app --set secure-aggregation=true ...
    fedclient start ... --client-app examples.secagg_cheat:app     # a deployed device that cheats

The node with partition id 0 (in a deployment: every node running this app) sends, in its n-th
secure round, FAULTS[n % len(FAULTS)]: wrong types, ids it does not own, flipped ciphertexts, a
wrong field type, wrong shares, shares of the wrong length. The server drops it from that round,
names it, and sums the others: the run goes on and learns.
"""

from __future__ import annotations

from collections.abc import Callable

from flwr.app import ConfigRecord, Context, Message
from flwr.clientapp import ClientApp

from fedclient import app as honest
from fedclient.guard import error_reply_mod, policy_mod
from shared.flower_compat.messages import ClientAppCallable
from shared.secagg import protocol as p
from shared.secagg import secagg_mod
from shared.secagg.client import stage_request

Change = Callable[[ConfigRecord], None]
STATE = "secagg-cheat"  # the ConfigRecord in context.state counting this node's secure rounds


def _set(name: str, value: object) -> Change:
    def change(record: ConfigRecord) -> None:
        record[name] = value

    return change


def _each(name: str, how: Callable[[bytes], bytes]) -> Change:
    def change(record: ConfigRecord) -> None:
        record[name] = [how(blob) for blob in record[name]]

    return change


def _flip(blob: bytes) -> bytes:
    return blob[:-1] + bytes([blob[-1] ^ 1])


# (stage, what the cheat does): one a secure round, in turn
FAULTS: tuple[tuple[str, str, Change], ...] = (
    (p.ADVERTISE_KEYS, "a public key that is an integer", _set(p.PUBLIC_KEY_C, 5)),
    (p.SHARE_KEYS, "shares addressed to nodes it was not given", _set(p.DESTINATIONS, [10**9, 10**9 + 1])),
    (p.SHARE_KEYS, "every ciphertext flipped", _each(p.CIPHERTEXTS, _flip)),
    (p.MASKED_INPUT, "metric names that are an integer", _set(p.METRIC_KEYS, 5)),
    (p.UNMASK, "every revealed share flipped", _each(p.SHARES, _flip)),
    (p.UNMASK, "every revealed share cut short", _each(p.SHARES, lambda blob: blob[:-1])),
)


def cheats(context: Context) -> bool:
    return int(context.node_config.get("partition-id", 0)) == 0


def cheat_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Around SecAgg+'s mod: the node's reply to a stage, with this round's fault where it is this stage's."""
    reply = call_next(msg, context)
    request = stage_request(msg)
    if request is None or not cheats(context) or reply.has_error():
        return reply
    stage = request[p.STAGE]
    count = context.state.get(STATE, ConfigRecord({"rounds": 0}))
    if stage == p.ADVERTISE_KEYS:
        count = ConfigRecord({"rounds": int(count["rounds"]) + 1})
        context.state[STATE] = count
    fault_stage, _what, change = FAULTS[(int(count["rounds"]) - 1) % len(FAULTS)]
    if stage == fault_stage:
        change(reply.content[p.RECORD])
    return reply


def _make_app() -> ClientApp:
    """Flowerbed's ClientApp (its handlers and mods) with `cheat_mod` just outside SecAgg+'s."""
    app = ClientApp(mods=[error_reply_mod, policy_mod, cheat_mod, secagg_mod])
    app.train()(honest.train)
    app.evaluate()(honest.evaluate)
    return app


app = _make_app()
