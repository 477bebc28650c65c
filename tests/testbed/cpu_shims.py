"""Let SGLang's pure-Python HiCache classes import and run on a CPU-only torch.

Imported by conftest.py before anything imports sglang. Each shim says why it exists; none of
them touches the code under test (the storage interface, host pools, controller, our backend).
"""

from __future__ import annotations

import enum
import importlib.abc
import importlib.machinery
import inspect
import sys
import types


class _Sink:
    """Attribute/call sink for the triton stub: @triton.jit(...) leaves functions untouched."""

    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, item):
        if item.startswith("__") and item.endswith("__"):
            raise AttributeError(item)
        if item == "active" and self._name.endswith("driver"):
            raise RuntimeError("0 active drivers (triton stub: no GPU)")
        return _Sink(f"{self._name}.{item}")

    def __call__(self, *args, **kwargs):
        if len(args) == 1 and not kwargs and callable(args[0]):
            return args[0]
        return _Sink(f"{self._name}()")

    def __getitem__(self, item):
        return _Sink(f"{self._name}[]")

    def __iter__(self):
        return iter(())

    def __bool__(self):
        return False

    def __mro_entries__(self, bases):
        return (object,)


class _StubModule(types.ModuleType):
    def __getattr__(self, item):
        if item.startswith("__") and item.endswith("__"):
            raise AttributeError(item)
        if item[:1].isupper():  # classes must stay real types (subclassed, isinstance'd)
            cls = type(item, (), {"__init__": lambda self, *a, **k: None, "__module__": self.__name__})
            setattr(self, item, cls)
            return cls
        return _Sink(f"{self.__name__}.{item}")


class _InterpolationMode(enum.Enum):
    NEAREST = "nearest"
    NEAREST_EXACT = "nearest-exact"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    BOX = "box"
    HAMMING = "hamming"
    LANCZOS = "lanczos"


class _ImageReadMode(enum.Enum):
    UNCHANGED = 0
    GRAY = 1
    GRAY_ALPHA = 2
    RGB = 3
    RGB_ALPHA = 4


class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def __init__(self, roots: tuple[str, ...]):
        self.roots = roots

    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] in self.roots:
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        m = _StubModule(spec.name)
        m.__path__ = []
        return m

    def exec_module(self, module):
        name = module.__name__
        if name == "triton":
            module.__version__ = "3.6.0"
            module.cdiv = lambda a, b: -(-a // b)
            module.next_power_of_2 = lambda n: 1 if n <= 1 else 1 << (int(n) - 1).bit_length()
        elif name == "triton.language":
            module.constexpr = _Sink("triton.language.constexpr")
        elif name == "torchvision":
            module.__version__ = "0.0.0+cpu-stub"
        elif name.startswith("torchvision.transforms"):
            module.InterpolationMode = _InterpolationMode
        elif name == "torchvision.io":
            module.ImageReadMode = _ImageReadMode


def _install_triton_stub() -> None:
    """SGLang does `import triton` and `@triton.jit` at module level in hundreds of files; no
    kernel runs in these tests, so a stub that leaves functions untouched is enough. torch is
    asked first whether triton exists, so torch keeps its no-triton code paths."""
    import importlib.util

    if importlib.util.find_spec("triton") is not None:
        return
    import torch.utils._triton as tt

    for fn in ("has_triton_package", "has_triton"):
        try:
            getattr(tt, fn)()
        except Exception:  # noqa: BLE001
            pass
    import torch.utils.flop_counter  # noqa: F401  (binds its triton type to None now)

    sys.meta_path.insert(0, _StubFinder(("triton", "triton_kernels")))


def _install_torchvision_stub() -> None:
    """PyPI's torchvision wheels link CUDA torch, so with the CPU torch `import torchvision`
    fails; SGLang imports torchvision.transforms at module level (multimodal configs pulled in
    by memory_pool). transformers < 5.15 (sglang 0.5.17) requires torchvision to be visible;
    newer ones must not see the stub, so their availability checks are evaluated first."""
    try:
        import torchvision  # noqa: F401
        return
    except Exception:  # noqa: BLE001
        for k in [k for k in sys.modules if k.split(".")[0] == "torchvision"]:
            del sys.modules[k]
    import importlib.metadata as md

    major, minor = (int(x) for x in md.version("transformers").split(".")[:2])
    if (major, minor) >= (5, 15):
        from transformers.utils import import_utils as iu

        for fn in ("is_torchvision_available", "is_torchvision_v2_available"):
            if hasattr(iu, fn):
                getattr(iu, fn)()
    sys.meta_path.insert(0, _StubFinder(("torchvision",)))


def _torch_transfer_kv_direct(src_layers, dst_layers, src_indices, dst_indices, page_size=1, **_):
    for src, dst in zip(src_layers, dst_layers):
        dst[dst_indices.to(dst.device).long()] = src[src_indices.to(src.device).long()].to(dst.device)


def install_cpu_hicache_patches() -> None:
    """Host pools pin memory with cudaHostRegister and torch.zeros(pin_memory=True), which fail
    without an accelerator: force pin_memory=False. The `direct` io backend's copy kernel comes
    from sgl_kernel on CUDA only: give the host-pool modules a pure-torch version."""
    import importlib

    base = importlib.import_module("sglang.srt.mem_cache.pool_host.base")
    if not getattr(base.HostKVCache.__init__, "_cpu_shim", False):
        orig = base.HostKVCache.__init__
        sig = inspect.signature(orig)

        def _init(self, *a, **k):
            bound = sig.bind(self, *a, **k)
            bound.arguments["pin_memory"] = False
            return orig(*bound.args, **bound.kwargs)

        _init._cpu_shim = True
        base.HostKVCache.__init__ = _init
    # Host pools refuse to start unless ~10 GB of RAM stay free beyond them; the tests' pools are
    # a few MB, on a shared 24 GB machine.
    if hasattr(base, "HICACHE_HOST_MEMORY_RESERVE_BYTES"):
        base.HICACHE_HOST_MEMORY_RESERVE_BYTES = 0
    common = importlib.import_module("sglang.srt.mem_cache.pool_host.common")
    common._cuda_host_register = lambda *a, **k: None
    if hasattr(common, "_cuda_host_unregister"):
        common._cuda_host_unregister = lambda *a, **k: None
    for modname in ("sglang.srt.mem_cache.pool_host.mha", "sglang.srt.mem_cache.pool_host.mla"):
        m = importlib.import_module(modname)
        if not hasattr(m, "transfer_kv_direct"):
            m.transfer_kv_direct = _torch_transfer_kv_direct
        if hasattr(m, "_cuda_host_unregister"):
            m._cuda_host_unregister = lambda *a, **k: None


def install() -> None:
    import torch  # noqa: F401  (fully imported before any stub exists)

    _install_torchvision_stub()
    _install_triton_stub()
