"""Whether the coordinator accepts this site's node key, asked the way the site's own SuperNode asks.

The SuperNode joins with one Fleet API call, ``ActivateNode``, signed with its node key by Flower's
``NodeAuthHttpInterceptor``. The SuperLink answers it in a fixed order: it checks the signature (401 when it
does not verify, e.g. a clock more than five minutes off), looks the public key up among the registered
nodes (``FLEET_NODE_ACTIVATION_FAILED`` when it is not there), and only then checks the heartbeat interval
(``FLEET_INVALID_HEARTBEAT_INTERVAL``). Asking with an interval below Flower's minimum therefore learns
whether the key is registered while the SuperLink changes nothing: no node is created or activated, so a
SuperNode of this site that is already running stays as it is.
"""

from __future__ import annotations

from pathlib import Path

from protocols.errors import FedistillError


class CoordinatorUnreachable(FedistillError):
    """No answer over verified TLS: nothing could be learnt about the key."""


def node_key_registered(address: str, ca_certificate: Path, node_key: Path, timeout_s: float) -> bool:
    """True if the SuperLink at ``address`` knows ``node_key``'s public key, False if it does not.

    Raises CoordinatorUnreachable when no verified TLS connection can be made, and FedistillError when the
    SuperLink refuses the signature or answers in a way this probe does not know.
    """
    # Flower is imported here, not at module level: `site check --offline` never needs it.
    import httpx
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key
    from flwr.proto.fleet_pb2 import ActivateNodeRequest, DeactivateNodeRequest  # pylint: disable=E0611
    from flwr.supercore.error import ApiErrorCode, FlowerError
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes
    from flwr.supernode.fleet_http_client import FleetHttpClient
    from flwr.supernode.node_auth_http_interceptor import NodeAuthHttpInterceptor

    try:
        key = load_ssh_private_key(node_key.read_bytes(), None)
    except (OSError, ValueError) as err:
        raise FedistillError(f"node key '{node_key}' cannot be read as an OpenSSH private key ({err}).") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise FedistillError(f"node key '{node_key}' is not an EC key; make a new one with `fedistill site init`.")
    # Interval 0 is below Flower's minimum: the SuperLink refuses it only after it has found the key.
    probe = ActivateNodeRequest(public_key=public_key_to_bytes(key.public_key()), heartbeat_interval=0.0)
    with FleetHttpClient(f"https://{address}", interceptors=[NodeAuthHttpInterceptor(key, key.public_key())],
                         verify=str(ca_certificate), timeout=timeout_s) as client:
        try:
            activated = client.ActivateNode(probe)
        except httpx.TransportError as err:
            raise CoordinatorUnreachable(f"{address}: {err}") from None
        except httpx.HTTPStatusError as err:
            answer = FlowerError.from_json(err.response.text)
            code = answer.code if answer is not None else None
            if code == ApiErrorCode.FLEET_INVALID_HEARTBEAT_INTERVAL:
                return True
            if code == ApiErrorCode.FLEET_NODE_ACTIVATION_FAILED:
                return False
            if err.response.status_code == httpx.codes.UNAUTHORIZED:
                raise FedistillError(f"the coordinator at {address} refused this site's signature; Flower accepts a "
                                     "signed timestamp up to five minutes old, so check this machine's clock.") from None
            raise FedistillError(f"the coordinator at {address} answered the node-key question with HTTP "
                                 f"{err.response.status_code}: {err.response.text[:300]}") from None
        # A Flower that checks the interval no longer (or later) has activated the node: set it back offline
        # with the SuperNode's own call, so the probe leaves nothing behind.
        client.DeactivateNode(DeactivateNodeRequest(node_id=activated.node_id))
        return True
