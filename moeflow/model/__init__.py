"""What the network computes: one file per concern (attention, router, dispatch, experts, ...)."""

from moeflow.model.router import Router, RoutingResult
from moeflow.model.transformer import (LayerRouting, ModelOutput, Transformer, count_parameters,
                                       parameter_counts)

__all__ = ["LayerRouting", "ModelOutput", "Router", "RoutingResult", "Transformer",
           "count_parameters", "parameter_counts"]
