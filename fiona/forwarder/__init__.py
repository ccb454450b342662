"""Forwarding to the research PACS: the delivery ledger, senders, retries, circuit breaker.

:mod:`~fiona.forwarder.ledger` keeps one row per (request, instance, destination);
:mod:`~fiona.forwarder.senders` delivers (C-STORE SCU, folder); :mod:`~fiona.forwarder.classify`
classifies every outcome; :mod:`~fiona.forwarder.service` runs it all inside ``fiona serve``.
"""
