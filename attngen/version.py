"""attngen's version: in every generated module's header and in the module cache key."""
__version__ = "0.1.0"
