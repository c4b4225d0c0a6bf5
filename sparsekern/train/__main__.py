"""``python -m sparsekern.train`` (and ``torchrun ... -m sparsekern.train``)."""
import os
import sys

from sparsekern.train import main
from sparsekern.train.distributed import launched

if __name__ == "__main__":
    rc = main()
    if launched():
        # a torchrun rank: gloo's threads racing interpreter teardown made a rank abort now and
        # then ("terminate called without an active exception") after all its work was done
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)
    sys.exit(rc)
