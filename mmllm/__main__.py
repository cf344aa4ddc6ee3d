"""``python -m mmllm``: the ``mmllm`` command, for an environment whose scripts folder is not on ``PATH``."""

from mmllm.console import entry

if __name__ == "__main__":
    entry()
