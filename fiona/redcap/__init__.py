"""REDCap as the source of transfer requests (``requests.source: redcap``).

:mod:`fiona.redcap.client` speaks the API; :mod:`fiona.redcap.sync` maps MMIV's "Incoming"
project onto FIONA's request table; :mod:`fiona.redcap.poller` runs it on a schedule with
back-off and alerts.
"""
