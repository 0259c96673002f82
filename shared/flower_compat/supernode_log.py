"""What `flower-supernode` prints where nothing structured says it, for `fedclient start`'s supervisor.

Flower 1.41's SuperNode exposes no state: its Runtime API's `/health` and its gRPC health server
answer "serving" whether or not the SuperLink accepted the node, it exits with status 1 for every
error, and the node id lives in its memory. So the supervisor reads these lines of its output.
This module imports no Flower (the supervisor must not: memory on a device); the canary test
checks each marker against Flower's source (the port's, against asyncio) and the figure against
Flower's constants.
"""

from __future__ import annotations

# Logged once the SuperLink accepted the node (`start_client_internal`: "SuperNode ID: %s").
CONNECTED = "SuperNode ID:"
# Logged, without the address or the reason, while the SuperLink cannot be reached (`http_retry`).
RETRYING = "Connection attempt failed, retrying"
# Flower's exit message when the node could not join: this line, then the reason (`fleet_http_connection`).
CONNECTION_FAILED = "Failed to initialize the connection"
# How every exit message for an error starts (`flwr_exit`): "Exit Code: N", then the message.
EXIT_CODE = "Exit Code:"
# The SuperLink's refusal to activate the node (FLEET_NODE_ACTIVATION_FAILED, as `[code: N]`): an
# unregistered key, or a key whose node the SuperLink still counts online.
ACTIVATION_REFUSED_CODE = 2004
ACTIVATION_REFUSED = f"[code: {ACTIVATION_REFUSED_CODE}]"
# The SuperNode's line for a key file it cannot read ("Unable to parse the private key file.").
BAD_KEY = "private key"
# Logged when it drops a message whose run was stopped while the message was being received
# (e.g. the server restarted mid-round); it leaves the task it created for that message unfinished.
ABANDONED_TASK = "is not in `RUNNING` status. Ignoring message"
# OpenSSL's reasons, as the SuperNode's HTTP client prints them, for a server certificate its CA
# did not sign, and for a port that does not speak TLS.
UNTRUSTED_CERTIFICATE = "CERTIFICATE_VERIFY_FAILED"
NOT_TLS = "WRONG_VERSION_NUMBER"
# What its Runtime API server (uvicorn) logs when another process holds the port: asyncio's OSError text.
PORT_TAKEN = "error while attempting to bind on address"

# How long the SuperLink counts a node online after its last heartbeat: HEARTBEAT_PATIENCE (2) x
# HEARTBEAT_DEFAULT_INTERVAL (30 s); activating the node again within it is refused (ACTIVATION_REFUSED).
ONLINE_WINDOW = 60.0
