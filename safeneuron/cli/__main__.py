"""``python -m safeneuron.cli``: the command line."""

import sys

from safeneuron.cli import main

sys.exit(main())
