"""The founding papers' methods, on genuinely sparse layers.

* :mod:`~sparsekern.methods.suptickets`: Sup-tickets (cyclic phase, CAA/CIMA superposition)
* :mod:`~sparsekern.methods.superpose`: the sparse-level merge it uses
* :mod:`~sparsekern.methods.freetickets`: EDST, DST Ensemble, ``TicketEnsemble``, metrics
* :mod:`~sparsekern.methods.threshold`: trainable-threshold DST (dense-to-sparse)
* :mod:`~sparsekern.methods.gradflow`: the gradient-flow study
"""
from sparsekern.methods.freetickets import EDST, TicketEnsemble, diversity, ensemble_report
from sparsekern.methods.superpose import merge_topologies, superpose
from sparsekern.methods.suptickets import SupTickets
from sparsekern.methods.threshold import (ThresholdConv2d, ThresholdLinear, export_sparse, reset_collapsed,
                                          threshold_regularizer, thresholdify)

__all__ = ["SupTickets", "merge_topologies", "superpose", "EDST", "TicketEnsemble", "diversity",
           "ensemble_report", "ThresholdLinear", "ThresholdConv2d", "thresholdify", "threshold_regularizer",
           "reset_collapsed", "export_sparse"]
