"""Relation-based transfer: keep the relations among samples (distances, angles) across networks."""

from metatl.transfer.relation.rkd import RKD, rkd_angle_loss, rkd_distance_loss

__all__ = ["RKD", "rkd_angle_loss", "rkd_distance_loss"]
