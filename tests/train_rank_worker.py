"""One rank of a hand-launched 2-rank training job (run as a script, not collected).

    RANK=r WORLD_SIZE=2 MASTER_ADDR=... MASTER_PORT=... python tests/train_rank_worker.py ARGS...

Runs ``sparsekern.train.main(ARGS)``. With ``SK_TEST_SHIFT_TOPOLOGY=1``, rank 1's ``sparsify``
draws its topology from another seed than rank 0's: ranks seeded differently before
``sparsify`` with identical options, which the command must refuse.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch  # noqa: E402

import sparsekern as sk  # noqa: E402
from sparsekern.train import main  # noqa: E402

if __name__ == "__main__":
    if os.environ.get("SK_TEST_SHIFT_TOPOLOGY") and os.environ["RANK"] == "1":
        real = sk.sparsify

        def shifted(model, *args, generator=None, **kwargs):
            return real(model, *args, generator=torch.Generator().manual_seed(12345), **kwargs)
        sk.sparsify = shifted
    rc = main(sys.argv[1:])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)          # skip interpreter teardown (gloo's threads; see DEVELOPERS.md)
