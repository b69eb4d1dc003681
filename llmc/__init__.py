"""llmc: post-training compression of large language models, one decoder block at a time.

    from llmc import load_config, compress
    result = compress(load_config("configs/quickstart.yml"))
"""

__version__ = "0.1.0"

from llmc.config import load_config
from llmc.runner import RunResult, compress

__all__ = ["RunResult", "__version__", "compress", "load_config"]
