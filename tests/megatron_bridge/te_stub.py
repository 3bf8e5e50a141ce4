"""The one stand-in the Megatron-Bridge environment needs: Transformer Engine for Bridge's LoRA module.

megatron/bridge/peft/lora_layers.py (0.6.2) runs `import transformer_engine.pytorch as te` unguarded and evaluates
`te.ops.Sequential` in annotations while its classes are defined; `import megatron.bridge` reaches it through the
conversion code. Transformer Engine is a CUDA package (not installable here or on the GPU host). Everywhere else,
megatron-core and Bridge probe for Transformer Engine with try/except and fall back, so a package on sys.path would
make them believe it is installed. The finder below therefore answers only that one importer: it hands
lora_layers a module whose attributes are classes nothing is an instance of (its isinstance checks are then false).
`only_for_bridges_lora()` removes the finder and the stub modules once `import megatron.bridge` has returned, so
afterwards `import transformer_engine` fails as it does without the package."""

import contextlib
import importlib.abc
import importlib.machinery
import sys

IMPORTER = "megatron.bridge.peft.lora_layers"


class _AbsentClass(type):
    """A Transformer Engine class that is not there: any attribute is another absent class (te.ops.Linear)."""

    def __getattr__(cls, name):
        return _absent(name)


def _absent(name: str):
    if name.startswith("__"):
        raise AttributeError(name)
    return _AbsentClass(name, (), {})


def _importer() -> str | None:
    frame = sys._getframe(2)
    while frame is not None and frame.f_code.co_filename.startswith("<frozen importlib"):
        frame = frame.f_back
    return frame.f_globals.get("__name__") if frame is not None else None


class _LoraOnlyFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] != "transformer_engine" or _importer() != IMPORTER:
            return None
        return importlib.machinery.ModuleSpec(fullname, self, is_package=fullname == "transformer_engine")

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        module.__getattr__ = _absent


@contextlib.contextmanager
def only_for_bridges_lora():
    finder = _LoraOnlyFinder()
    sys.meta_path.insert(0, finder)
    try:
        yield
    finally:
        sys.meta_path.remove(finder)
        for name in [m for m in sys.modules if m.split(".")[0] == "transformer_engine"]:
            del sys.modules[name]
