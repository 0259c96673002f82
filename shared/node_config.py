"""The node config entries a device sets for its own ClientApp (`flower-supernode --node-config`),
named once. Node config is the device's: a server cannot set or change it. This module imports
nothing, so fedclient's supervisor can write them without loading Flower or `cryptography`."""

DATA_PATH = "data-path"  # the device's own data, `fedclient start --data`
DEVICE = "device"  # where it trains, `--device`
# Secure-aggregation credentials of an enrolled device (shared/secagg/enrollment.py): paths of its
# node private key, the enrollment certificate the federation's offline CA issued for that key,
# and the enrollment CA's certificate, against which it checks its peers.
SIGNING_KEY = "secagg-signing-key"
CERTIFICATE = "secagg-certificate"
ENROLLMENT_CA = "secagg-enrollment-ca"
