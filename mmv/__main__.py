"""``python -m mmv``: the ``mmv`` command (:mod:`mmv.cli`)."""

import sys

from mmv.cli import main

sys.exit(main())
