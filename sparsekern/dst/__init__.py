"""Dynamic sparse training on genuinely sparse layers: RigL, SET, Static.

See :mod:`sparsekern.dst.engine` for the algorithms, :mod:`sparsekern.dst.selection` for the
drop/grow rules (shared with the masked-dense reference), :mod:`sparsekern.dst.growth` for
RigL's tiled growth scores, :mod:`sparsekern.dst.capture` for what they are computed from and
:mod:`sparsekern.dst.rebuild` for the in-place topology surgery.
"""
from sparsekern.dst.engine import SET, DSTEngine, RigL, Static
from sparsekern.dst.rebuild import permute_optimizer_state, update_topology

__all__ = ["DSTEngine", "RigL", "SET", "Static", "update_topology", "permute_optimizer_state"]
