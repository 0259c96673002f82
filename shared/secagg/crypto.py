"""The protocol's cryptography: X25519 + HKDF-SHA256 key agreement, AES-256-GCM for shares in
transit (bound to round, stage, source and destination), AES-256-CTR keystreams as masks, Shamir
sharing (PyCryptodome, one GF(2^128) polynomial per 16-byte block) and SHA-256 share commitments.
Every cipher, KDF and random number comes from `cryptography` or the OS CSPRNG.

Flower's helpers are not used: `pseudo_rand_gen` seeds numpy's Mersenne Twister with 32 bits,
`crypto.shamir` pads a 32-byte secret to three blocks, the Fernet helpers take no associated
data. Timings: docs/benchmarks.md#secure-aggregation.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable, Sequence

import numpy as np
from Crypto.Protocol.SecretSharing import Shamir
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from shared.secagg.settings import SecAggError, SecAggIntegrityError

LABEL = b"flowerbed/secagg/v1/"
SEED_BYTES = 32
ROUND_ID_BYTES = 16
_NONCE_BYTES = 12
SEAL_OVERHEAD = _NONCE_BYTES + 16  # nonce and GCM tag
_CTR_ZERO_NONCE = bytes(16)  # every mask key is used for one keystream only
_INDEX_BYTES = 4  # a share: little-endian index, then one 16-byte share per block
SHARE_BYTES = _INDEX_BYTES + SEED_BYTES  # a share of a 32-byte secret (seed or private key)
DIGEST_BYTES = 32  # a share commitment
SEED_SHARE, KEY_SHARE = b"b", b"s"  # the kinds of share: of the self-mask seed, of the masking key
_COMMITMENT = LABEL + b"share-commitment\x00"
_BLOCK = 16  # PyCryptodome shares 16-byte secrets (elements of GF(2^128))
_CHUNK_ELEMENTS = 1 << 15  # keystream chunk: 256 KiB of uint64, stays in L2 while added


def new_key_pair() -> tuple[bytes, bytes]:
    """A fresh X25519 key pair as raw (private, public) bytes."""
    private = X25519PrivateKey.generate()
    raw = serialization.Encoding.Raw
    public = private.public_key().public_bytes(raw, serialization.PublicFormat.Raw)
    secret = private.private_bytes(raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())
    return secret, public


def public_of(private: bytes) -> bytes:
    """The raw public key of a raw X25519 private key."""
    public = X25519PrivateKey.from_private_bytes(private).public_key()
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def agree(private: bytes, peer_public: bytes, purpose: str, round_id: bytes, a: int, b: int) -> bytes:
    """A 32-byte key for `purpose` shared by nodes `a` and `b` (order-free) in one round."""
    return agree_all(private, [(b, peer_public)], purpose, round_id, a)[0]


def agree_all(
    private: bytes, peers: Iterable[tuple[int, bytes]], purpose: str, round_id: bytes, node: int
) -> list[bytes]:
    """`agree` of `node`'s private key with each (peer id, peer public key), the key parsed once."""
    own = X25519PrivateKey.from_private_bytes(private)
    keys = []
    for peer, peer_public in peers:
        try:
            shared = own.exchange(X25519PublicKey.from_public_bytes(peer_public))
        except ValueError as err:  # a malformed or low-order public key
            raise SecAggError(f"key agreement between nodes {node} and {peer} failed: {err}") from None
        low, high = sorted((node, peer))
        keys.append(derive(shared, purpose, round_id + struct.pack(">QQ", low, high)))
    return keys


def derive(secret: bytes, purpose: str, context: bytes = b"") -> bytes:
    """HKDF-SHA256 of `secret` for one purpose and context."""
    info = LABEL + purpose.encode() + b"/" + context
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(secret)


def share_aad(round_id: bytes, stage: str, src: int, dst: int) -> bytes:
    """What a share ciphertext is bound to: its round, stage, sender and receiver."""
    return LABEL + round_id + stage.encode() + struct.pack(">QQ", src, dst)


