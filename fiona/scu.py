"""Small SCU operations shared by the CLI (the forwarder brings its own in issue 4)."""

from __future__ import annotations

import socket

from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]  # generated at import

__all__ = ["echo", "set_nodelay"]


def set_nodelay(event: evt.Event) -> None:
    """EVT_CONN_OPEN handler: disable Nagle on FIONA's DICOM sockets."""
    assoc_socket = event.assoc.dul.socket
    sock = assoc_socket.socket if assoc_socket is not None else None
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def echo(
    host: str, port: int, called_ae: str, calling_ae: str = "FIONA", timeout: float = 10.0
) -> tuple[bool, str]:
    """Send a C-ECHO (PS3.4 A.4); return success and a one-line description."""
    ae = AE(ae_title=calling_ae)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    assoc = ae.associate(
        host, port, ae_title=called_ae, evt_handlers=[(evt.EVT_CONN_OPEN, set_nodelay)]
    )
    if assoc.is_rejected:
        return False, f"association rejected by {called_ae}@{host}:{port}"
    if not assoc.is_established:
        return False, f"no association with {called_ae}@{host}:{port}"
    try:
        status = assoc.send_c_echo()
    finally:
        assoc.release()
    code = getattr(status, "Status", None)
    if code == 0x0000:
        return True, f"C-ECHO {called_ae}@{host}:{port}: success"
    return False, f"C-ECHO {called_ae}@{host}:{port}: status {code!r}"
