"""unbackdoor: remove backdoors from instruction-tuned LLMs (BEEAR, CROW, SANDE/OSFT), with the attacks,
evaluation, benchmark and offline tiny lab to trust them. See the README and ``unbackdoor --help``."""
from importlib import metadata as _metadata

try:
    __version__ = _metadata.version("unbackdoor")
except _metadata.PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"
