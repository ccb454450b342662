"""DICOM TLS (PS3.15 Annex B): SSL contexts for FIONA's SCP and for its SCU to destinations."""

from __future__ import annotations

import ssl

from fiona.config import DestinationTls, NodeTls

__all__ = ["client_context", "server_context"]


def server_context(settings: NodeTls) -> ssl.SSLContext:
    """The SCP's context: its certificate; client certificates required when ``ca_file`` is set."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(settings.cert_file), str(settings.key_file))
    if settings.ca_file is not None:
        context.load_verify_locations(cafile=str(settings.ca_file))
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def client_context(settings: DestinationTls, host: str) -> tuple[ssl.SSLContext, str]:
    """The SCU's context and the name its certificate must carry (pynetdicom ``tls_args``).

    The destination's certificate is always verified: against ``ca_file``, or the system's CAs.
    """
    context = ssl.create_default_context(
        cafile=str(settings.ca_file) if settings.ca_file is not None else None
    )
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if settings.cert_file is not None and settings.key_file is not None:
        context.load_cert_chain(str(settings.cert_file), str(settings.key_file))
    return context, settings.server_hostname or host
