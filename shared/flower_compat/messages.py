"""Messages and records: the .npy layout of `Array` bytes, message ids, error codes, and a Message
or Context in Flower's wire format (what fedsim's worker processes exchange).

`flwr.app` offers none of these: Array bytes are read without copying, ids are set where a
SuperLink would set them, and messages cross processes as a SuperNode sends them.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
from flwr.app import Array, Context, Message, RecordDict

from shared.flower_compat import flower_symbols

with flower_symbols("messages"):
    # The node id of the SuperLink (a server-side message's source), the error codes of Error
    # replies, and the serialization type of an ndarray `Array`.
    from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode, SType

    # The wire format of a Message and a Context, as a SuperNode sends them to its ClientApp process.
    from flwr.common.serde import (
        context_from_proto,
        context_to_proto,
        error_to_proto,
        message_from_proto,
        metadata_to_proto,
        recorddict_to_proto,
    )
    from flwr.proto.message_pb2 import Context as ProtoContext
    from flwr.proto.message_pb2 import Message as ProtoMessage

    # A ClientApp mod's `call_next` (shared/secagg, fedclient/guard.py).
    from flwr.clientapp.typing import ClientAppCallable

__all__ = [
    "ClientAppCallable",
    "SUPERLINK_NODE_ID",
    "ErrorCode",
    "SType",
    "set_message_id",
    "npy_view",
    "npy_array",
    "message_to_bytes",
    "message_from_bytes",
    "context_to_bytes",
    "context_from_bytes",
]


def set_message_id(message: Message, message_id: str) -> None:
    """Give `message` the id a SuperLink or SuperNode would.

    Relies on `Metadata.message_id` being a read-only property over
    `Metadata.__dict__["_message_id"]`, which Flower itself writes when it stores a message.
    """
    message.metadata.__dict__["_message_id"] = message_id


def npy_view(array: Array) -> np.ndarray:
    """A read-only ndarray over `array.data`, without copying.

    Relies on Flower serializing an ndarray `Array` as .npy bytes (`np.save`) with
    `stype == SType.NUMPY`. `Array.numpy()` reads the same with `np.load`, which copies the
    data. Raises ValueError for another serialization type, object dtypes (never unpickled),
    or data that is not what its header says.
    """
    if array.stype != SType.NUMPY:
        raise ValueError(f"unsupported serialization type {array.stype!r}")
    buf = io.BytesIO(array.data)
    header_version = np.lib.format.read_magic(buf)
    if header_version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(buf)
    elif header_version == (2, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(buf)
    else:  # rare header versions: let numpy decode (one copy)
        return array.numpy()
    if dtype.hasobject:
        raise ValueError(f"object arrays are not allowed (dtype {dtype})")
    count = int(np.prod(shape, dtype=np.int64))
    flat = np.frombuffer(array.data, dtype=dtype, count=count, offset=buf.tell())  # (numel,)
    return flat.reshape(shape[::-1]).T if fortran else flat.reshape(shape)


def npy_array(parts: Sequence[np.ndarray]) -> Array:
    """The `Array` that `Array.from_numpy_ndarray` makes of the concatenation of `parts` (one
    dtype), flat: the same .npy bytes, written with one copy of the values instead of three
    (concatenating, `np.save` into a buffer, taking its value)."""
    dtype = parts[0].dtype
    count = sum(part.size for part in parts)
    header = io.BytesIO()
    header_data = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": (count,)}
    np.lib.format.write_array_header_1_0(header, header_data)
    data = b"".join([header.getvalue(), *(np.ascontiguousarray(part, dtype=dtype).reshape(-1) for part in parts)])
    return Array(dtype=str(dtype), shape=(count,), stype=SType.NUMPY, data=data)


def message_to_bytes(message: Message, content: RecordDict | None = None) -> bytes:
    """`message` in Flower's wire format (its protobuf), with `content` in place of its own if given.

    Relies on `flwr.proto.message_pb2.Message` having the fields `metadata`, `content`, `error`,
    filled by Flower's serde as `message_to_proto` does.
    """
    proto = ProtoMessage(metadata=metadata_to_proto(message.metadata))
    if message.has_error():
        proto.error.CopyFrom(error_to_proto(message.error))
    else:
        proto.content.CopyFrom(recorddict_to_proto(message.content if content is None else content))
    return proto.SerializeToString()


def message_from_bytes(data: bytes) -> Message:
    """The Message `message_to_bytes` wrote."""
    proto = ProtoMessage()
    proto.ParseFromString(data)
    return message_from_proto(proto)


def context_to_bytes(context: Context) -> bytes:
    """`context` (node config, state, run config) in Flower's wire format."""
    return context_to_proto(context).SerializeToString()


def context_from_bytes(data: bytes) -> Context:
    """The Context `context_to_bytes` wrote."""
    proto = ProtoContext()
    proto.ParseFromString(data)
    return context_from_proto(proto)
