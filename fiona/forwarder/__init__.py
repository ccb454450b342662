"""Forwarding (issue 4): per-instance delivery ledger to research PACSs. Not built yet."""
