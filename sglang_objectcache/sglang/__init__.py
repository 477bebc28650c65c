"""The only code that imports SGLang: the plugin hook, the HiCacheStorage adapter, and the
differences between the supported SGLang releases (compat.py)."""
