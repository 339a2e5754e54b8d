"""farelab: the command-line front of the simulator (``farelab --help``)."""

__version__ = "0.1.0"
