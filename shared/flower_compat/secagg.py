"""SecAgg+'s plaintext layout of a key share, as Flower's own SecAgg+ mod writes it (shared/secagg)."""

from __future__ import annotations

from shared.flower_compat import flower_symbols

with flower_symbols("secagg"):
    from flwr.common.secure_aggregation.secaggplus_utils import (
        share_keys_plaintext_concat,
        share_keys_plaintext_separate,
    )

__all__ = ["share_keys_plaintext_concat", "share_keys_plaintext_separate"]
