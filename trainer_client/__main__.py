"""``python -m trainer_client`` is ``crs-trainer``."""

import sys

from trainer_client.cli import main

if __name__ == "__main__":
    sys.exit(main())