def commit_share(round_id: bytes, owner: int, holder: int, kind: bytes, share: bytes) -> bytes:
    """The SHA-256 commitment to `owner`'s share of `kind` (SEED_SHARE, KEY_SHARE) dealt to `holder`."""
    digest = hashes.Hash(hashes.SHA256())
    digest.update(_COMMITMENT + round_id + struct.pack(">QQ", owner, holder) + kind + share)
    return digest.finalize()


def seal(key: bytes, plaintext: bytes, aad: bytes) -> bytes:
    """AES-256-GCM: nonce || ciphertext || tag."""
    nonce = os.urandom(_NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, aad)


def unseal(key: bytes, blob: bytes, aad: bytes, what: str) -> bytes:
    """Decrypt and authenticate `blob`; a tampered, replayed or misdirected one raises."""
    try:
        return AESGCM(key).decrypt(blob[:_NONCE_BYTES], blob[_NONCE_BYTES:], aad)
    except (InvalidTag, ValueError):
        raise SecAggIntegrityError(f"{what}: authentication failed (tampered, replayed or misdirected)") from None


def apply_masks(vector: np.ndarray, keys: Sequence[tuple[bytes, int]]) -> None:
    """Add (sign +1) or subtract (sign -1) the keystream of each key to `vector`, in place.

    Arithmetic wraps modulo 2^(bits of the dtype); the caller reduces to 2^m. The keystreams
    are expanded chunk by chunk, so each is added while it is still in cache.
    """
    if not keys or vector.size == 0:
        return
    dtype = vector.dtype
    streams = [(_keystream(key), sign) for key, sign in keys]
    chunk_bytes = min(_CHUNK_ELEMENTS, vector.size) * dtype.itemsize
    zeros = memoryview(bytes(chunk_bytes))
    buffer = bytearray(chunk_bytes + 15)  # update_into needs a block's slack
    for start in range(0, vector.size, _CHUNK_ELEMENTS):
        view = vector[start : start + _CHUNK_ELEMENTS]
        nbytes = view.size * dtype.itemsize
        for stream, sign in streams:
            stream.update_into(zeros[:nbytes], buffer)
            mask = np.frombuffer(buffer, dtype=dtype, count=view.size)
            (np.add if sign > 0 else np.subtract)(view, mask, out=view)


def mask(key: bytes, size: int, dtype: np.dtype) -> np.ndarray:
    """The mask of `key` alone: `size` uniform integers of `dtype` (for tests and checks)."""
    out = np.zeros(size, dtype=dtype)
    apply_masks(out, [(key, 1)])
    return out


def _keystream(key: bytes):  # noqa: ANN202 - cryptography's CipherContext
    return Cipher(algorithms.AES(key), modes.CTR(_CTR_ZERO_NONCE)).encryptor()


def split_secret(secret: bytes, threshold: int, count: int) -> list[bytes]:
    """`count` Shamir shares of `secret` (whole 16-byte blocks), any `threshold` of which rebuild it."""
    if not 1 <= threshold <= count or not secret or len(secret) % _BLOCK:
        raise SecAggError(f"cannot split a {len(secret)}-byte secret into {count} shares, threshold {threshold}")
    blocks = [Shamir.split(threshold, count, secret[i : i + _BLOCK]) for i in range(0, len(secret), _BLOCK)]
    return [index.to_bytes(_INDEX_BYTES, "little") + b"".join(block[index - 1][1] for block in blocks)
            for index in range(1, count + 1)]  # fmt: skip


def rebuild_secret(shares: Iterable[bytes], threshold: int, what: str, length: int = SEED_BYTES) -> bytes:
    """The `length`-byte secret from `threshold` well-formed shares with distinct indices, else SecAggError."""
    points: dict[int, bytes] = {}
    for share in shares:
        if isinstance(share, bytes) and len(share) == _INDEX_BYTES + length:
            index = int.from_bytes(share[:_INDEX_BYTES], "little")
            if index > 0:  # the polynomial at 0 is the secret itself, never a share
                points.setdefault(index, share[_INDEX_BYTES:])
    if len(points) < threshold:
        raise SecAggError(f"{what}: {len(points)} shares, {threshold} needed")
    chosen = list(points.items())[:threshold]  # more points only cost more: one polynomial fits them all
    return b"".join(
        Shamir.combine([(index, value[i : i + _BLOCK]) for index, value in chosen]) for i in range(0, length, _BLOCK)
    )
