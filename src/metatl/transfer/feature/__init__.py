"""Feature-based transfer: map source and target to a shared representation.

Closed-form CORAL lives here; deep CORAL, DANN and MMD losses belong here too.
"""
from metatl.transfer.feature.coral import CORAL, coral_matrix

__all__ = ["CORAL", "coral_matrix"]
