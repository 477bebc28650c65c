"""The engine: everything between SGLang's calls and the stores, with no SGLang imports."""
