"""The receiving node: C-STORE SCP, durable spool, index, stability, recovery, import."""

from fiona.scp.ingest import Ingestor, IngestResult, ReceiveFacts, Status
from fiona.scp.server import Node, open_node_services
from fiona.scp.spool import Spool

__all__ = [
    "IngestResult",
    "Ingestor",
    "Node",
    "ReceiveFacts",
    "Spool",
    "Status",
    "open_node_services",
]
