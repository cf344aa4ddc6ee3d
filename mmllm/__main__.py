"""``python -m mmllm``: the ``mmllm`` command, for an environment whose scripts folder is not on ``PATH``."""

import sys

from mmllm.cli import main

if __name__ == "__main__":
    sys.exit(main())
